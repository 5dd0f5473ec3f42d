"""Rotary position embedding of query and key heads in one pass (Llama's rotate-half form).

With q, k and v projected as one stacked product, the query and key heads sit side by side in
its output; one launch rotates them all, where PyTorch takes about five per tensor.
"""

from __future__ import annotations

import torch


def rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` per head, ``rotate_half(x) = [-x2, x1]`` for ``x = [x1, x2]``.

    x [R, T, nh, d]; cos, sin [R, T, d] -> [R, T, nh, d], x's dtype, each product and the sum
    rounded to it as Llama's eager ``apply_rotary_pos_emb`` rounds them.
    """
    half = x.shape[-1] // 2
    cos, sin = cos[:, :, None], sin[:, :, None]
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


# ---------------------------------------------------------------------------------------------
# Triton: one program per (row, token) and block of heads; the two halves of each head are
# loaded once and both outputs written.
# ---------------------------------------------------------------------------------------------

from ..errors import ArgumentTypeError  # noqa: E402
from ._library import (FLOAT_DTYPES, bucket, call_directly, cdiv, check_launch, check_tensors,  # noqa: E402
                       differentiate_by_reference, jit, run, tl, unit_last_stride)


@jit
def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, T, NH, HALF,
                   sxr, sxt, sxh, scr, sct, ssr, sst, sor, sot, soh,
                   BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    rt = tl.program_id(0)
    r = (rt // T).to(tl.int64)
    t = (rt % T).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    j = tl.arange(0, BLOCK_HALF)
    m = (heads < NH)[:, None] & (j < HALF)[None, :]
    x = x_ptr + r * sxr + t * sxt + heads[:, None] * sxh + j[None, :]
    x1 = tl.load(x, mask=m, other=0.0)
    x2 = tl.load(x + HALF, mask=m, other=0.0)
    c = cos_ptr + r * scr + t * sct + j
    s = sin_ptr + r * ssr + t * sst + j
    jm = j < HALF
    c1, c2 = tl.load(c, mask=jm, other=0.0)[None, :], tl.load(c + HALF, mask=jm, other=0.0)[None, :]
    s1, s2 = tl.load(s, mask=jm, other=0.0)[None, :], tl.load(s + HALF, mask=jm, other=0.0)[None, :]
    dt = x1.dtype
    # every product and sum rounded to the input dtype, as the eager PyTorch formula does
    lo = ((x1.to(tl.float32) * c1.to(tl.float32)).to(dt).to(tl.float32)
          + (-x2.to(tl.float32) * s1.to(tl.float32)).to(dt).to(tl.float32)).to(dt)
    hi = ((x2.to(tl.float32) * c2.to(tl.float32)).to(dt).to(tl.float32)
          + (x1.to(tl.float32) * s2.to(tl.float32)).to(dt).to(tl.float32)).to(dt)
    out = out_ptr + r * sor + t * sot + heads[:, None] * soh + j[None, :]
    tl.store(out, lo, mask=m)
    tl.store(out + HALF, hi, mask=m)


def _rotary_launch(x, cos, sin):
    check_launch("rotary", x, cos, sin)
    if x.dim() != 4:
        raise ValueError(f"rotary: x must be [R, T, heads, d], got {tuple(x.shape)}")
    R, T, NH, d = x.shape
    if d % 2 or cos.shape != (R, T, d) or sin.shape != (R, T, d):
        raise ValueError(f"rotary: x must be [R, T, heads, d] with d even and cos, sin [R, T, d]; got x "
                         f"{tuple(x.shape)}, cos {tuple(cos.shape)}, sin {tuple(sin.shape)}")
    if x.dtype not in FLOAT_DTYPES or not (x.dtype == cos.dtype == sin.dtype):
        raise ArgumentTypeError(f"rotary: x, cos and sin must share one dtype of float32, float16 or bfloat16, "
                                f"got {x.dtype}, {cos.dtype}, {sin.dtype}")
    out = torch.empty((R, T, NH, d), device=x.device, dtype=x.dtype)
    if out.numel() == 0:
        return out
    x, cos, sin = unit_last_stride(x), unit_last_stride(cos), unit_last_stride(sin)
    half = d // 2
    block_half = max(16, bucket(half))
    block_h = max(1, min(bucket(NH), 2048 // block_half))  # tiles of at most 2048 pairs
    grid = (R * T, cdiv(NH, block_h))
    run(_rotary_kernel, grid, x, cos, sin, out, T, NH, half, x.stride(0), x.stride(1), x.stride(2), cos.stride(0),
        cos.stride(1), sin.stride(0), sin.stride(1), *out.stride()[:3], BLOCK_H=block_h, BLOCK_HALF=block_half,
        enable_fp_fusion=False)  # else the GPU compiler fuses a product into the sum (one rounding)
    return out


@torch.library.custom_op("adaptive_kernels::rotary", mutates_args=())
def _rotary_op(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return _rotary_launch(x, cos, sin)


@_rotary_op.register_fake
def _(x, cos, sin):
    return x.new_empty(x.shape)


differentiate_by_reference(_rotary_op, rotary_reference)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` per head: one kernel for all heads of all tokens.

    x [R, T, nh, d] (any strides, d even); cos, sin [R, T, d], x's dtype -> [R, T, nh, d], rounded
    as ``rotary_reference``. Triton; the custom op ``torch.ops.adaptive_kernels.rotary``.
    """
    check_tensors("rotary", x=x, cos=cos, sin=sin)
    if call_directly(x, cos, sin):
        return _rotary_launch(x, cos, sin)
    return torch.ops.adaptive_kernels.rotary(x, cos, sin)
