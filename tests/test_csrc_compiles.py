"""csrc/ compiles on a CPU machine: every .cu with nvcc (sm_90, -O1), the torch binding with the host
compiler, and the linked library registers a CUDA kernel under every operator cuda_ext.py defines.

Nothing runs on a GPU: this catches syntax, type and schema errors where there is no GPU. Each
check is skipped, saying why, when its compiler (nvcc on PATH, a host C++ compiler) is missing; with
ADAPTIVE_KERNELS_REQUIRE_COMPILERS=1 (as CI sets it) it fails instead, so a CI machine without them cannot pass
unchecked.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

CSRC = Path(__file__).resolve().parents[1] / "csrc"
CU_SOURCES = sorted(p.name for p in CSRC.glob("*.cu"))
CPP_SOURCES = sorted(p.name for p in CSRC.glob("*.cpp"))
NVCC = shutil.which("nvcc")
CXX = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
TIMEOUT = 120  # seconds per file; each takes under 20 s on 2 cores
TORCH_INCLUDES = [f"-I{p}" for p in cpp_extension.include_paths()]
REQUIRED = os.environ.get("ADAPTIVE_KERNELS_REQUIRE_COMPILERS") == "1"


def _missing(why: str) -> None:
    """Skip the check for what is missing, or fail it where the compilers are required."""
    (pytest.fail if REQUIRED else pytest.skip)(why)


def _run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout}\n{done.stderr}"


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("csrc")


def _cuda_object(name: str, build_dir: Path) -> Path:
    """csrc/<name> compiled by nvcc as the extension build would (torch's nvcc flags), for sm_90 at -O1."""
    obj = build_dir / f"{name}.o"
    if not obj.exists():
        _run([NVCC, "-c", "-arch=sm_90", "-O1", "-std=c++17", *cpp_extension.COMMON_NVCC_FLAGS,
              "-Xcompiler", "-fPIC", f"-I{CSRC}", *TORCH_INCLUDES, str(CSRC / name), "-o", str(obj)])
    return obj


def _cxx_object(name: str, build_dir: Path) -> Path:
    obj = build_dir / f"{name}.o"
    if not obj.exists():
        abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
        _run([CXX, "-c", "-fPIC", "-O1", "-std=c++20", abi, f"-I{CSRC}", *TORCH_INCLUDES, str(CSRC / name),
              "-o", str(obj)])
    return obj


def test_sources_are_there():
    assert CU_SOURCES and CPP_SOURCES, f"no CUDA or C++ sources in {CSRC}"


@pytest.mark.parametrize("name", CU_SOURCES)
def test_cuda_source_compiles(name, build_dir):
    if NVCC is None:
        _missing("nvcc is not on PATH: the CUDA sources are compile-checked only where a CUDA toolkit is installed")
    assert _cuda_object(name, build_dir).stat().st_size > 0


@pytest.mark.parametrize("name", CPP_SOURCES)
def test_binding_source_compiles(name, build_dir):
    if CXX is None:
        _missing("no host C++ compiler (c++ or g++) on PATH")
    assert _cxx_object(name, build_dir).stat().st_size > 0


def _cudart_dir() -> Path | None:
    """The folder of libcudart.so: under CUDA_HOME, CUDA_PATH, nvcc's toolkit or /usr/local/cuda."""
    if NVCC is None:
        return None
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), Path(NVCC).resolve().parents[1], "/usr/local/cuda"]
    for home in filter(None, homes):
        for lib in ("lib64", "lib", "targets/x86_64-linux/lib"):
            if any(Path(home, lib).glob("libcudart.so*")):
                return Path(home, lib)
    return None


def test_library_links_and_registers_every_operator(build_dir):
    """Linking all objects and loading the library registers a CUDA kernel whose C++ signature matches
    the schema cuda_ext.py defines (the dispatcher refuses a mismatch at load time)."""
    cudart = _cudart_dir()
    if NVCC is None or CXX is None or cudart is None:
        _missing("needs nvcc, a host C++ compiler and libcudart to link csrc/")
    objects = [_cuda_object(n, build_dir) for n in CU_SOURCES] + [_cxx_object(n, build_dir) for n in CPP_SOURCES]
    library = build_dir / "adaptive_kernels_cuda.so"
    torch_lib = Path(torch.__file__).parent / "lib"
    _run([CXX, "-shared", *map(str, objects), f"-L{torch_lib}", "-lc10", "-ltorch_cpu", "-ltorch",
          f"-L{cudart}", "-lcudart", f"-Wl,-rpath,{cudart}", f"-Wl,-rpath,{torch_lib}", "-o", str(library)])
    check = textwrap.dedent(f"""
        import torch
        import adaptive_kernels.cuda_ext  # defines the schemas
        torch.ops.load_library({str(library)!r})
        for name in ("cuda_gather_rows_linear", "cuda_gather_cols_linear", "cuda_compact_plan"):
            op = getattr(torch.ops.adaptive_kernels, name).default
            assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CUDA"), name
        print("registered")
    """)
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0 and "registered" in done.stdout, done.stdout + done.stderr
