"""gather_rows_linear and gather_cols_linear (Triton) against their PyTorch references."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from adaptive_kernels import cuda_ext
from adaptive_kernels.ops import projections
from adaptive_kernels.ops.projections import (cols_major, gather_cols_linear, gather_cols_linear_reference,
                                              gather_rows_linear, gather_rows_linear_reference)

from ._util import DEVICE, DTYPE_PARAMS, TOL, check, generator, index_lists, randn

D, N = 67, 53  # odd sizes: no block size divides them

# (counts per batch row, index kind): different active sets per row, padded with -1
CASES = {
    "mixed-runs": ([13, 7, 0], "runs"),      # three rows: 13 units, 7, and none (all -1)
    "mixed-scattered": ([13, 9, 1], "scattered"),
    "shifted": ([40, 17], "shifted"),
    "one": ([1], "scattered"),
    "all": ([N, N], "all"),
}


@pytest.mark.triton
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("T", [1, 3, 37])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_gather_rows_linear(dtype, T, case, bias):
    gen = generator(dtype, T, case, bias)
    counts, kind = CASES[case]
    R = len(counts)
    rows = index_lists(counts, N, gen, kind)
    # x as a strided view, as the model passes projections of wider tensors
    x = randn(R, T, D + 5, gen=gen, dtype=dtype)[..., 2:D + 2]
    w = randn(N, D, gen=gen, dtype=dtype, scale=D ** -0.5)
    b = randn(N, gen=gen, dtype=dtype) if bias else None
    y = gather_rows_linear(x, w, rows, b)
    ref = gather_rows_linear_reference(x.float(), w.float(), rows, None if b is None else b.float())
    check(y, ref, dtype)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("T", [1, 3, 37])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("layout", ["row-major", "cols-major"])
def test_gather_cols_linear(dtype, T, case, layout):
    gen = generator(dtype, T, case, layout)
    counts, kind = CASES[case]
    R, n = len(counts), max(counts)
    cols = index_lists(counts, N, gen, kind)
    a = randn(R, n, T, gen=gen, dtype=dtype).transpose(1, 2)  # non-contiguous
    a[cols[:, None, :].expand(-1, T, -1) < 0] = float("nan")  # padded entries must not leak
    w = randn(D, N, gen=gen, dtype=dtype, scale=n ** -0.5)
    if layout == "cols-major":
        w = cols_major(w)
        assert w.stride() == (1, D)
    y = gather_cols_linear(a, w, cols)
    check(y, gather_cols_linear_reference(a.float(), w.float(), cols), dtype)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("split", [2, 3, 8])
def test_gather_cols_linear_split(monkeypatch, dtype, split):
    """One token on a column-major weight: columns split over programs, fp32 partials summed; up to the most
    programs `_split_columns` gives (8), as on an H100, some with no column here."""
    monkeypatch.setattr(projections, "_split_columns", lambda *args: split)
    gen = generator(dtype, split)
    cols = index_lists([N, 40, 0], N, gen, "runs")
    a = randn(3, 1, N, gen=gen, dtype=dtype)
    w = cols_major(randn(D, N, gen=gen, dtype=dtype, scale=N ** -0.5))
    check(gather_cols_linear(a, w, cols), gather_cols_linear_reference(a.float(), w.float(), cols), dtype)


@pytest.mark.triton
def test_gather_cols_linear_split_partials_stay_float32_until_summed(monkeypatch):
    """Half-precision inputs split over 4 programs whose partial sums (about +-51200) cancel to 3: kept in float32
    until summed, the result is exact; rounded to float16 each (its step there is 32) they summed to 0."""
    monkeypatch.setattr(projections, "_split_columns", lambda *args: 4)
    n = 1024
    w = torch.full((16, n), 200.0, dtype=torch.float16, device=DEVICE)
    w[:, n // 2:] = -200.0
    w[:, 0] = 203.0
    a, cols = torch.ones(1, 1, n, dtype=torch.float16, device=DEVICE), torch.arange(n, device=DEVICE)[None]
    y = gather_cols_linear(a, cols_major(w), cols)
    assert torch.equal(y, torch.full((1, 1, 16), 3.0, dtype=torch.float16, device=DEVICE))


@pytest.mark.triton
def test_gather_cols_linear_split_sums_outputs_past_one_block(monkeypatch):
    """The split's fp32 partials are summed by programs of 1024 outputs each: 3 rows of 600 outputs (1800, not a
    multiple of 1024) need a second program, which covers the rest only in part."""
    monkeypatch.setattr(projections, "_split_columns", lambda *args: 2)
    gen = generator("sum past one block")
    cols = index_lists([N, 40, 0], N, gen, "runs")
    a = randn(3, 1, N, gen=gen)
    w = cols_major(randn(600, N, gen=gen, scale=N ** -0.5))
    check(gather_cols_linear(a, w, cols), gather_cols_linear_reference(a, w, cols), torch.float32)


@pytest.mark.triton
def test_empty_index_lists():
    gen = generator(1)
    x = randn(2, 3, D, gen=gen)
    w = randn(N, D, gen=gen)
    none = torch.empty((2, 0), dtype=torch.int64, device=DEVICE)
    assert gather_rows_linear(x, w, none).shape == (2, 3, 0)
    y = gather_cols_linear(randn(2, 3, 0, gen=gen), randn(D, N, gen=gen), none)
    assert y.shape == (2, 3, D) and bool((y == 0).all())


@pytest.mark.triton
@pytest.mark.parametrize("T", [1, 3])
def test_weight_through_strides(T):
    """A weight that is a strided view (every other row, or every other column, of a bigger one) is read in
    place, as is an activation of every other column; the columns include runs longer than a block, which one
    token loads wide on a unit-stride weight."""
    gen = generator(2, T)
    rows = index_lists([9, 4], N, gen, "scattered")
    x = randn(2, T, D, gen=gen)
    w = randn(2 * N, D, gen=gen)[::2]
    check(gather_rows_linear(x, w, rows), gather_rows_linear_reference(x, w, rows), torch.float32)
    cols = index_lists([N, 20], N, gen, "all")
    a = randn(2, T, 2 * N, gen=gen)[..., ::2]  # and an activation of every other column too
    w = randn(D, 2 * N, gen=gen, scale=N ** -0.5)[:, ::2]
    assert w.stride() == (2 * N, 2) and a.stride(-1) == 2
    check(gather_cols_linear(a, w, cols), gather_cols_linear_reference(a, w, cols), torch.float32)


@pytest.mark.triton
def test_bad_arguments_are_refused_by_name():
    gen = generator("bad")
    x, w, b = randn(2, 3, D, gen=gen), randn(N, D, gen=gen), randn(N, gen=gen)
    rows = index_lists([4, 2], N, gen)
    for args, message in [((x[0], w, rows), "x must be 3-D"), ((x, w[:, :-1], rows), "weight must be"),
                          ((x, w, rows[:1]), "rows must hold one list per row of x"),
                          ((x, w, rows[:, 0]), r"x must be 3-D, weight and rows 2-D; got .* rows \(2,\)"),
                          ((x, w, rows.float()), "rows must be int64"),
                          ((x, w.half(), rows), "weight must have x's dtype"),
                          ((x, w, rows, b[:-1]), "bias must be"), ((x, w, rows, b.half()), "bias must have x's dtype"),
                          ((x, w, rows, b[:, None]), rf"bias must be \[N\] with N = {N} .*, got \({N}, 1\)"),
                          ((x, w, rows, b[None]), rf"bias must be \[N\] .*, got \(1, {N}\)"),
                          ((x, w, rows, randn(N, 3, gen=gen)), rf"bias must be \[N\] .*, got \({N}, 3\)")]:
        with pytest.raises(ValueError, match=message):
            gather_rows_linear(*args)
    a, w = randn(2, 3, 4, gen=gen), randn(D, N, gen=gen)
    for args, message in [((a, w, rows[:, :3]), "cols must be"), ((a.half(), w, rows), "weight must have a's dtype"),
                          ((a, w, rows.bool()), "cols must be int64"), ((a, w[0], rows), "weight and cols 2-D")]:
        with pytest.raises(ValueError, match=message):
            gather_cols_linear(*args)


@pytest.mark.triton
def test_opcheck():
    gen = generator(3)
    rows = index_lists([5, 3], 11, gen, "runs")
    x, w, b = randn(2, 3, 9, gen=gen), randn(11, 9, gen=gen), randn(11, gen=gen)
    torch.library.opcheck(torch.ops.adaptive_kernels.gather_rows_linear.default, (x, w, rows, b))
    torch.library.opcheck(torch.ops.adaptive_kernels.gather_rows_linear.default, (x, w, rows, None))
    torch.library.opcheck(torch.ops.adaptive_kernels.gather_cols_linear.default, (randn(2, 3, 5, gen=gen), randn(9, 11, gen=gen), rows))


@pytest.mark.triton
def test_flop_count():
    gen = generator(4)
    R, T, n = 2, 3, 7
    rows = index_lists([n, 4], N, gen, "runs")
    with FlopCounterMode(display=False) as counter:
        gather_rows_linear(randn(R, T, D, gen=gen), randn(N, D, gen=gen), rows)
        gather_cols_linear(randn(R, T, n, gen=gen), randn(D, N, gen=gen), rows)
    assert counter.get_total_flops() == 2 * (2 * T * (n + 4) * D)  # the padding of the shorter list counts 0


def _almost_run(n, at, other):
    """range(n) with entry ``at`` replaced by ``other``: its 16-wide block a run of consecutive columns but for it."""
    cols = torch.arange(n)
    cols[at] = other
    return cols


# one row of columns each (width 32: two 16-wide blocks); the odd entry last, first or inside a block
ALMOST_RUNS = {
    "first block, last entry": _almost_run(32, 15, 40),
    "second block, last entry": _almost_run(32, 31, 50),
    "first block, inside": _almost_run(32, 7, 45),
    "second block, first entry": _almost_run(32, 16, 43),
    "first block, last entry -1": _almost_run(32, 15, -1),
    "run from 16, last entry": torch.cat([torch.arange(16, 31), torch.tensor([2]), torch.arange(32, 48)]),
}


@pytest.mark.triton
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("case", list(ALMOST_RUNS))
def test_gather_cols_linear_almost_runs(dtype, case):
    """One token on a row-major weight, where a block of consecutive aligned columns loads wide: a block that is
    a run except for one entry (the last one included) must still read that entry's own column."""
    gen = generator("almost", dtype, case)
    cols = ALMOST_RUNS[case]
    cols = torch.stack([cols, cols.roll(16)]).to(DEVICE)  # the odd entry in the other block in row 1
    a = randn(2, 1, cols.shape[1], gen=gen, dtype=dtype)
    w = randn(D, N, gen=gen, dtype=dtype, scale=N ** -0.5)
    assert w.stride(1) == 1
    check(gather_cols_linear(a, w, cols), gather_cols_linear_reference(a.float(), w.float(), cols), dtype)


