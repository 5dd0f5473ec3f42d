"""Gathered projections: matrix products that read only the active rows or columns of a weight.

Active units are given as index lists into the weight (``-1`` pads a row of the batch that has
fewer active units than the longest one). The PyTorch references below gather per call; they
define the semantics the kernels must match.
"""

from __future__ import annotations

import torch


def gather_rows_linear_reference(x: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor,
                                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y[r, t, j] = x[r, t] . weight[rows[r, j]] (+ bias[rows[r, j]])``, 0 where ``rows[r, j] < 0``.

    x [R, T, D]; weight [N, D]; rows int64 [R, n]; bias [N] or None -> y [R, T, n].
    Output-side gather for q, k, v, gate and up projections.
    """
    valid = rows >= 0
    index = rows.clamp_min(0)
    y = torch.matmul(x, weight[index].transpose(1, 2))
    if bias is not None:
        y = y + bias[index].unsqueeze(1)
    return y.masked_fill(~valid.unsqueeze(1), 0)


def gather_cols_linear_reference(a: torch.Tensor, weight: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``y[r, t] = sum_j a[r, t, j] * weight[:, cols[r, j]]`` over ``cols[r, j] >= 0``.

    a [R, T, n]; weight [D, N]; cols int64 [R, n] -> y [R, T, D].
    Reduction-side gather for the o and down projections.
    """
    valid = cols >= 0
    w = weight.t()[cols.clamp_min(0)]
    return torch.matmul(a.masked_fill(~valid.unsqueeze(1), 0), w)
