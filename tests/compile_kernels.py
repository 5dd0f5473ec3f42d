"""Compile every Triton kernel a patched model launches for an NVIDIA GPU, on a machine without one.

    python tests/compile_kernels.py [--arch 90] [--dtypes bfloat16 float16] [--all-configs]

Triton is pointed at a stand-in driver that reports the target GPU; each kernel launch is turned
into ``triton.compile`` for that target (through ptxas, to a cubin) and is not run. The launches
come from patched LLaVA models (LLaVA-1.5-7B decoder widths with 2 layers, and odd toy widths) doing
``generate`` with a dense and a partial batch-2 plan at 300 and 5 prompt tokens (the
many-token, few-token and one-token regimes of every op), plus the column gather on row-major
weights. Kernel outputs are left uninitialised; only compilation is checked. With
``--all-configs`` every autotune config is compiled, as autotuning on a GPU would; otherwise the
first of each regime (as ``ADAPTIVE_KERNELS_AUTOTUNE=0`` runs).

Prints one line per compiled specialisation and ends with ``compiled N, failed M, kernels K``;
exit status 1 when anything failed to compile or a regime's first config needs more shared
memory than the target has (a later config that does not fit is listed: autotuning skips it).
Run it with another installed Triton (e.g. the GPU machine's version) on PYTHONPATH to check that
version too.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ["TRITON_INTERPRET"] = "0"  # before Triton or the package is imported: real kernels
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default; silences its warning

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402

SHARED_MEMORY = {80: 166912, 86: 101376, 89: 101376, 90: 232448}  # bytes per block, by compute capability
SMS = {80: 108, 86: 84, 89: 128, 90: 132}


class CompileOnlyDriver:
    """What ``JITFunction.run`` asks of the active driver, for a GPU that is not there."""

    def __init__(self, target: GPUTarget):
        self.target = target

    def is_active(self) -> bool:
        return True

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device=None) -> int:
        return 0


class Compiler:
    """A ``jit_cache_hook``: compiles each new specialisation for ``target`` and skips the launch."""

    def __init__(self, target: GPUTarget, shared_limit: int):
        self.target, self.shared_limit = target, shared_limit
        self.compiled: list[str] = []
        self.failed: list[str] = []
        self.kernels: set[str] = set()
        self.seen: set[tuple] = set()
        self.optional = False  # compiling a config autotuning may drop (not the first of its regime)
        self.dropped: list[str] = []

    def __call__(self, *, fn, compile, **_) -> bool:
        jit = fn.jit_function
        options = {k: compile[k] for k in ("num_warps", "num_ctas", "num_stages", "enable_fp_fusion")}
        seen = (id(jit), str(compile["key"]), tuple(options.values()))
        if seen in self.seen:  # launches skipped here never reach Triton's own cache
            return True
        self.seen.add(seen)
        constants = ", ".join(f"{jit.arg_names[path[0]]}={value}" for path, value in compile["constants"].items())
        pointers = ", ".join(f"{name}:{kind}" for name, kind in compile["signature"].items() if kind.startswith("*"))
        label = f"{jit.__name__}[warps={options['num_warps']}, stages={options['num_stages']}]({constants}; {pointers})"
        source = triton.compiler.ASTSource(jit, compile["signature"], compile["constants"], compile["configs"][0])
        start = time.time()
        try:
            kernel = triton.compile(source, target=self.target, options=options)
        except Exception as error:  # noqa: BLE001 - every compiler error is a finding
            self.failed.append(f"{label}\n    {type(error).__name__}: {str(error).strip()[:1500]}")
            return True
        shared = kernel.metadata.shared
        if shared > self.shared_limit:
            why = f"{label}\n    needs {shared} bytes of shared memory, the target has {self.shared_limit}"
            (self.dropped if self.optional else self.failed).append(why)
        else:
            self.compiled.append(label)
            self.kernels.add(jit.__name__)
            print(f"ok {time.time() - start:5.1f} s  shared {shared:6d}  {label}", flush=True)
        return True  # handled: do not compile again for the (absent) device, do not launch


def compile_every_config(compiler: Compiler):
    """An ``Autotuner.run`` that compiles the kernel under each of its configs instead of timing them.
    A later config that does not fit the target is only reported: autotuning skips it on a GPU."""
    def run(tuner: Autotuner, *args, **kwargs):
        for index, config in enumerate(tuner.configs):
            compiler.optional = index > 0
            tuner.fn.run(*args, **kwargs, **config.all_kwargs())
        compiler.optional = False
    return run


def launch_from_models(dtype: torch.dtype) -> None:
    """Prefill and decode of patched LLaVAs (7B decoder widths and toy ones) under dense and partial plans.

    At 7B widths every layer runs partially on every row that runs it, so that no dense product
    (cuBLAS's, computed for real on the CPU, and slow there) runs; the toy model runs dense too.
    """
    import adaptive_kernels as ak
    from adaptive_kernels.tiny import tiny_llava

    widths = [(dict(num_layers=2, num_heads=32, num_kv_heads=32, hidden_size=4096, intermediate_size=11008), False),
              (dict(num_layers=2, num_heads=8, num_kv_heads=4, hidden_size=64, intermediate_size=172), True)]
    for sizes, dense_too in widths:
        model = tiny_llava(**sizes).to(dtype)
        ak.patch(model, "H", rank=2, num_prefix_layers=1, backend="triton")
        L, H = sizes["num_layers"], sizes["num_heads"]
        partial = ak.ExecutionPlan.full(2, L, H)
        partial.heads[0, :, H // 2:] = False  # row 0: half the heads and a quarter of the groups
        partial.groups[0, :, H // 4:] = False
        partial.layers[1, 1] = partial.heads[1, 1] = partial.groups[1, 1] = False  # row 1 skips layer 1
        partial.heads[1, 0, 1:3] = partial.groups[1, 0, :1] = False  # and runs layer 0 partially
        plans = [ak.ExecutionPlan.full(2, L, H), partial] if dense_too else [partial]
        for tokens in (300, 5):  # 300: many-token tiles, and a decode cache long enough to split keys
            ids = torch.randint(1, 500, (2, tokens))
            mask = torch.ones_like(ids)
            mask[1, :2] = 0  # left padding
            for plan in plans:
                with torch.no_grad():
                    model.generate(input_ids=ids, attention_mask=mask, execution_plan=plan, max_new_tokens=2,
                                   do_sample=False, pad_token_id=0)


def launch_row_major_gathers(dtype: torch.dtype) -> None:
    """The column gather on row-major weights (patched models keep o/down column-major)."""
    from adaptive_kernels.ops.projections import gather_cols_linear

    weight = torch.randn(4096, 4096, dtype=dtype)
    for tokens in (1, 3, 24):
        cols = torch.randperm(4096)[:1024].sort().values[None]
        gather_cols_linear(torch.randn(1, tokens, 1024, dtype=dtype), weight, cols)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, choices=sorted(SHARED_MEMORY), help="compute capability x10 (default: %(default)s)")
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16"],
                        choices=["bfloat16", "float16", "float32"], help="default: %(default)s")
    parser.add_argument("--all-configs", action="store_true", help="compile every autotune config")
    args = parser.parse_args()
    os.environ["ADAPTIVE_KERNELS_AUTOTUNE"] = "1" if args.all_configs else "0"
    target = GPUTarget("cuda", args.arch, 32)
    driver.set_active(CompileOnlyDriver(target))
    compiler = Compiler(target, SHARED_MEMORY[args.arch])
    triton.knobs.runtime.jit_cache_hook = compiler
    if args.all_configs:
        Autotuner.run = compile_every_config(compiler)

    import adaptive_kernels
    from adaptive_kernels.models import llama
    from adaptive_kernels.ops import attention, norm, projections, rotary, swiglu

    for module in (adaptive_kernels, llama):  # patch's and each call's check: CPU models stand in for CUDA ones
        module.check_backend = lambda name, device, dtype: None
    for module in (attention, norm, projections, rotary, swiglu):  # ... and CPU tensors for CUDA ones
        if hasattr(module, "check_launch"):
            module.check_launch = lambda op, *tensors: None
        if hasattr(module, "num_sms"):
            module.num_sms = lambda device_index: SMS[args.arch]

    print(f"triton {triton.__version__}, target sm_{args.arch}, dtypes {args.dtypes}, "
          f"{'every config' if args.all_configs else 'first configs'}", flush=True)
    torch.manual_seed(0)
    for name in args.dtypes:
        dtype = getattr(torch, name)
        launch_from_models(dtype)
        launch_row_major_gathers(dtype)
    for dropped in compiler.dropped:
        print("autotuning skips", dropped)
    for failure in compiler.failed:
        print("FAILED", failure)
    print(f"compiled {len(compiler.compiled)}, failed {len(compiler.failed)}, "
          f"kernels {len(compiler.kernels)}: {' '.join(sorted(compiler.kernels))}")
    return 1 if compiler.failed else 0


if __name__ == "__main__":
    sys.exit(main())
