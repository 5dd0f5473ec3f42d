"""gathered_swiglu (Triton, fused) against its PyTorch reference."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from adaptive_kernels.errors import ArgumentTypeError
from adaptive_kernels.ops.swiglu import gathered_swiglu, gathered_swiglu_reference

from ._util import DEVICE, DTYPE_PARAMS, check, generator, index_lists, randn

pytestmark = pytest.mark.triton

D, M = 67, 59
CASES = {
    "mixed-runs": ([14, 6, 0], "runs"),
    "mixed-scattered": ([11, 13, 2], "scattered"),
    "shifted": ([40, 17], "shifted"),
    "one": ([1], "runs"),
    "all": ([M], "all"),
}


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("T", [1, 3, 37])
@pytest.mark.parametrize("case", list(CASES))
def test_gathered_swiglu(dtype, T, case):
    gen = generator(dtype, T, case)
    counts, kind = CASES[case]
    rows = index_lists(counts, M, gen, kind)
    x = randn(len(counts), D + 3, T, gen=gen, dtype=dtype).transpose(1, 2)[..., :D]  # strided view
    wg = randn(M, D, gen=gen, dtype=dtype, scale=2 * D ** -0.5)
    wu = randn(M, D, gen=gen, dtype=dtype, scale=D ** -0.5)
    h = gathered_swiglu(x, wg, wu, rows)
    check(h, gathered_swiglu_reference(x.float(), wg.float(), wu.float(), rows), dtype)


def test_empty():
    gen = generator(1)
    h = gathered_swiglu(randn(2, 3, D, gen=gen), randn(M, D, gen=gen), randn(M, D, gen=gen),
                        torch.empty((2, 0), dtype=torch.int64, device=DEVICE))
    assert h.shape == (2, 3, 0)


def test_opcheck_and_flops():
    gen = generator(2)
    rows = index_lists([5, 2], 11, gen, "runs")
    args = (randn(2, 3, 9, gen=gen), randn(11, 9, gen=gen), randn(11, 9, gen=gen), rows)
    torch.library.opcheck(torch.ops.adaptive_kernels.gathered_swiglu.default, args)
    with FlopCounterMode(display=False) as counter:
        gathered_swiglu(*args)
    assert counter.get_total_flops() == 4 * 3 * (5 + 2) * 9  # the padding of the shorter list counts 0
    with FlopCounterMode(display=False) as counter:
        gathered_swiglu(*args[:3], None)
    assert counter.get_total_flops() == 4 * 3 * (2 * 11) * 9  # every neuron of both rows


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("T", [1, 16, 17])
def test_every_neuron_without_a_list(dtype, T):
    """rows=None: every neuron (the fused GEMV up to 16 tokens per row, cuBLAS products above)."""
    gen = generator("all", dtype, T)
    x = randn(2, T, D, gen=gen, dtype=dtype)
    wg = randn(M, D, gen=gen, dtype=dtype, scale=2 * D ** -0.5)
    wu = randn(M, D, gen=gen, dtype=dtype, scale=D ** -0.5)
    every = torch.arange(M, device=DEVICE).expand(2, M)
    want = gathered_swiglu_reference(x.float(), wg.float(), wu.float(), every)
    check(gathered_swiglu(x, wg, wu, None), want, dtype)
    check(gathered_swiglu_reference(x, wg, wu, None), want, dtype)
    torch.library.opcheck(torch.ops.adaptive_kernels.gathered_swiglu.default, (x, wg, wu, None))


@pytest.mark.parametrize("T", [16, 17])
def test_bad_arguments_are_refused_without_a_list(T):
    """rows=None checks its arguments on both paths (the fused GEMV and cuBLAS's products)."""
    gen = generator("bad", T)
    x, wg, wu = randn(2, T, D, gen=gen), randn(M, D, gen=gen), randn(M, D, gen=gen)
    for args, message in [((x, wg, wu[:1]), "w_up must match w_gate"), ((x.double(), wg.double(), wu.double()),
                                                                          "x must be float32, float16 or bfloat16"),
                          ((x, wg[:, :-1], wu[:, :-1]), "w_gate must be")]:
        with pytest.raises(ValueError, match=message):
            gathered_swiglu(*args, None)
    for weights in ((wg, wu.half()), (wg.half(), wu)):  # another dtype in either weight: a type error alike
        with pytest.raises(ArgumentTypeError, match="w_up must match w_gate|w_gate must have x's dtype"):
            gathered_swiglu(x, *weights, None)


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("strided", ["w_up", "w_gate"])
def test_gate_and_up_each_through_its_own_strides(dtype, T, strided):
    """One of w_gate, w_up a strided view (every other row of a bigger weight), the other contiguous: each is
    read through its own strides, with a list and with rows=None."""
    gen = generator("own strides", dtype, T, strided)
    rows = index_lists([14, 5, 9], M, gen, "scattered")
    x = randn(3, T, D, gen=gen, dtype=dtype)
    wg = randn(M, D, gen=gen, dtype=dtype, scale=2 * D ** -0.5)
    wu = randn(M, D, gen=gen, dtype=dtype, scale=D ** -0.5)
    if strided == "w_up":
        wu_view, wg_view = torch.stack([wu, torch.zeros_like(wu)], 1).flatten(0, 1)[::2], wg
    else:
        wu_view, wg_view = wu, torch.stack([wg, torch.zeros_like(wg)], 1).flatten(0, 1)[::2]
    assert wg_view.stride() != wu_view.stride()
    for lists in (rows, None):
        want = gathered_swiglu_reference(x.float(), wg.float(), wu.float(), lists)
        check(gathered_swiglu(x, wg_view, wu_view, lists), want, dtype)


@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("transposed", ["w_up", "w_gate"])
def test_gate_or_up_stored_column_by_column(T, transposed):
    """One of w_gate, w_up stored column by column (a transposed view: its last dim not of unit stride), the other
    contiguous: each is read through both of its own strides."""
    gen = generator("column by column", T, transposed)
    rows = index_lists([M, 14, 5], M, gen, "scattered")
    x = randn(3, T, D, gen=gen)
    wg = randn(M, D, gen=gen, scale=2 * D ** -0.5)
    wu = randn(M, D, gen=gen, scale=D ** -0.5)
    wg_view, wu_view = (wg, wu.t().contiguous().t()) if transposed == "w_up" else (wg.t().contiguous().t(), wu)
    assert wg_view.stride() != wu_view.stride()
    for lists in (rows, None):
        want = gathered_swiglu_reference(x, wg, wu, lists)
        check(gathered_swiglu(x, wg_view, wu_view, lists), want, torch.float32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="TF32 exists on CUDA only; the interpreter ignores it")
def test_float32_swiglu_on_cuda_is_within_fp32_rounding_of_the_float64_reference():
    """float32 products at full precision, as the reference's: a TF32 product would be off by about 1e-3 relative
    at D = 1024; full fp32 stays within 1e-5."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 1024, generator=gen).cuda()
    wg, wu = (torch.randn(300, 1024, generator=gen).cuda() / 32 for _ in range(2))
    rows = torch.stack([torch.randperm(300, generator=gen)[:97] for _ in range(2)]).cuda()
    got = gathered_swiglu(x, wg, wu, rows).double()
    want = gathered_swiglu_reference(x.double(), wg.double(), wu.double(), rows)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
