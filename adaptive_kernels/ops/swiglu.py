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