@pytest.mark.triton
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in Triton's interpreter
@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_padded_rows_give_zero_whatever_x_holds(T, bias):
    """0 where rows < 0, even when x holds inf or NaN (whose products with the unread weight would be NaN);
    the listed rows get the reference's infinities and NaNs."""
    gen = generator("inf", T, bias)
    rows = torch.tensor([[4, -1, 17, -1, 9], [-1, 30, -1, -1, 2]], device=DEVICE)
    x = randn(2, T, D, gen=gen)
    x[0, 0, 3] = float("inf")
    x[1, T - 1, 40] = float("-inf")
    x[1, 0, 7] = float("nan")
    w = randn(N, D, gen=gen, scale=D ** -0.5)
    b = randn(N, gen=gen) if bias else None
    y = gather_rows_linear(x, w, rows, b)
    padded = (rows < 0)[:, None, :].expand_as(y)
    assert bool((y[padded] == 0).all()), y[padded]
    torch.testing.assert_close(y, gather_rows_linear_reference(x, w, rows, b), equal_nan=True, **TOL[torch.float32])


# index lists with padded (-1) entries; a padded entry could point at column 0
PADDED_COLUMNS = {
    "scattered": [[3, -1, 5, -1], [-1, -1, -1, -1], [8, 2, 11, 6]],
    # a 16-wide block that would be one aligned run of columns (0, 1, ..., 15) were its first entry not padded
    "run but for a padded first entry": [[-1] + list(range(1, 16)), [-1] * 16],
}


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in Triton's interpreter
@pytest.mark.parametrize("op", [pytest.param(gather_cols_linear, marks=pytest.mark.triton),
                                gather_cols_linear_reference,
                                pytest.param(cuda_ext.gather_cols_linear, marks=pytest.mark.skipif(
                                    DEVICE != "cuda", reason="the CUDA extension's op needs a CUDA device"))],
                         ids=["triton", "reference", "cuda"])
