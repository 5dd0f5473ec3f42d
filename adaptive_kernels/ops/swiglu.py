"""SwiGLU over the active MLP neurons only: the gate and up projections fused with the activation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .projections import gather_rows_linear_reference


def gathered_swiglu_reference(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                              rows: torch.Tensor | None) -> torch.Tensor:
    """``h[r, t, j] = silu(x[r, t] . w_gate[rows[r, j]]) * (x[r, t] . w_up[rows[r, j]])``, 0 where ``rows[r, j] < 0``.

    x [R, T, D]; w_gate, w_up [M, D]; rows int64 [R, n], or None for every neuron (n = M, no
    gather) -> h [R, T, n].
    """
    if rows is None:
        return F.silu(F.linear(x, w_gate)) * F.linear(x, w_up)
    gate = gather_rows_linear_reference(x, w_gate, rows)
    up = gather_rows_linear_reference(x, w_up, rows)
    return F.silu(gate) * up


# ---------------------------------------------------------------------------------------------
# Triton: the gathered row-projection kernel of projections.py with a second weight (GATED), so
# gate and up share each loaded x tile and the activation is applied before the one store.
# ---------------------------------------------------------------------------------------------

from torch.utils.flop_counter import register_flop_formula  # noqa: E402

from ._library import active_count, call_directly, check_tensors, differentiate_by_reference  # noqa: E402
from .projections import check_rows_launch, rows_launch  # noqa: E402

DECODE_TOKENS = 16
"""Tokens per row up to which every-neuron SwiGLU runs as the fused Triton kernel (a GEMV at one token, tiles of
16 rows above) rather than as two products and an elementwise kernel. Measured on an H100 at one token only: 68 us
against 77 us for cuBLAS's two products and two elementwise kernels."""


def _swiglu_launch(x, w_gate, w_up, rows):
    check_tensors("gathered_swiglu", w_up=w_up)  # the custom op passes a None w_up on, which would mean ungated
    if rows is not None:
        return rows_launch("gathered_swiglu", x, w_gate, rows, None, w_up)
    every = torch.arange(w_gate.shape[0], device=x.device).expand(x.shape[0], -1)
    if x.shape[1] <= DECODE_TOKENS:
        return rows_launch("gathered_swiglu", x, w_gate, every, None, w_up)
    check_rows_launch("gathered_swiglu", x, w_gate, every, None, w_up)  # the kernel's errors, then
    return F.silu(F.linear(x, w_gate)) * F.linear(x, w_up)  # cuBLAS's products, the faster over many tokens


@torch.library.custom_op("adaptive_kernels::gathered_swiglu", mutates_args=())
def _gathered_swiglu_op(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                        rows: torch.Tensor | None) -> torch.Tensor:
    return _swiglu_launch(x, w_gate, w_up, rows)


@_gathered_swiglu_op.register_fake
def _(x, w_gate, w_up, rows):
    return x.new_empty((x.shape[0], x.shape[1], w_gate.shape[0] if rows is None else rows.shape[1]))


differentiate_by_reference(_gathered_swiglu_op, gathered_swiglu_reference)


@register_flop_formula(torch.ops.adaptive_kernels.gathered_swiglu, get_raw=True)
def _swiglu_flops(x, w_gate, w_up, rows, *, out_val=None) -> int:
    R, T, D = x.shape
    return 4 * T * (R * w_gate.shape[0] if rows is None else active_count(rows)) * D


def gathered_swiglu(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """``h[r, t, j] = silu(x[r, t] . w_gate[rows[r, j]]) * (x[r, t] . w_up[rows[r, j]])``, 0 where ``rows[r, j] < 0``.

    x [R, T, D] (any strides); w_gate, w_up [M, D]; rows int64 [R, n], or None for every neuron
    (n = M) -> h [R, T, n]. Triton, one kernel: reads only the listed rows of both weights, in
    place. Every neuron over more than 16 tokens per row runs as cuBLAS products instead, the faster
    there. The custom op ``torch.ops.adaptive_kernels.gathered_swiglu``; FLOPs counted: 4*T*D per
    listed neuron (the two products; padding counts 0).
    """
    check_tensors("gathered_swiglu", ("rows",), x=x, w_gate=w_gate, w_up=w_up, rows=rows)
    if call_directly(x, w_gate, w_up):
        return _swiglu_launch(x, w_gate, w_up, rows)
    return torch.ops.adaptive_kernels.gathered_swiglu(x, w_gate, w_up, rows)
