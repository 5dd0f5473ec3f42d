"""Gathered products in plain PyTorch that copy no weight: each run of consecutive listed rows (or
columns) of a weight is read as a view of it, one product per run.

The torch backend's projections outside graph-safe requests. They compute what the references of
``projections`` and ``swiglu`` define (which gather the listed rows into a copy per call), reading the
index values on the host (on CUDA, a copy back and a synchronisation per product); the column products
sum their runs one after another, so they agree with the references to rounding.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .swiglu import gathered_swiglu_reference


def index_runs(index: torch.Tensor) -> list[list[tuple[int, int, int]]]:
    """Per row of an index list [R, n], its runs of consecutive entries (each one more than the one
    before), padding (< 0) left out, as ``(position in the list, first entry, length)``."""
    values = index.cpu().numpy()
    on = values >= 0
    continues = np.zeros_like(on)  # the entry extends the run of the one before it
    continues[:, 1:] = on[:, 1:] & on[:, :-1] & (values[:, 1:] == values[:, :-1] + 1)
    starts, ends = on & ~continues, on.copy()
    ends[:, :-1] &= ~continues[:, 1:]  # the next entry does not extend the run
    return [[(b, int(values[r, b]), e - b + 1) for b, e in zip(np.flatnonzero(starts[r]).tolist(),
                                                                   np.flatnonzero(ends[r]).tolist())]
            for r in range(values.shape[0])]


def rows_linear_by_runs(x: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """``gather_rows_linear_reference(x, weight, rows, bias)``: x [R, T, D], weight [N, D], rows [R, n],
    bias [N] or None -> [R, T, n], each run of rows one ``F.linear`` on a view of ``weight``."""
    y = x.new_zeros(x.shape[0], x.shape[1], rows.shape[1])
    for r, runs in enumerate(index_runs(rows)):
        for at, first, n in runs:
            part = slice(first, first + n)
            y[r, :, at:at + n] = F.linear(x[r], weight[part], None if bias is None else bias[part])
    return y


def cols_linear_by_runs(a: torch.Tensor, weight: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``gather_cols_linear_reference(a, weight, cols)``: a [R, T, n], weight [D, N], cols [R, n] -> [R, T, D],
    the products of each run of columns (views of ``weight``) summed."""
    y = a.new_zeros(a.shape[0], a.shape[1], weight.shape[0])
    for r, runs in enumerate(index_runs(cols)):
        for at, first, n in runs:
            y[r] += F.linear(a[r, :, at:at + n], weight[:, first:first + n])
    return y


def swiglu_by_runs(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                   rows: torch.Tensor | None) -> torch.Tensor:
    """``gathered_swiglu_reference(x, w_gate, w_up, rows)`` with the gate and up rows read by runs."""
    if rows is None:
        return gathered_swiglu_reference(x, w_gate, w_up, None)
    return F.silu(rows_linear_by_runs(x, w_gate, rows)) * rows_linear_by_runs(x, w_up, rows)
