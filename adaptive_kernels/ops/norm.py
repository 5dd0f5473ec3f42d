"""RMSNorm, optionally fused with the residual add before it: one pass over each row.

Llama normalises twice per layer; the second time right after the attention update is added to
the residual stream. Unfused, in PyTorch, that is about eight elementwise launches per norm,
which at one token cost more than the arithmetic.
"""

from __future__ import annotations

import torch


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float,
                       residual: torch.Tensor | None = None):
    """``y = weight * (h / sqrt(mean(h**2) + eps))`` over the last dim, ``h = x (+ residual)``.

    x [..., D] (and residual, same shape); weight [D] -> y [..., D] in the promotion of weight's
    and h's dtypes, or ``(y, h)`` when ``residual`` is given. Rounded as Llama's RMSNorm and the
    model's add round: ``h`` in the promotion of x's and residual's dtypes (a half-precision update
    added to a float32 stream under autocast is float32), the normalised value (computed in fp32)
    to h's dtype before the weight multiplies it.
    """
    h = x if residual is None else x + residual
    h32 = h.to(torch.float32)
    normed = h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)
    y = weight * normed.to(h.dtype)
    return y if residual is None else (y, h)


# ---------------------------------------------------------------------------------------------
# Triton: one program per row, the whole row in registers (D up to 16384).
# ---------------------------------------------------------------------------------------------

from ..errors import ArgumentTypeError, refusal  # noqa: E402
from ._library import (FLOAT_DTYPES, bucket, call_directly, check_launch, check_tensors,  # noqa: E402
                       differentiate_by_reference, finite_float, jit, run, tl, unit_last_stride)

MAX_D = 16384


@jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, h_ptr, D, eps, sx, sr, sw, so, sh,
                     HAS_RESIDUAL: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    m = offs < D
    h = tl.load(x_ptr + row * sx + offs, mask=m, other=0.0)
    if HAS_RESIDUAL:
        h = (h.to(tl.float32) + tl.load(res_ptr + row * sr + offs, mask=m, other=0.0).to(tl.float32)).to(h.dtype)
        tl.store(h_ptr + row * sh + offs, h, mask=m)
    h32 = h.to(tl.float32)
    normed = (h32 * tl.rsqrt(tl.sum(h32 * h32, axis=0) / D + eps)).to(h.dtype)
    w = tl.load(w_ptr + offs * sw, mask=m, other=0.0)
    y = w.to(tl.float32) * normed.to(tl.float32)
    tl.store(out_ptr + row * so + offs, y.to(out_ptr.dtype.element_ty), mask=m)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t [..., D] as [rows, D] with unit stride along D (a view when possible)."""
    return unit_last_stride(t).reshape(-1, t.shape[-1])


def _rms_norm_launch(x, weight, eps, residual=None):
    tensors = (x, weight) if residual is None else (x, weight, residual)
    check_launch("rms_norm", *tensors)
    if x.dim() == 0:
        raise ValueError("rms_norm: x must be [..., D], got a 0-d tensor")
    D = x.shape[-1]
    if x.dtype not in FLOAT_DTYPES or weight.dtype not in FLOAT_DTYPES:
        raise ArgumentTypeError(f"rms_norm: x and weight must be float32, float16 or bfloat16, "
                                f"got {x.dtype} and {weight.dtype}")
    if tuple(weight.shape) != (D,):
        raise ValueError(f"rms_norm: weight must be [{D}] (x's last size), got {tuple(weight.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise refusal(residual.dtype == x.dtype)(f"rms_norm: residual must match x ({tuple(x.shape)}, {x.dtype}), "
                                                 f"got {tuple(residual.shape)}, {residual.dtype}")
    if D > MAX_D:
        raise ValueError(f"rms_norm: x's last dimension must be at most {MAX_D}, got {D}; use rms_norm_reference")
    out = torch.empty(x.shape, device=x.device, dtype=torch.promote_types(weight.dtype, x.dtype))
    h = torch.empty(x.shape, device=x.device, dtype=x.dtype) if residual is not None else out  # rows of unit stride
    if x.numel() == 0:
        return out, h
    xr, outr, hr = _rows(x), out.view(-1, D), h.view(-1, D)
    rr = _rows(residual) if residual is not None else xr
    run(_rms_norm_kernel, (xr.shape[0],), xr, rr, weight, outr, hr, D, eps, xr.stride(0), rr.stride(0),
        weight.stride(0), outr.stride(0), hr.stride(0), HAS_RESIDUAL=residual is not None,
        BLOCK_D=max(16, bucket(D)), num_warps=8 if D > 2048 else 4)
    return out, h


@torch.library.custom_op("adaptive_kernels::rms_norm", mutates_args=())
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _rms_norm_launch(x, weight, eps)[0]


@_rms_norm_op.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype))


@torch.library.custom_op("adaptive_kernels::add_rms_norm", mutates_args=())
def _add_rms_norm_op(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _rms_norm_launch(x, weight, eps, residual)


@_add_rms_norm_op.register_fake
def _(x, residual, weight, eps):
    return x.new_empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype)), x.new_empty(x.shape)


differentiate_by_reference(_rms_norm_op, rms_norm_reference)
differentiate_by_reference(_add_rms_norm_op, lambda x, residual, weight, eps: rms_norm_reference(x, weight, eps, residual))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """``y = weight * (h / sqrt(mean(h**2) + eps))`` over the last dim, ``h = x (+ residual)``: one kernel.

    x [..., D] (any strides; D <= 16384), residual None or like x, weight [D] -> y, or ``(y, h)``
    with a residual; rounded as ``rms_norm_reference``. Triton; the custom ops
    ``torch.ops.adaptive_kernels.rms_norm`` and ``::add_rms_norm``.
    """
    check_tensors("rms_norm", ("residual",), x=x, weight=weight, residual=residual)
    eps = finite_float("rms_norm", "eps", eps, minimum=0.0)
    if residual is None:
        if call_directly(x, weight):
            return _rms_norm_launch(x, weight, eps)[0]
        return torch.ops.adaptive_kernels.rms_norm(x, weight, eps)
    if call_directly(x, weight, residual):
        return _rms_norm_launch(x, weight, eps, residual)
    return torch.ops.adaptive_kernels.add_rms_norm(x, residual, weight, eps)
