"""Gathered products in plain PyTorch that copy no weight: each run of consecutive listed rows (or
columns) of a weight is read as a view of it, one product per run.

The torch backend's projections outside graph-safe requests. They compute what the references of
``projections`` and ``swiglu`` define (which gather the listed rows into a copy per call), reading the
index values on the host (on CUDA, a copy back and a synchronisation per product); the column products
sum their runs one after another (in float32, or float64 for float64), so they agree with the references to
rounding.
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


def _product_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of ``F.linear`` on ``x``: autocast's where it is on for x's device, else x's (autocast leaves
    float64 alone)."""
    device = x.device.type
    casts = torch.is_autocast_enabled(device) and x.dtype != torch.float64
    return torch.get_autocast_dtype(device) if casts else x.dtype


def _rows_linear(x, weight, bias, runs: list, width: int) -> torch.Tensor:
    """The rows product over ``runs`` (``index_runs`` of a list ``width`` entries wide)."""
    y = x.new_zeros(x.shape[0], x.shape[1], width, dtype=_product_dtype(x))
    for r, row_runs in enumerate(runs):
        for at, first, length in row_runs:
            part = slice(first, first + length)
            y[r, :, at:at + length] = F.linear(x[r], weight[part], None if bias is None else bias[part])
    return y


def rows_linear_by_runs(x: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """``gather_rows_linear_reference(x, weight, rows, bias)``: x [R, T, D], weight [N, D], rows [R, n],
    bias [N] or None -> [R, T, n], each run of rows one ``F.linear`` on a view of ``weight``."""
    return _rows_linear(x, weight, bias, index_runs(rows), rows.shape[1])


def cols_linear_by_runs(a: torch.Tensor, weight: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``gather_cols_linear_reference(a, weight, cols)``: a [R, T, n], weight [D, N], cols [R, n] -> [R, T, D],
    the products of each run of columns (views of ``weight``) summed in float32 (float64 products in float64),
    rounded once."""
    dtype = _product_dtype(a)
    y = a.new_zeros(a.shape[0], a.shape[1], weight.shape[0], dtype=torch.promote_types(dtype, torch.float32))
    for r, row_runs in enumerate(index_runs(cols)):
        for at, first, length in row_runs:
            y[r] += F.linear(a[r, :, at:at + length], weight[:, first:first + length])
    return y.to(dtype)


def swiglu_by_runs(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                   rows: torch.Tensor | None) -> torch.Tensor:
    """``gathered_swiglu_reference(x, w_gate, w_up, rows)`` with the gate and up rows read by runs."""
    if rows is None:
        return gathered_swiglu_reference(x, w_gate, w_up, None)
    runs, width = index_runs(rows), rows.shape[1]
    return F.silu(_rows_linear(x, w_gate, None, runs, width)) * _rows_linear(x, w_up, None, runs, width)
