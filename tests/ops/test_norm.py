"""rms_norm (Triton, optionally fused with the residual add) against Llama's RMSNorm module."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from adaptive_kernels.backends import get_backend
from adaptive_kernels.errors import ArgumentTypeError
from adaptive_kernels.ops.norm import rms_norm, rms_norm_reference

from ._util import DTYPE_PARAMS, TOL, generator, randn


def stock_norm(weight: torch.Tensor, eps: float) -> LlamaRMSNorm:
    norm = LlamaRMSNorm(weight.shape[0], eps=eps).to(device=weight.device, dtype=weight.dtype)
    norm.weight.data.copy_(weight)
    return norm


def laid_out(t: torch.Tensor, layout: str) -> torch.Tensor:
    """``t``'s values with rows apart in a wider buffer ("rows apart"), stored column by column over
    the last two dims ("transposed"), or contiguous."""
    if layout == "rows apart":
        wide = torch.zeros(*t.shape[:-1], t.shape[-1] + 5, device=t.device, dtype=t.dtype)
        wide[..., 2:t.shape[-1] + 2] = t
        return wide[..., 2:t.shape[-1] + 2]
    if layout == "transposed":
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    return t


@pytest.mark.triton
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("shape", [(1, 1, 37), (3, 5, 64), (2, 7, 300)], ids=str)
@pytest.mark.parametrize("residual", [None, "contiguous", "rows apart", "transposed"])
@pytest.mark.parametrize("layout", ["rows apart", "transposed"])
def test_rms_norm_is_llamas_rms_norm(dtype, shape, residual, layout):
    gen = generator(dtype, shape, residual, layout)
    x = laid_out(randn(*shape, gen=gen, dtype=dtype), layout)
    r = laid_out(randn(*shape, gen=gen, dtype=dtype), residual) if residual else None
    D = shape[-1]
    weight = randn(D, gen=gen, dtype=dtype, scale=0.5) + 1
    eps = 1e-5
    with torch.no_grad():
        h = x if r is None else x + r
        want = stock_norm(weight, eps)(h)
        got = rms_norm(x, weight, eps, r)
    if residual:
        got, got_h = got
        torch.testing.assert_close(got_h, h, rtol=0, atol=0)  # the add rounds as the model's add
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got, want)
    ref = rms_norm_reference(x, weight, eps, r)
    torch.testing.assert_close(got, ref if r is None else ref[0])


@pytest.mark.triton
def test_fp32_weight_on_half_rows_promotes_like_llama():
    """The normed rows come out in float32, as Llama's norm gives them; with a residual the sum (the residual
    stream) stays in the rows' half precision."""
    gen = generator("promote")
    x, weight = randn(2, 3, 40, gen=gen, dtype=torch.float16), randn(40, gen=gen)
    residual = randn(2, 3, 40, gen=gen, dtype=torch.float16)
    with torch.no_grad():
        want = stock_norm(weight, 1e-6)(x)
        want_summed = stock_norm(weight, 1e-6)(x + residual)
    got = rms_norm(x, weight, 1e-6)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)
    y, h = rms_norm(x, weight, 1e-6, residual)
    assert (y.dtype, h.dtype) == (torch.float32, torch.float16)
    torch.testing.assert_close(h, x + residual, rtol=0, atol=0)
    torch.testing.assert_close(y, want_summed)


@pytest.mark.triton
def test_weight_through_its_stride():
    """A weight that is a strided view (every other element of a bigger one) is read in place."""
    gen = generator("strided weight")
    x, weight = randn(3, 40, gen=gen), randn(80, gen=gen)[::2]
    with torch.no_grad():
        want = stock_norm(weight, 1e-6)(x)
    torch.testing.assert_close(rms_norm(x, weight, 1e-6), want)


