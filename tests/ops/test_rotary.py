"""rotary (Triton) against Llama's apply_rotary_pos_emb."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from adaptive_kernels.errors import ArgumentTypeError
from adaptive_kernels.ops.rotary import rotary, rotary_reference

from ._util import DTYPE_PARAMS, generator, randn

pytestmark = pytest.mark.triton


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("R,T,nh,d", [(1, 1, 3, 8), (2, 5, 7, 24), (3, 4, 70, 6), (1, 2, 131, 4)])  # 131: two head blocks
def test_rotary_is_llamas_rotary(dtype, R, T, nh, d):
    gen = generator(dtype, R, T, nh, d)
    qk = randn(R, T, nh * d + 5, gen=gen, dtype=dtype)[..., 1:nh * d + 1].view(R, T, nh, d)  # strided, offset
    angles = randn(R, T, d // 2, gen=gen) * 3
    cos = torch.cat([angles.cos(), angles.cos()], -1).to(dtype)
    sin = torch.cat([angles.sin(), angles.sin()], -1).to(dtype)
    want, _ = apply_rotary_pos_emb(qk, qk, cos, sin, unsqueeze_dim=2)
    got = rotary(qk, cos, sin)
    assert got.dtype == dtype and got.shape == want.shape
    # rounded step by step as the eager formula, fp32 included (the kernel is built without fused multiply-adds)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(rotary_reference(qk, cos, sin), want, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rotary_takes_cos_and_sin_whose_halves_differ(dtype):
    """The op's contract is any cos and sin [R, T, d], not only Llama's, whose two halves repeat."""
    gen = generator("halves", dtype)
    qk = randn(2, 3, 5, 8, gen=gen, dtype=dtype)
    cos, sin = randn(2, 3, 8, gen=gen, dtype=dtype), randn(2, 3, 8, gen=gen, dtype=dtype)
    want, _ = apply_rotary_pos_emb(qk, qk, cos, sin, unsqueeze_dim=2)
    torch.testing.assert_close(rotary(qk, cos, sin), want, rtol=0, atol=0)
    torch.testing.assert_close(rotary_reference(qk, cos, sin), want, rtol=0, atol=0)


def test_bad_arguments_are_refused():
    gen = generator("bad")
    x = randn(1, 2, 3, 5, gen=gen)
    with pytest.raises(ValueError, match="d even"):
        rotary(x, randn(1, 2, 5, gen=gen), randn(1, 2, 5, gen=gen))
    x, cos, sin = randn(1, 2, 3, 4, gen=gen), randn(1, 2, 4, gen=gen), randn(1, 2, 4, gen=gen)
    with pytest.raises(ValueError, match=r"x must be \[R, T, heads, d\], got \(2, 3, 4\)"):
        rotary(x[0], cos, sin)
    with pytest.raises(ValueError, match=r"x must be \[R, T, heads, d\], got \(1, 2, 1, 3, 4\)"):
        rotary(x[:, :, None], cos, sin)
    for args in [(x, cos.half(), sin), (x.half(), cos.half(), sin), (x.double(), cos.double(), sin.double()),
                 (x.int(), cos.int(), sin.int())]:
        with pytest.raises(ArgumentTypeError, match="x, cos and sin must share one dtype of float32, float16 or bf"):
            rotary(*args)
    for shape in [(2, 2, 4), (1, 1, 4), (1, 3, 4), (1, 2, 6)]:  # more or fewer rows or tokens, a wider last dim
        other = randn(*shape, gen=gen)
        for args in [(x, other, sin), (x, cos, other)]:  # read in part or past its end
            with pytest.raises(ValueError, match=r"cos, sin \[R, T, d\]; got x"):
                rotary(*args)


def test_opcheck():
    gen = generator("opcheck")
    x = randn(2, 3, 4, 8, gen=gen)
    torch.library.opcheck(torch.ops.adaptive_kernels.rotary.default, (x, randn(2, 3, 8, gen=gen), randn(2, 3, 8, gen=gen)))


def _laid_out(x, cos, sin, layout):
    """x [R, T, nh, d], cos, sin [R, T, d] with the same values in the memory layout ``layout``."""
    if layout == "x head dim strided":  # stored [R, T, d, nh]: the last dim of x has stride nh
        x = x.transpose(-1, -2).contiguous().transpose(-1, -2)
    elif layout == "sin strides differ":  # stored [T, R, d]: sin's row and token strides are not cos's
        sin = sin.transpose(0, 1).contiguous().transpose(0, 1)
    elif layout == "cos strides differ":  # cos a slice of a wider buffer, sin contiguous
        wide = torch.zeros(*cos.shape[:-1], cos.shape[-1] + 7, device=cos.device, dtype=cos.dtype)
        wide[..., 3:cos.shape[-1] + 3] = cos
        cos = wide[..., 3:cos.shape[-1] + 3]
    elif layout == "cos and sin last dim strided":  # cos, sin every other element of wider ones
        cos = torch.stack([cos, torch.zeros_like(cos)], -1).flatten(-2)[..., ::2]
        sin = torch.stack([sin, torch.zeros_like(sin)], -1).flatten(-2)[..., ::2]
    return x, cos, sin


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("layout", ["x head dim strided", "sin strides differ", "cos strides differ",
                                    "cos and sin last dim strided"])
def test_rotary_reads_each_input_through_its_own_strides(dtype, layout):
    """x of any strides (its last dim too), cos and sin each through its own strides: values count, not layout."""
    gen = generator("strides", layout, dtype)
    R, T, nh, d = 3, 5, 7, 10
    qk, cos0, sin0 = (randn(R, T, nh, d, gen=gen, dtype=dtype), randn(R, T, d, gen=gen, dtype=dtype),
                      randn(R, T, d, gen=gen, dtype=dtype))
    x, cos, sin = _laid_out(qk, cos0, sin0, layout)
    assert any(not t.is_contiguous() for t in (x, cos, sin))
    want, _ = apply_rotary_pos_emb(qk, qk, cos0, sin0, unsqueeze_dim=2)  # on the contiguous originals
    got = rotary(x, cos, sin)
    assert got.dtype == dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(rotary_reference(x, cos, sin), want, rtol=0, atol=0)


def test_gradients_reach_cos_and_sin():
    """cos and sin are inputs like x: with them needing gradients (a learned rotation) the op's gradients for x,
    cos and sin, each alone or together, are Llama's apply_rotary_pos_emb's."""
    gen = generator("rotary grads")
    leaves = [randn(2, 3, 5, 8, gen=gen), randn(2, 3, 8, gen=gen), randn(2, 3, 8, gen=gen)]
    upstream = randn(2, 3, 5, 8, gen=gen)
    for needing in ([1], [2], [0, 1, 2]):
        got_in = [t.clone().requires_grad_(i in needing) for i, t in enumerate(leaves)]
        want_in = [t.clone().requires_grad_(i in needing) for i, t in enumerate(leaves)]
        got = rotary(*got_in)
        want, _ = apply_rotary_pos_emb(want_in[0], want_in[0], want_in[1], want_in[2], unsqueeze_dim=2)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        grads = torch.autograd.grad(got, [got_in[i] for i in needing], upstream)
        wanted = torch.autograd.grad(want, [want_in[i] for i in needing], upstream)
        for i, g, w in zip(needing, grads, wanted):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=f"input {i} of {needing}")


def test_x_broadcast_along_its_last_dim_is_read_as_its_values():
    """x whose head dim has stride 0 (one value expanded over d, as a broadcast gives): every element is the
    rotation of the expanded values."""
    gen = generator("rotary stride 0")
    x = randn(2, 3, 5, 1, gen=gen).expand(2, 3, 5, 8)
    cos, sin = randn(2, 3, 8, gen=gen), randn(2, 3, 8, gen=gen)
    assert x.stride(-1) == 0
    want, _ = apply_rotary_pos_emb(x.contiguous(), x.contiguous(), cos, sin, unsqueeze_dim=2)
    torch.testing.assert_close(rotary(x, cos, sin), want, rtol=0, atol=0)
    torch.testing.assert_close(rotary_reference(x, cos, sin), want, rtol=0, atol=0)
