"""The CUDA C++ extension (csrc/): decode-regime gathered projections and plan compaction on the device.

The cuda backend runs the gathered-rows GEMV for its decode steps' row-gathered products (q, k and v) and the plan
compaction, and Triton for the rest (``cuda_backend``); the gathered-columns GEMV here is benchmarked against
Triton's, which reads o and down in that backend.

Importing this module needs no GPU and no compiler: it defines the operators
``adaptive_kernels::cuda_gather_rows_linear``, ``::cuda_gather_cols_linear`` and
``::cuda_compact_plan`` (schemas, fake implementations for ``torch.compile``, FLOP formulas) in
Python. Their CUDA implementations live in csrc/ and are compiled with ninja on first use
(``load()``, called by each op wrapper here and by ``cuda_backend()``) through
``torch.utils.cpp_extension.load``; the build is cached under ``TORCH_EXTENSIONS_DIR`` (default
``~/.cache/torch_extensions``) in a folder named after a hash of the sources, so later runs reuse
it and an edited source gets a fresh build. Without a CUDA toolchain ``load()`` raises a
``RuntimeError`` that says what is missing; the rest of the package does not need it.

The kernels read the weights in place (no copy, only the listed rows or columns), accumulate in
fp32, and never synchronise with the host, so they can be captured in CUDA graphs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from pathlib import Path

import torch
from torch.utils.flop_counter import register_flop_formula

from .ops._library import differentiate_by_reference
from .ops.projections import (check_gather_args, gather_cols_flops, gather_cols_linear_reference, gather_rows_flops,
                              gather_rows_linear_reference)
from .plan import CompactPlan, DecoderShape, ExecutionPlan, check_compaction

__all__ = ["DECODE_MAX_TOKENS", "compact_plan", "cuda_backend",
           "gather_cols_linear", "gather_rows_linear", "load", "toolchain_problem"]

DECODE_MAX_TOKENS = 16
"""Tokens per batch row up to which the cuda backend runs the GEMV kernels (above: the Triton ops)."""
MAX_BATCH_ROWS = 65535
"""Batch rows up to which the cuda backend runs the GEMV kernels (above: the Triton ops): the limit of their
grid's y dimension, one block row per batch row."""
MAX_UNITS = 1024
"""Most heads (and groups) per layer that ``compact_plan`` takes (csrc's kMaxUnits)."""

CSRC = Path(__file__).resolve().parent.parent / "csrc"
SOURCES = ("bindings.cpp", "gather_rows.cu", "gather_cols.cu", "compact_plan.cu")
HEADERS = ("adaptive_kernels.h", "gemv_common.cuh")

# ---------------------------------------------------------------------------------------------
# Operators: defined here, implemented for CUDA by csrc/bindings.cpp
# ---------------------------------------------------------------------------------------------

_lib = torch.library.Library("adaptive_kernels", "FRAGMENT")
_lib.define("cuda_gather_rows_linear(Tensor x, Tensor weight, Tensor rows, Tensor? bias=None) -> Tensor")
_lib.define("cuda_gather_cols_linear(Tensor a, Tensor weight, Tensor cols) -> Tensor")
_lib.define("cuda_compact_plan(Tensor heads, Tensor groups, int head_dim, int num_kv_heads, int intermediate_size)"
            " -> (Tensor, Tensor, Tensor, Tensor, Tensor)")


@torch.library.register_fake("adaptive_kernels::cuda_gather_rows_linear", lib=_lib)
def _(x, weight, rows, bias=None):
    return x.new_empty((x.shape[0], x.shape[1], rows.shape[1]))


@torch.library.register_fake("adaptive_kernels::cuda_gather_cols_linear", lib=_lib)
def _(a, weight, cols):
    return a.new_empty((a.shape[0], a.shape[1], weight.shape[0]))


@torch.library.register_fake("adaptive_kernels::cuda_compact_plan", lib=_lib)
def _(heads, groups, head_dim, num_kv_heads, intermediate_size):
    B, L, H = heads.shape
    index = dict(dtype=torch.int64)
    return (heads.new_empty((B, L, H * head_dim), **index), heads.new_empty((B, L, num_kv_heads * head_dim), **index),
            heads.new_empty((B, L, H), **index), heads.new_empty((B, L, intermediate_size), **index),
            heads.new_empty((B, L, 3), **index))


def _not_on_cpu(name):
    def refuse(*args, **kwargs):
        raise ValueError(f"adaptive_kernels::{name} runs on CUDA tensors only, got CPU tensors; "
                         "use the PyTorch references (backend='torch') on the CPU")
    return refuse


for _name in ("cuda_gather_rows_linear", "cuda_gather_cols_linear", "cuda_compact_plan"):
    _lib.impl(_name, _not_on_cpu(_name), "CPU")