@pytest.mark.triton
def test_mismatched_arguments_are_refused():
    gen = generator("bad")
    x = randn(2, 8, gen=gen)
    with pytest.raises(ArgumentTypeError, match="residual must match x"):  # another dtype, as weight's
        rms_norm(x, randn(8, gen=gen), 1e-6, randn(2, 8, gen=gen, dtype=torch.float16))
    with pytest.raises(ValueError, match="residual must match x") as refused:  # another shape
        rms_norm(x, randn(8, gen=gen), 1e-6, randn(2, 7, gen=gen))
    assert not isinstance(refused.value, TypeError)
    with pytest.raises(ValueError, match=r"residual must match x \(\(2, 3, 8\), torch.float32\), got \(3, 2, 8\)"):
        rms_norm(randn(2, 3, 8, gen=gen), randn(8, gen=gen), 1e-6, randn(3, 2, 8, gen=gen))  # x's width, not its shape
    with pytest.raises(ValueError, match=r"weight must be \[8\]"):
        rms_norm(x, randn(7, gen=gen), 1e-6)
    with pytest.raises(ValueError, match="x must be .* got a 0-d tensor"):
        rms_norm(x[0, 0], randn(1, gen=gen), 1e-6)
    for bad_x, bad_w in [(x.long(), randn(8, gen=gen)), (x.double(), randn(8, gen=gen)), (x, randn(8, gen=gen).double())]:
        with pytest.raises(ArgumentTypeError, match="x and weight must be float32, float16 or bfloat16"):
            rms_norm(bad_x, bad_w, 1e-6)
    with pytest.raises(ValueError, match="x's last dimension must be at most 16384, got 16385"):  # one row in registers
        rms_norm(torch.ones(1, 16385), torch.ones(16385), 1e-6)


@pytest.mark.triton
def test_the_widest_row_held_in_registers_is_normed():
    """D = 16384, the most the kernel takes (one row in registers), runs with a residual: Llama's RMSNorm."""
    gen = generator("widest row")
    x, residual, weight = randn(2, 16384, gen=gen), randn(2, 16384, gen=gen), randn(16384, gen=gen)
    y, h = rms_norm(x, weight, 1e-6, residual)
    with torch.no_grad():
        torch.testing.assert_close(h, x + residual, rtol=0, atol=0)
        torch.testing.assert_close(y, stock_norm(weight, 1e-6)(x + residual), rtol=1e-5, atol=1e-5)


@pytest.mark.triton
def test_eps_is_a_finite_real_number_of_any_kind():
    """A NumPy eps computes as the float (it failed inside the kernel); a tensor, None, nan, inf or a negative
    eps is refused by name."""
    gen = generator("eps")
    x, w = randn(3, 40, gen=gen), randn(40, gen=gen)
    eps = np.float32(1e-5)
    torch.testing.assert_close(rms_norm(x, w, eps), rms_norm(x, w, float(eps)), rtol=0, atol=0)
    for eps, error in [(torch.tensor(1e-6), ArgumentTypeError), (None, ArgumentTypeError), (True, ArgumentTypeError),
                       (float("nan"), ValueError), (float("inf"), ValueError), (-1.0, ValueError)]:
        with pytest.raises(error, match="rms_norm: eps must be"):
            rms_norm(x, w, eps)


@pytest.mark.triton
def test_opcheck():
    gen = generator("opcheck")
    x, r, w = randn(2, 3, 24, gen=gen), randn(2, 3, 24, gen=gen), randn(24, gen=gen)
    torch.library.opcheck(torch.ops.adaptive_kernels.rms_norm.default, (x, w, 1e-6))
    torch.library.opcheck(torch.ops.adaptive_kernels.add_rms_norm.default, (x, r, w, 1e-6))


@pytest.mark.parametrize("dtype,weight_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                                (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)],
                         ids=lambda dt: str(dt).removeprefix("torch."))
@pytest.mark.parametrize("shape", [(3, 7, 64), (5, 37)], ids=str)
def test_torch_backend_is_llamas_rms_norm_bit_for_bit_with_random_weights(dtype, weight_dtype, shape):
    """The torch backend's norm rounds as LlamaRMSNorm (the normalised value to x's dtype, then times the
    weight), so with any weight, not only ones, every element equals stock's, in every dtype."""
    gen = generator("bit for bit", dtype, weight_dtype, shape)
    x = randn(*shape, gen=gen, dtype=dtype)
    r = randn(*shape, gen=gen, dtype=dtype)
    weight = randn(shape[-1], gen=gen, dtype=weight_dtype, scale=0.7) + 1
    with torch.no_grad():
        want, want_h = stock_norm(weight, 1e-5)(x), stock_norm(weight, 1e-5)(x + r)
    torch_norm = get_backend("torch").rms_norm
    got = torch_norm(x, weight, 1e-5, None)
    assert got.dtype == want.dtype == torch.promote_types(dtype, weight_dtype)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(rms_norm_reference(x, weight, 1e-5), want, rtol=0, atol=0)
    got, h = torch_norm(x, weight, 1e-5, r)
    torch.testing.assert_close(h, x + r, rtol=0, atol=0)
    torch.testing.assert_close(got, want_h, rtol=0, atol=0)


