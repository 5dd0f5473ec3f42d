"""On a CUDA machine, everything about the CUDA extension in one call: build csrc/, run its tests
(tests/test_cuda_ext.py, tests/test_csrc_compiles.py), run its benchmark (benchmarks/test_cuda_ext.py),
then print a short table, last.

    PYTHONPATH=. python3 benchmarks/gpu_cuda_ext.py [--skip-tests] [--skip-bench] [--verbose-build]

Results land in benchmarks/results/cuda_ext-<device>-<time>.{json,csv} (and in $OUT when set).
Exit status: 0 when the build, the tests and the benchmark all succeeded.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from measure import RESULTS, ROOT, fmt, newest_result, run


def environment() -> str:
    import torch
    nvcc = shutil.which("nvcc")
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1] \
        if nvcc else "not on PATH"
    from torch.utils import cpp_extension
    cxx = shutil.which(os.environ.get("CXX", "c++"))
    cxx_version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.splitlines()[0] \
        if cxx else "not on PATH"
    lines = [f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda})",
             f"host compiler: {cxx} ({cxx_version}); torch's _GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
             f"device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}",
             f"nvcc: {nvcc} ({version}); CUDA_HOME {cpp_extension.CUDA_HOME}; "
             f"ninja {'yes' if cpp_extension.is_ninja_available() else 'no'}"]
    return "\n".join(lines)


def build(verbose: bool) -> tuple[bool, str]:
    """Build and load csrc/ in this process: (ok, a one-line account)."""
    sys.path.insert(0, str(ROOT))
    from adaptive_kernels import cuda_ext
    start = time.time()
    try:
        cuda_ext.load(verbose=verbose)
    except Exception as err:  # the account is the point: report any failure and go on
        print(f"build failed: {type(err).__name__}: {err}", flush=True)
        return False, f"build FAILED ({type(err).__name__}; see above)"
    return True, f"build ok in {time.time() - start:.0f} s ({cuda_ext._extension_name()})"


def table(path: Path) -> str:
    data = json.loads(path.read_text())
    info, rows = data["info"], data["rows"]
    lines = [f"{info['device']} ({info['sms']} SMs)  {info['date']}  torch {info['torch']}  CUDA {info['cuda']}  "
             f"triton {info['triton']}",
             f"{'proj':<8}{'T':>3}{'share':>6}{'cuda':>9}{'padded':>9}{'triton':>9}{'tr-cmaj':>9}{'dense':>9}{'ideal':>9}"
             f"{'floor':>7}{'GB/s':>7}{'bw%':>5}{'/ideal':>8}{'/triton':>8}  (us; tr-cmaj: Triton, column-major o/down)"]
    for r in rows:
        lines.append(f"{r['projection']:<8}{r['tokens']:>3}{r['share']:>6.2f}{r['cuda_us']:>9.1f}"
                     f"{r['cuda_padded_us']:>9.1f}{fmt(r['triton_us'], '9.1f'):>9}"
                     f"{fmt(r.get('triton_cols_major_us'), '9.1f'):>9}{r['dense_us']:>9.1f}"
                     f"{r['ideal_us']:>9.1f}{r['floor_us']:>7.1f}{r['cuda_GBps']:>7.0f}{100 * r['cuda_bw_share']:>5.0f}"
                     f"{r['cuda_vs_ideal']:>8.2f}{fmt(r['cuda_vs_triton'], '8.2f'):>8}")
    if rows:
        lines.append(f"copy bandwidth (read + write): {rows[0]['copy_bw_GBps']:.0f} GB/s; floor = active bytes at it")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-tests", action="store_true",
                        help="skip tests/test_cuda_ext.py and tests/test_csrc_compiles.py after the build")
    parser.add_argument("--skip-bench", action="store_true", help="skip the benchmark next to Triton")
    parser.add_argument("--verbose-build", action="store_true", help="show the ninja/nvcc commands")
    args = parser.parse_args()
    import torch
    summary = [environment()]
    print(summary[0], flush=True)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to do here (the CPU runs tests/test_cuda_ext.py's CPU part and "
              "tests/test_csrc_compiles.py)")
        return 1
    ok, line = build(args.verbose_build)
    summary.append(line)
    rc = 0 if ok else 1
    if not args.skip_tests:
        code, last = run([sys.executable, "-m", "pytest", "tests/test_cuda_ext.py", "tests/test_csrc_compiles.py",
                          "-q", "-rfEs", "-p", "no:cacheprovider"])
        summary.append(f"tests: exit {code}: {last}")
        rc |= code
    result = None
    if ok and not args.skip_bench:
        before = set(RESULTS.glob("cuda_ext-*.json"))
        if importlib.util.find_spec("pytest_benchmark") is not None:
            code, last = run([sys.executable, "-m", "pytest", "benchmarks/test_cuda_ext.py", "--benchmark-only", "-q",
                              "-p", "no:cacheprovider", "--benchmark-columns=median"])
        else:
            code, last = run([sys.executable, "benchmarks/test_cuda_ext.py"])
        summary.append(f"benchmark: exit {code}: {last}")
        rc |= code
        result = newest_result("cuda_ext", before)
    print("\n" + "\n".join(summary))
    if result is not None:
        print(table(result))
    elif not args.skip_bench:
        print("no benchmark results were written")
        rc |= 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
