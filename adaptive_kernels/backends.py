"""Backends: which implementation of the gathered ops the patched model calls.

The model code calls only the functions of a ``Backend``; ``"torch"`` runs plain PyTorch
(anywhere; the speed baseline: the references, but for products that read weight runs as views,
``ops.runs``, outside graph-safe requests), ``"triton"`` the Triton kernels (default on
CUDA), ``"cuda"`` the csrc extension's decode GEMV where it applies and Triton elsewhere (CUDA
only; built on first use). A backend changes speed, never results.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .graphs import runs_graph_safe
from .ops import attention, norm, projections, rotary, runs, swiglu
from .ops._library import FLOAT_DTYPES, HAS_TRITON, INTERPRET

BACKENDS = ("torch", "triton", "cuda")


@dataclass(frozen=True)
class Backend:
    """``rows_linear(x, W, rows, bias)``, ``cols_linear(a, W, cols)``, ``swiglu(x, Wg, Wu, rows)``,
    ``attention(q, k, v, q_to_kv, kv_valid, scale)``, ``rms_norm(x, weight, eps, residual)`` and
    ``rotary(x, cos, sin)``, with the semantics of ``ops``. ``kernel_layout``: ``patch`` lays the weights
    out for the kernels (q, k, v stacked in one tensor; o and down column by column), else stock's layout
    stays. ``replays_decode``: decode steps may be CUDA-graph replays (not where products read index values
    on the host). ``follows_autocast``: under ``torch.autocast`` its products compute in autocast's dtype, as
    stock's do (else the patched decoder runs with autocast off, in the model's dtype)."""

    name: str
    rows_linear: Callable
    cols_linear: Callable
    swiglu: Callable
    attention: Callable
    rms_norm: Callable
    rotary: Callable
    kernel_layout: bool = True
    replays_decode: bool = True
    follows_autocast: bool = False


@dataclass(frozen=True)
class _ByRuns:
    """A product computed ``by_runs`` (weight runs read as views; the index values read on the host), or
    ``gathered`` (a copy of the listed weight rows) where a request reads nothing back to the host
    (``graph_safe``, capture)."""

    by_runs: Callable
    gathered: Callable

    def __call__(self, x, *args):
        return self.gathered(x, *args) if runs_graph_safe(x) else self.by_runs(x, *args)


def _torch_backend() -> Backend:
    return Backend("torch", _ByRuns(runs.rows_linear_by_runs, projections.gather_rows_linear_reference),
                   _ByRuns(runs.cols_linear_by_runs, projections.gather_cols_linear_reference),
                   _ByRuns(runs.swiglu_by_runs, swiglu.gathered_swiglu_reference),
                   attention.head_sparse_attention_reference, norm.rms_norm_reference, rotary.rotary_reference,
                   kernel_layout=False, replays_decode=False, follows_autocast=True)


def _triton_backend() -> Backend:
    return Backend("triton", projections.gather_rows_linear, projections.gather_cols_linear,
                   swiglu.gathered_swiglu, attention.head_sparse_attention, norm.rms_norm, rotary.rotary)


def default_backend(device: torch.device, dtype: torch.dtype) -> str:
    """``"triton"`` for a model on CUDA in a dtype the kernels take (float32, float16, bfloat16) when Triton
    is installed, ``"torch"`` otherwise."""
    return "triton" if device.type == "cuda" and dtype in FLOAT_DTYPES and HAS_TRITON else "torch"


def check_backend(name: str, device: torch.device, dtype: torch.dtype) -> None:
    """``ValueError`` naming ``backend`` when the backend ``name`` (one of ``BACKENDS``) cannot run a model
    on ``device`` in ``dtype``: at patch time, rather than in the first op called."""
    if name == "torch":
        return
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"backend={name!r} computes in float32, float16 or bfloat16, but the model is {dtype}; "
                         "convert it with model.to(...) first, or use backend='torch'")
    if not HAS_TRITON:
        raise ValueError(f"backend={name!r} needs the triton package, which is not installed; use backend='torch'")
    if name == "cuda" and device.type != "cuda":
        raise ValueError(f"backend='cuda' runs CUDA kernels, but the model is on {device}; "
                         "move it with model.to('cuda') first, or use backend='torch'")
    if device.type != "cuda" and not INTERPRET:
        raise ValueError(f"backend='triton' runs on the {device} only in Triton's interpreter: set TRITON_INTERPRET=1 "
                         "before importing adaptive_kernels (slow), or use backend='torch'")
    if device.type != "cuda" and dtype == torch.bfloat16:
        raise ValueError(f"backend='triton' runs on the {device} in Triton's interpreter, whose bfloat16 arithmetic is "
                         "wrong (float32 and float16 are right); use one of those, or backend='torch'")


def check_backends(option: str, names, device: torch.device, dtype: torch.dtype) -> None:
    """``check_backend`` for each of ``names``, its ``ValueError`` prefixed with ``option`` (the argument that
    listed them)."""
    for name in names:
        try:
            check_backend(name, device, dtype)
        except ValueError as refused:
            raise ValueError(f"{option}: {refused}") from None


def get_backend(name: str) -> Backend:
    """The backend called ``name``; ``ValueError`` for names outside ``BACKENDS``."""
    if name == "torch":
        return _torch_backend()
    if name == "triton":
        return _triton_backend()
    if name == "cuda":
        from .cuda_ext import cuda_backend

        return cuda_backend()
    raise ValueError(f"backend must be one of {BACKENDS} or None, got {name!r}")