@pytest.mark.parametrize("update_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_torch_backend_adds_a_half_update_to_a_float32_stream_as_llama(update_dtype):
    """Under autocast the residual stream stays float32 while attention and MLP updates come out in half
    precision: the sum is float32, and Llama normalises it in float32 (no rounding to the update's dtype)."""
    gen = generator("mixed add", update_dtype)
    update = randn(3, 5, 48, gen=gen, dtype=update_dtype)
    stream = randn(3, 5, 48, gen=gen)
    weight = randn(48, gen=gen, scale=0.7) + 1
    with torch.no_grad():
        want = stock_norm(weight, 1e-5)(stream + update)
    got, h = get_backend("torch").rms_norm(update, weight, 1e-5, stream)
    assert h.dtype == got.dtype == torch.float32
    torch.testing.assert_close(h, stream + update, rtol=0, atol=0)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("shape", [(6, 37), (1, 5, 40)], ids=str)
def test_rows_whose_last_dim_is_not_of_unit_stride_are_read_as_their_values(dtype, shape):
    """x and residual stored column by column where [rows, D] is still a view of them (a 2-d tensor, or a leading
    dim of 1): the kernel indexes D with unit stride, so they are copied first; every element is the reference's
    on the contiguous values."""
    gen = generator("column-major rows", dtype, shape)
    x, r = (randn(*shape, gen=gen, dtype=dtype).transpose(-1, -2).contiguous().transpose(-1, -2) for _ in range(2))
    assert x.stride(-1) != 1 and x.reshape(-1, shape[-1])._base is not None  # still a view: no copy on the way
    w = randn(shape[-1], gen=gen, dtype=dtype, scale=0.5) + 1
    torch.testing.assert_close(rms_norm(x, w, 1e-5), rms_norm_reference(x.contiguous(), w, 1e-5), **TOL[dtype])
    got, got_h = rms_norm(x, w, 1e-5, r)
    want, want_h = rms_norm_reference(x.contiguous(), w, 1e-5, r.contiguous())
    torch.testing.assert_close(got_h, want_h, rtol=0, atol=0)
    torch.testing.assert_close(got, want, **TOL[dtype])


@pytest.mark.triton
def test_eps_of_zero_is_accepted_and_computes_as_the_reference():
    """eps is refused only below 0 (the documented minimum): eps=0 (and an int 0), alone and with a residual, gives
    the reference's result for every element, as a model whose config says rms_norm_eps=0 needs."""
    gen = generator("eps zero")
    x, r, w = randn(3, 5, 40, gen=gen), randn(3, 5, 40, gen=gen), randn(40, gen=gen)
    for eps in (0.0, 0):
        torch.testing.assert_close(rms_norm(x, w, eps), rms_norm_reference(x, w, 0.0), rtol=1e-5, atol=1e-5)
        for got, want in zip(rms_norm(x, w, eps, r), rms_norm_reference(x, w, 0.0, r)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.triton
@pytest.mark.parametrize("shape", [(0, 8), (2, 0, 8), (2, 0), (3, 2, 0)], ids=str)
def test_empty_inputs_give_empty_outputs(shape):
    """No row, or rows of no element: the result (and with a residual the sum) is the reference's, of x's shape."""
    gen = generator("empty norm", shape)
    x, r, w = randn(*shape, gen=gen), randn(*shape, gen=gen), randn(shape[-1], gen=gen)
    got = rms_norm(x, w, 1e-6)
    assert got.shape == x.shape and got.dtype == x.dtype
    torch.testing.assert_close(got, rms_norm_reference(x, w, 1e-6))
    for got, want in zip(rms_norm(x, w, 1e-6, r), rms_norm_reference(x, w, 1e-6, r), strict=True):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want)


@pytest.mark.triton
def test_rows_broadcast_along_their_last_dim_are_read_as_their_values():
    """x and residual whose last dim has stride 0 (one value expanded over D): every element is the reference's
    on the expanded values."""
    gen = generator("norm stride 0")
    x, r = randn(3, 4, 1, gen=gen).expand(3, 4, 24), randn(3, 4, 1, gen=gen).expand(3, 4, 24)
    w = randn(24, gen=gen)
    assert x.stride(-1) == 0
    torch.testing.assert_close(rms_norm(x, w, 1e-6), rms_norm_reference(x.contiguous(), w, 1e-6))
    for got, want in zip(rms_norm(x, w, 1e-6, r), rms_norm_reference(x.contiguous(), w, 1e-6, r.contiguous()),
                         strict=True):
        torch.testing.assert_close(got, want)
