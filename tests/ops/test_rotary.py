"""rotary (Triton) against Llama's apply_rotary_pos_emb."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from adaptive_kernels.errors import ArgumentTypeError
from adaptive_kernels.ops.rotary import rotary, rotary_reference

from ._util import DTYPE_PARAMS, generator, randn


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
    for args in [(x, cos.half(), sin), (x.double(), cos.double(), sin.double()), (x.int(), cos.int(), sin.int())]:
        with pytest.raises(ArgumentTypeError, match="x, cos and sin must share one dtype of float32, float16 or bf"):
            rotary(*args)


def test_opcheck():
    gen = generator("opcheck")
    x = randn(2, 3, 4, 8, gen=gen)
    torch.library.opcheck(torch.ops.adaptive_kernels.rotary.default, (x, randn(2, 3, 8, gen=gen), randn(2, 3, 8, gen=gen)))