@pytest.mark.parametrize("case", list(PADDED_COLUMNS))
@pytest.mark.parametrize("T", [1, 3])
def test_padded_columns_add_nothing_whatever_the_weight_holds(op, case, T):
    """Padded (-1) entries add nothing, even where every unlisted column of the weight holds inf, NaN or -inf
    (column 0, where a padded entry could point, among them): the sum over the listed columns, taken here one
    column at a time."""
    gen = generator("inf-cols", case, T)
    cols = torch.tensor(PADDED_COLUMNS[case], device=DEVICE)
    a = randn(cols.shape[0], T, cols.shape[1], gen=gen)
    w = randn(D, N, gen=gen, scale=0.5)
    unlisted = sorted(set(range(N)) - set(cols.flatten().tolist()))
    not_finite = torch.tensor([float("inf"), float("nan"), float("-inf")], device=DEVICE)
    w[:, unlisted] = not_finite[torch.arange(len(unlisted)) % 3]  # inf, NaN, -inf, inf, ...
    want = torch.zeros(cols.shape[0], T, D, dtype=torch.float64, device=DEVICE)
    for r, j in (cols >= 0).nonzero().tolist():
        want[r] += a[r, :, j, None].double() * w[:, cols[r, j]].double()
    torch.testing.assert_close(op(a, w, cols).double(), want, **TOL[torch.float32])