differentiate_by_reference("adaptive_kernels::cuda_gather_rows_linear", gather_rows_linear_reference)
differentiate_by_reference("adaptive_kernels::cuda_gather_cols_linear", gather_cols_linear_reference)


register_flop_formula(torch.ops.adaptive_kernels.cuda_gather_rows_linear, get_raw=True)(gather_rows_flops)
register_flop_formula(torch.ops.adaptive_kernels.cuda_gather_cols_linear, get_raw=True)(gather_cols_flops)


# ---------------------------------------------------------------------------------------------
# Building and loading csrc/
# ---------------------------------------------------------------------------------------------

_load_lock = threading.Lock()
_loaded = False


def toolchain_problem() -> str | None:
    """Why csrc/ cannot be built here (a sentence), or None when torch, nvcc, ninja and the sources are present."""
    if torch.version.cuda is None:
        return f"this torch build ({torch.__version__}) has no CUDA support"
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None:
        return "no CUDA toolkit was found (nvcc is not on PATH and CUDA_HOME is not set)"
    nvcc = Path(cpp_extension.CUDA_HOME, "bin", "nvcc")
    if not nvcc.exists():
        return f"CUDA_HOME is {cpp_extension.CUDA_HOME}, but it has no bin/nvcc"
    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    missing = [name for name in SOURCES + HEADERS if not (CSRC / name).is_file()]
    if missing:
        return f"the sources {missing} are missing from {CSRC} (csrc/ comes with the source checkout)"
    return None


def _extension_name() -> str:
    digest = hashlib.sha256()
    for name in SOURCES + HEADERS:
        digest.update(name.encode() + b"\0" + (CSRC / name).read_bytes())
    return f"adaptive_kernels_cuda_{digest.hexdigest()[:12]}"


def load(verbose: bool = False) -> None:
    """Build csrc/ (first call in a fresh cache: about a minute) and register its CUDA kernels; idempotent.

    Raises ``RuntimeError`` naming what is missing when there is no CUDA toolchain, or with the
    compiler's output when the build fails.
    """
    global _loaded
    if _loaded:
        return
    with _load_lock:
        if _loaded:
            return
        problem = toolchain_problem()
        if problem is not None:
            raise RuntimeError(f"backend='cuda' compiles the CUDA sources in {CSRC} on first use, but {problem}. "
                               "Use backend='triton' (the default on CUDA) or backend='torch'.")
        from torch.utils import cpp_extension

        cpp_extension.load(name=_extension_name(), sources=[str(CSRC / name) for name in SOURCES],
                           extra_include_paths=[str(CSRC)], extra_cflags=["-O3"],
                           extra_cuda_cflags=["-O3", "-lineinfo"], is_python_module=False, verbose=verbose)
        _loaded = True


# ---------------------------------------------------------------------------------------------
# Gathered projections (decode regime)
# ---------------------------------------------------------------------------------------------

def _check_gemv(op: str, act_name: str, act, weight, index_name: str, index, bias=None) -> None:
    """Clear errors, naming the argument, for what the GEMV kernels cannot take; checked here, before
    the extension is called (its own checks only guard direct ``torch.ops`` calls): the arguments of any
    gathered product (``check_gather_args``: one device among them), at most ``DECODE_MAX_TOKENS`` tokens and
    ``MAX_BATCH_ROWS`` rows, CUDA tensors."""
    check_gather_args(op, act_name, act, weight, index_name, index, bias)
    for dim, what, most in ((1, "tokens per row", DECODE_MAX_TOKENS), (0, "batch rows", MAX_BATCH_ROWS)):
        if act.shape[dim] > most:
            raise ValueError(f"{op}: the GEMV kernels take at most {most} {what} ({act_name}.shape[{dim}]), got "
                             f"{act.shape[dim]}; the Triton ops (adaptive_kernels.ops.projections) take any number")
    tensors = {act_name: act, "weight": weight, index_name: index} | ({} if bias is None else {"bias": bias})
    if any(t.device.type != "cuda" for t in tensors.values()):
        where = ", ".join(f"{name} on {t.device}" for name, t in tensors.items())
        raise ValueError(f"{op}: the GEMV kernels take CUDA tensors, got {where}")


