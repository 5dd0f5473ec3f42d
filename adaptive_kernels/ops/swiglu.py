"""SwiGLU over the active MLP neurons only: the gate and up projections fused with the activation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .projections import gather_rows_linear_reference


def gathered_swiglu_reference(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, rows: torch.Tensor,
                              act=F.silu) -> torch.Tensor:
    """``h[r, t, j] = act(x[r, t] . w_gate[rows[r, j]]) * (x[r, t] . w_up[rows[r, j]])``, 0 where ``rows[r, j] < 0``.

    x [R, T, D]; w_gate, w_up [M, D]; rows int64 [R, n] -> h [R, T, n].
    """
    gate = gather_rows_linear_reference(x, w_gate, rows)
    up = gather_rows_linear_reference(x, w_up, rows)
    return act(gate) * up


# ---------------------------------------------------------------------------------------------
# Triton: the gathered row-projection kernel of projections.py with a second weight (GATED), so
# gate and up share each loaded x tile and the activation is applied before the one store.
# ---------------------------------------------------------------------------------------------

from torch.utils.flop_counter import register_flop_formula  # noqa: E402

from ._library import call_directly  # noqa: E402
from .projections import _rows_launch  # noqa: E402


@torch.library.custom_op("adaptive_kernels::gathered_swiglu", mutates_args=())
def _gathered_swiglu_op(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return _rows_launch("gathered_swiglu", x, w_gate, rows, None, w_up)


@_gathered_swiglu_op.register_fake
def _(x, w_gate, w_up, rows):
    return x.new_empty((x.shape[0], x.shape[1], rows.shape[1]))


@register_flop_formula(torch.ops.adaptive_kernels.gathered_swiglu)
def _swiglu_flops(x_shape, w_gate_shape, w_up_shape, rows_shape, *args, **kwargs) -> int:
    R, T, D = x_shape
    return 4 * R * T * rows_shape[1] * D


def gathered_swiglu(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``h[r, t, j] = silu(x[r, t] . w_gate[rows[r, j]]) * (x[r, t] . w_up[rows[r, j]])``, 0 where ``rows[r, j] < 0``.

    x [R, T, D] (any strides); w_gate, w_up [M, D]; rows int64 [R, n] -> h [R, T, n].
    Triton, one kernel: reads only the listed rows of both weights, in place; silu only (for
    another activation use ``gathered_swiglu_reference``). The custom op
    ``torch.ops.adaptive_kernels.gathered_swiglu``; FLOPs counted: 4*R*T*n*D (the two products).
    """
    if call_directly(x, w_gate, w_up):
        return _rows_launch("gathered_swiglu", x, w_gate, rows, None, w_up)
    return torch.ops.adaptive_kernels.gathered_swiglu(x, w_gate, w_up, rows)