@pytest.mark.triton
@pytest.mark.parametrize("T", [1, 5, 37])
def test_rows_weight_and_index_list_through_their_strides(T):
    """A weight stored column by column (its last dim not of unit stride, a transposed view), an index list and a
    bias that are strided views (every other entry of wider ones) are each read through their own strides."""
    gen = generator("rows strides", T)
    rows = index_lists([N, 23, 7], N, gen, "scattered")
    rows_view = torch.stack([rows, torch.full_like(rows, 1)], -1)[..., 0]  # stride 2; the skipped entries are 1
    assert rows_view.stride(1) == 2
    x = randn(3, T, D, gen=gen)
    w = cols_major(randn(N, D, gen=gen, scale=D ** -0.5))
    b = randn(2 * N, gen=gen)[::2]
    assert w.stride() == (1, N) and b.stride() == (2,)
    check(gather_rows_linear(x, w, rows_view, b), gather_rows_linear_reference(x, w, rows, b), torch.float32)


@pytest.mark.triton
@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("layout", ["row-major", "cols-major"])
def test_cols_index_list_through_its_strides(T, layout):
    """An index list that is a strided view (every other entry of a wider one) is read through its stride, in whole
    blocks and in the last, partial one."""
    gen = generator("cols index stride", T, layout)
    cols = index_lists([N, 37, 0], N, gen, "runs")
    cols_view = torch.stack([cols, torch.full_like(cols, 1)], -1)[..., 0]
    assert cols_view.stride(1) == 2
    a = randn(3, T, N, gen=gen)
    w = randn(D, N, gen=gen, scale=N ** -0.5)
    w = cols_major(w) if layout == "cols-major" else w
    check(gather_cols_linear(a, w, cols_view), gather_cols_linear_reference(a, w, cols), torch.float32)


@pytest.mark.parametrize("values", ["meta", "fake"])
def test_flop_count_on_tensors_without_values_counts_every_listed_entry(values):
    """On meta tensors (shapes only, as a FLOP estimate of a big model without its weights is made) and fake ones
    (torch.compile's tracing) the index values cannot be read: every entry of each list counts, padding included,
    rather than none."""
    gen = generator("flops without values", values)
    R, T, width = 2, 5, 9
    tensors = [index_lists([width, 4], N, gen, "scattered"), randn(R, T, D, gen=gen), randn(N, D, gen=gen),
               randn(R, T, width, gen=gen), randn(D, N, gen=gen)]
    mode = contextlib.nullcontext() if values == "meta" else FakeTensorMode()
    rows, x, w, a, wt = (t.to("meta") if values == "meta" else mode.from_tensor(t) for t in tensors)
    with mode:
        for op, args in ((gather_rows_linear, (x, w, rows)), (gather_cols_linear, (a, wt, rows))):
            with FlopCounterMode(display=False) as counter:
                op(*args)
            assert counter.get_total_flops() == 2 * T * (R * width) * D, op.__name__