def gather_rows_linear(x: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y[r, t, j] = x[r, t] . weight[rows[r, j]] (+ bias[rows[r, j]])``, 0 where ``rows[r, j] < 0``.

    x [R, T, D] with T <= 16 (any strides); weight [N, D]; rows int64 [R, n] (entries in [-1, N));
    bias [N] or None -> y [R, T, n], x's dtype (float32, float16 or bfloat16; fp32 accumulation).
    CUDA split-K GEMV that reads only the listed weight rows, in place, with 16-byte loads when the
    weight's rows are 16-byte aligned (else element by element). The custom op
    ``torch.ops.adaptive_kernels.cuda_gather_rows_linear``; FLOPs counted: 2*T*D per listed row (padding
    counts 0).
    """
    _check_gemv("gather_rows_linear", "x", x, weight, "rows", rows, bias)
    load()
    return torch.ops.adaptive_kernels.cuda_gather_rows_linear(x, weight, rows, bias)


def gather_cols_linear(a: torch.Tensor, weight: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``y[r, t] = sum_j a[r, t, j] * weight[:, cols[r, j]]`` over ``cols[r, j] >= 0``.

    a [R, T, n] with T <= 16 (any strides); weight [D, N]; cols int64 [R, n] (entries in [-1, N))
    -> y [R, T, D], a's dtype (float32, float16 or bfloat16; fp32 accumulation). CUDA split-K GEMV
    that reads only the listed weight columns, in place: a run of consecutive, 16-byte aligned
    columns (whole heads or neuron groups in ascending order) is read with 16-byte loads from a
    row-major weight; other entries and layouts element by element. ``a`` at a padded entry is
    never read. The custom op ``torch.ops.adaptive_kernels.cuda_gather_cols_linear``; FLOPs
    counted: 2*T*D per listed column (padding counts 0).
    """
    _check_gemv("gather_cols_linear", "a", a, weight, "cols", cols)
    load()
    return torch.ops.adaptive_kernels.cuda_gather_cols_linear(a, weight, cols)


# ---------------------------------------------------------------------------------------------
# Plan compaction
# ---------------------------------------------------------------------------------------------

def _check_compactable(plan: ExecutionPlan, shape: DecoderShape) -> None:
    check_compaction(plan, shape)
    if plan.num_heads > MAX_UNITS:
        raise ValueError(f"compact_plan takes at most {MAX_UNITS} heads and groups per layer, got {plan.num_heads}")


def compact_plan(plan: ExecutionPlan, shape: DecoderShape) -> CompactPlan:
    """``buffer[b, l] = the weight rows of the units on in mask[b, l], ascending, then -1 up to the full count``,
    for every (batch row, layer) of ``plan`` in one launch on its CUDA device.

    plan.heads [B, L, H], plan.groups [B, L, G] (G MLP groups of M // G neurons, the first M % G
    one more; M = shape.intermediate_size) -> ``CompactPlan``: q_rows [B, L, H*d], kv_rows
    [B, L, Hkv*d], q_to_kv [B, L, H], mlp_rows [B, L, M], counts [B, L] each. Reads nothing back
    to the host, so it may run inside CUDA-graph capture. Same result as ``compact_plan`` of the module
    ``adaptive_kernels.plan`` (torch ops, several launches). The custom op
    ``torch.ops.adaptive_kernels.cuda_compact_plan`` (its last output, counts [B, L, 3], is split here into the three
    count fields).
    """
    _check_compactable(plan, shape)
    if plan.heads.device.type != "cuda":
        raise ValueError(f"compact_plan builds the buffers on the plan's CUDA device; this plan is on "
                         f"{plan.heads.device}: move it with plan.to('cuda'), or use the torch one "
                         f"(from adaptive_kernels.plan import compact_plan)")
    load()
    q_rows, kv_rows, q_to_kv, mlp_rows, counts = torch.ops.adaptive_kernels.cuda_compact_plan(
        plan.heads, plan.groups, shape.head_dim, shape.num_kv_heads, shape.intermediate_size)
    return CompactPlan(q_rows, kv_rows, q_to_kv, mlp_rows, counts[..., 0], counts[..., 1], counts[..., 2])


# ---------------------------------------------------------------------------------------------
# The backend
# ---------------------------------------------------------------------------------------------

def cuda_backend():
    """The ``"cuda"`` ``backends.Backend``: the CUDA GEMV kernels in the decode regime, Triton elsewhere.

    ``rows_linear`` calls ``gather_rows_linear`` of this module for 1 to ``DECODE_MAX_TOKENS`` tokens per row
    (and up to ``MAX_BATCH_ROWS`` rows). Everything else runs the Triton ops: ``cols_linear`` too, as a
    patched model keeps the o/down weights column-major, which Triton reads fastest (this module's
    ``gather_cols_linear`` reads row-major ones), and ``swiglu``, ``attention``, ``rms_norm`` and ``rotary``.
    Builds csrc/ on the first call (``load``), so a missing toolchain is reported here, before any request.
    """
    from .backends import get_backend

    load()
    triton = get_backend("triton")

    def rows_linear(x, weight, rows, bias=None):
        if x.shape[1] <= DECODE_MAX_TOKENS and x.shape[0] <= MAX_BATCH_ROWS:
            return gather_rows_linear(x, weight, rows, bias)
        return triton.rows_linear(x, weight, rows, bias)

    return dataclasses.replace(triton, name="cuda", rows_linear=rows_linear)
