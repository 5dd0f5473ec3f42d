"""The torch backend's products by weight runs against the references, and that they copy no weight."""

from __future__ import annotations

import pytest
import torch

from adaptive_kernels.ops.projections import gather_cols_linear_reference, gather_rows_linear_reference
from adaptive_kernels.ops.runs import cols_linear_by_runs, index_runs, rows_linear_by_runs, swiglu_by_runs
from adaptive_kernels.ops.swiglu import gathered_swiglu_reference

from oracles import WeightCopies

from ._util import check, generator, index_lists, randn

D, N = 19, 23
KINDS = ["runs", "scattered", "shifted", "all"]


def _runs_by_definition(row: list[int]) -> list[tuple[int, int, int]]:
    """Runs of one list, entry by entry: a run continues while an entry is the one before it plus one."""
    runs = []
    for at, value in enumerate(row):
        if value < 0:
            continue
        if runs and runs[-1][0] + runs[-1][2] == at and runs[-1][1] + runs[-1][2] == value:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((at, value, 1))
    return runs


@pytest.mark.parametrize("kind", KINDS)
def test_index_runs_are_the_maximal_runs_of_consecutive_entries(kind):
    gen = generator("index runs", kind)
    rows = index_lists([17, 4, 0, 23], N, gen, kind, unit=3)
    rows[1, 1] = rows[1, 0]  # a duplicate breaks a run
    assert index_runs(rows) == [_runs_by_definition(r) for r in rows.tolist()]
    assert index_runs(torch.tensor([[0, 1, 2, -1, 3, 4], [7, 8, -1, -1, 9, 5]])) == [[(0, 0, 3), (4, 3, 2)],
                                                                                     [(0, 7, 2), (4, 9, 1), (5, 5, 1)]]
    assert index_runs(torch.tensor([[3, -1, 0, 1]])) == [[(0, 3, 1), (2, 0, 2)]]  # 0 does not extend the -1's run
    assert index_runs(torch.zeros(2, 0, dtype=torch.int64)) == [[], []]  # lists of no entries


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", KINDS)
def test_products_by_runs_equal_the_references_and_their_gradients(kind, dtype):
    gen = generator("by runs", kind, dtype)
    T = 5
    index = index_lists([17, 4, 0], N, gen, kind, unit=3)
    x = randn(3, T, D, gen=gen, dtype=dtype).requires_grad_()
    a = randn(3, T, index.shape[1], gen=gen, dtype=dtype).requires_grad_()
    w, w_up = randn(N, D, gen=gen, dtype=dtype).requires_grad_(), randn(N, D, gen=gen, dtype=dtype).requires_grad_()
    bias = randn(N, gen=gen, dtype=dtype).requires_grad_()
    cases = [(rows_linear_by_runs, gather_rows_linear_reference, (x, w, index, bias)),
             (cols_linear_by_runs, gather_cols_linear_reference, (a, w.t(), index)),
             (swiglu_by_runs, gathered_swiglu_reference, (x, w, w_up, index)),
             (swiglu_by_runs, gathered_swiglu_reference, (x, w, w_up, None))]
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)  # float64's own
    for by_runs, reference, args in cases:
        got, want = by_runs(*args), reference(*args)
        assert got.dtype == dtype
        torch.testing.assert_close(got, want, **tol)
        inputs = [t for t in args if isinstance(t, torch.Tensor) and t.requires_grad]
        upstream = torch.randn(want.shape, generator=gen, dtype=dtype)
        for g, h in zip(torch.autograd.grad(got, inputs, upstream), torch.autograd.grad(want, inputs, upstream)):
            torch.testing.assert_close(g, h, **tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_products_by_runs_are_within_rounding_of_the_exact_ones(dtype):
    """Many runs (scattered entries): the column products sum theirs in float32 and round once."""
    gen = generator("half by runs", dtype)
    index = index_lists([23, 15], N, gen, "scattered")
    x, w, w_up, bias = (randn(*shape, gen=gen, dtype=dtype) for shape in ((2, 3, D), (N, D), (N, D), (N,)))
    a = randn(2, 3, index.shape[1], gen=gen, dtype=dtype)
    cases = [(rows_linear_by_runs, gather_rows_linear_reference, (x, w, index, bias)),
             (cols_linear_by_runs, gather_cols_linear_reference, (a, w.t(), index)),
             (swiglu_by_runs, gathered_swiglu_reference, (x, w, w_up, index))]
    for by_runs, reference, args in cases:
        exact = [t.double() if t.is_floating_point() else t for t in args]  # the same values, no rounding
        check(by_runs(*args), reference(*exact).float(), dtype)


def test_half_precision_column_products_by_runs_sum_in_float32():
    """Over 4096 scattered columns (a run each), each column's product is rounded to float16 and the sum once: the
    error's RMS stays within 2**-11 of the products' RMS sum and the result, where a float16 running sum would
    round at every addition (about ten times more)."""
    gen = generator("float32 sum by runs")
    n = 4096
    cols = index_lists([n], n, gen, "scattered")
    a, w = randn(1, 4, n, gen=gen, dtype=torch.float16), randn(16, n, gen=gen, dtype=torch.float16)
    terms = a.double()[0, :, None, :] * w.double()[:, cols[0]]  # [T, D, n]
    exact = terms.sum(-1)
    error = cols_linear_by_runs(a, w, cols)[0].double() - exact
    bound = 2 ** -11 * (terms.square().sum(-1).sqrt() + exact.abs())
    assert error.square().mean().sqrt() <= bound.square().mean().sqrt()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_products_by_runs_under_autocast_give_autocasts_dtype(dtype):
    """As F.linear and the references: bfloat16 products of float32 inputs under CPU autocast, and float64 ones of
    float64 inputs, which autocast leaves alone."""
    gen = generator("autocast by runs", dtype)
    index = index_lists([7, 3], N, gen, "runs", unit=3)
    x, a = randn(2, 3, D, gen=gen, dtype=dtype), randn(2, 3, 7, gen=gen, dtype=dtype)
    w, w_up = randn(N, D, gen=gen, dtype=dtype), randn(N, D, gen=gen, dtype=dtype)
    product, tol = (torch.bfloat16, 4e-2) if dtype == torch.float32 else (torch.float64, 1e-12)
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        for got, want in ((rows_linear_by_runs(x, w, index), gather_rows_linear_reference(x, w, index)),
                          (cols_linear_by_runs(a, w.t(), index), gather_cols_linear_reference(a, w.t(), index)),
                          (swiglu_by_runs(x, w, w_up, index), gathered_swiglu_reference(x, w, w_up, index))):
            assert got.dtype == want.dtype == product
            torch.testing.assert_close(got.double(), want.double(), atol=tol, rtol=tol)


def test_products_by_runs_copy_no_weight():
    gen = generator("no copies")
    index = index_lists([11, 6], N, gen, "runs", unit=3)
    x, w, w_up, bias = (randn(2, 4, D, gen=gen), randn(N, D, gen=gen), randn(N, D, gen=gen), randn(N, gen=gen))
    a = randn(2, 4, index.shape[1], gen=gen)
    watched = WeightCopies([w, w_up, bias])
    with watched:
        rows_linear_by_runs(x, w, index, bias), cols_linear_by_runs(a, w.t(), index), swiglu_by_runs(x, w, w_up, index)
    assert watched.copies == []
    with watched:  # the check sees the references' copies
        gather_rows_linear_reference(x, w, index, bias)
    assert "aten::index" in watched.copies
