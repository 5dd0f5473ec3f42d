"""Backends: which implementation of the gathered ops the patched model calls.

The model code calls only the functions of a ``Backend``; ``"torch"`` runs the plain
PyTorch references (anywhere; the speed baseline), ``"triton"`` the Triton kernels (default on
CUDA), ``"cuda"`` the csrc extension's decode GEMV where it applies and Triton elsewhere (CUDA
only; built on first use). A backend changes speed, never results.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .ops import attention, norm, projections, rotary, swiglu

BACKENDS = ("torch", "triton", "cuda")


@dataclass(frozen=True)
class Backend:
    """``rows_linear(x, W, rows, bias)``, ``cols_linear(a, W, cols)``, ``swiglu(x, Wg, Wu, rows)``,
    ``attention(q, k, v, q_to_kv, kv_valid, scale)``, ``rms_norm(x, weight, eps, residual)`` and
    ``rotary(x, cos, sin)``, with the semantics of ``ops``."""

    name: str
    rows_linear: Callable
    cols_linear: Callable
    swiglu: Callable
    attention: Callable
    rms_norm: Callable
    rotary: Callable


def _torch_backend() -> Backend:
    return Backend("torch", projections.gather_rows_linear_reference, projections.gather_cols_linear_reference,
                   swiglu.gathered_swiglu_reference, attention.head_sparse_attention_reference,
                   norm.rms_norm_reference, rotary.rotary_reference)


def _triton_backend() -> Backend:
    return Backend("triton", projections.gather_rows_linear, projections.gather_cols_linear,
                   swiglu.gathered_swiglu, attention.head_sparse_attention, norm.rms_norm, rotary.rotary)


def default_backend(device: torch.device) -> str:
    """``"triton"`` for CUDA tensors, ``"torch"`` elsewhere."""
    return "triton" if device.type == "cuda" else "torch"


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
