"""Attention over the active heads only, against a compact KV cache that holds only executed heads."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def head_sparse_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_to_kv: torch.Tensor,
                                    kv_valid: torch.Tensor, scale: float) -> torch.Tensor:
    """``o[r, t, i] = softmax_j(scale * q[r, t, i] . k[r, c, j]) @ v[r, c, j]`` with ``c = q_to_kv[r, i]``.

    The softmax runs over the visible keys: ``kv_valid[r, j]`` and ``j <= Tk - T + t`` (the T
    queries are the last T positions of the Tk keys, causal). A query that sees no key, or whose
    ``q_to_kv`` is -1 (padding), gets 0.
    q [R, T, nq, d]; k, v [R, nkv, Tk, d] (compact: executed key/value heads only);
    q_to_kv int64 [R, nq]; kv_valid bool [R, Tk] -> o [R, T, nq, d].
    """
    R, T, nq, d = q.shape
    Tk = k.shape[2]
    if k.shape[1] == 0:  # no key/value head: every q head is padding
        return q.new_zeros(q.shape)
    index = q_to_kv.clamp_min(0)[:, :, None, None].expand(-1, -1, Tk, d)
    keys, values = k.gather(1, index), v.gather(1, index)
    causal = torch.arange(Tk, device=q.device) <= torch.arange(Tk - T, Tk, device=q.device)[:, None]
    visible = (causal & kv_valid[:, None, :].bool()).unsqueeze(1)  # [R, 1, T, Tk]
    blind = ~visible.any(-1, keepdim=True)  # queries that see no key: let them see all (finite), then give 0
    # SDPA, as stock transformers attends: a plan with every head on rounds exactly as the stock model
    out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=visible | blind, scale=scale)
    return out.masked_fill(blind | (q_to_kv < 0)[:, :, None, None], 0).transpose(1, 2)


# ---------------------------------------------------------------------------------------------
# Triton: one flash-style kernel (online softmax in fp32, exp2) for prefill and decode. A program
# owns a tile of queries of one compact q head and walks its kv slot's keys up to the causal
# bound. Decode with few (row, head) programs splits the keys over programs and a second small
# kernel merges the partial softmax states.
# ---------------------------------------------------------------------------------------------

import math  # noqa: E402

from torch.utils.flop_counter import register_flop_formula  # noqa: E402

from ..errors import ArgumentTypeError  # noqa: E402
from ._library import (FLOAT_DTYPES, INDEX_DTYPES, active_count, autotune, bucket, call_directly, cdiv,  # noqa: E402
                       check_launch, check_tensors, differentiate_by_reference, dot_precision, finite_float, jit,
                       launch, num_sms, run, tl)




@jit
def _attn_kernel(q_ptr, k_ptr, v_ptr, map_ptr, valid_ptr, out_ptr, pm_ptr, pl_ptr, po_ptr,
                 T, Tk, nq, keys_per_split, scale_log2,
                 sqr, sqt, sqh, sqd, skr, skh, skt, skd, svr, svh, svt, svd, smr, smh, sar, sat,
                 sor, sot, soh, sod, T_BUCKET, TK_BUCKET,
                 HEAD_D: tl.constexpr, NUM_SPLITS: tl.constexpr, PREC: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    rs = tl.program_id(2)
    r = (rs // NUM_SPLITS).to(tl.int64)
    s = rs % NUM_SPLITS
    c = tl.load(map_ptr + r * smr + h * smh)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    dm = offs_d < HEAD_D
    mm = offs_m < T
    q = tl.load(q_ptr + r * sqr + h * sqh + offs_m[:, None] * sqt + offs_d[None, :] * sqd,
                mask=mm[:, None] & dm[None, :], other=0.0)
    lo = s * keys_per_split
    hi = tl.minimum(lo + keys_per_split, Tk - T + tl.minimum((pid_m + 1) * BLOCK_M, T))
    hi = tl.where(c >= 0, hi, lo)  # padded q head: no keys, output 0
    c = tl.maximum(c, 0)
    k_base = k_ptr + r * skr + c * skh
    v_base = v_ptr + r * svr + c * svh
    q_pos = Tk - T + offs_m  # the key position of each query
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)  # finite: masked scores stay NaN-free
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        nm = offs_n < hi
        kt = tl.load(k_base + offs_n[None, :] * skt + offs_d[:, None] * skd, mask=nm[None, :] & dm[:, None], other=0.0)
        sc = tl.dot(q, kt, input_precision=PREC) * scale_log2
        ok = tl.load(valid_ptr + r * sar + offs_n * sat, mask=nm, other=0) != 0
        vis = (ok & nm)[None, :] & (offs_n[None, :] <= q_pos[:, None])
        sc = tl.where(vis, sc, -1.0e30)
        m_new = tl.maximum(m_i, tl.max(sc, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.where(vis, tl.exp2(sc - m_new[:, None]), 0.0)
        l_i = l_i * alpha + tl.sum(p, 1)
        vv = tl.load(v_base + offs_n[:, None] * svt + offs_d[None, :] * svd, mask=nm[:, None] & dm[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv, input_precision=PREC)
        m_i = m_new
    if NUM_SPLITS == 1:
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # no visible key: l = 0 and acc = 0
        out = out_ptr + r * sor + h * soh + offs_m[:, None] * sot + offs_d[None, :] * sod
        tl.store(out, o.to(out_ptr.dtype.element_ty), mask=mm[:, None] & dm[None, :])
    else:  # partial state of this split, [R, S, nq, T] (+ [HEAD_D]), fp32
        base = ((r * NUM_SPLITS + s) * nq + h) * T + offs_m
        tl.store(pm_ptr + base, m_i, mask=mm)
        tl.store(pl_ptr + base, l_i, mask=mm)
        tl.store(po_ptr + base[:, None] * HEAD_D + offs_d[None, :], acc, mask=mm[:, None] & dm[None, :])


@jit
def _combine_kernel(pm_ptr, pl_ptr, po_ptr, out_ptr, T, nq, sor, sot, soh, sod,
                    HEAD_D: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    t = pid % T
    h = (pid // T) % nq
    r = (pid // (T * nq)).to(tl.int64)
    offs_s = tl.arange(0, NUM_SPLITS)
    offs_d = tl.arange(0, BLOCK_D)
    dm = offs_d < HEAD_D
    base = ((r * NUM_SPLITS + offs_s) * nq + h) * T + t
    m = tl.load(pm_ptr + base)
    l = tl.load(pl_ptr + base)
    w = tl.exp2(m - tl.max(m, 0))
    total = tl.sum(w * l, 0)
    o = tl.load(po_ptr + base[:, None] * HEAD_D + offs_d[None, :], mask=dm[None, :], other=0.0)
    o = tl.sum(o * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + r * sor + h * soh + t * sot + offs_d * sod, o.to(out_ptr.dtype.element_ty), mask=dm)


_ATTN_KEY = ["T_BUCKET", "TK_BUCKET", "HEAD_D", "NUM_SPLITS"]
ATTN_CONFIGS = {  # per regime, (kwargs, num_warps, num_stages)
    "few": [({"BLOCK_M": 16, "BLOCK_N": bn}, w, s) for bn, w, s in
            [(64, 4, 2), (64, 4, 3), (128, 4, 2), (128, 8, 3), (32, 4, 3)]],
    "many": [({"BLOCK_M": bm, "BLOCK_N": bn}, w, s) for bm, bn, w, s in
             [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 64, 4, 3), (64, 128, 4, 2)]],
}
_ATTN = {regime: autotune(configs, _ATTN_KEY)(_attn_kernel) for regime, configs in ATTN_CONFIGS.items()}
_INTERPRET_ATTN = {"few": {"BLOCK_M": 16, "BLOCK_N": 16}, "many": {"BLOCK_M": 16, "BLOCK_N": 16}}


def _num_splits(programs: int, Tk: int, sms: int) -> int:
    """Key splits for decode: enough programs for two per multiprocessor, at least 128 keys each."""
    splits = 1
    while splits < 16 and programs * splits < 2 * sms and Tk >= 256 * splits:
        splits *= 2
    return splits


def _check_attention_args(q, k, v, q_to_kv, kv_valid) -> None:
    """Clear errors, naming the argument, for shapes and dtypes the kernel cannot take (q_to_kv's
    values are not read: that would wait for the device)."""
    op = "head_sparse_attention"
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"{op}: q must be [R, T, nq, d] and k, v one shape [R, nkv, Tk, d]; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    R, T, nq, d = q.shape
    Tk = k.shape[2]
    if k.shape[0] != R or k.shape[3] != d:
        raise ValueError(f"{op}: k and v must be [{R}, nkv, Tk, {d}] (q's rows and head size), got {tuple(k.shape)}")
    if T > Tk:
        raise ValueError(f"{op}: the {T} queries are the last of the keys, so k must hold at least {T} (Tk), got {Tk}")
    if q.dtype not in FLOAT_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ArgumentTypeError(f"{op}: q, k and v must share one dtype of float32, float16 or bfloat16, "
                                f"got {q.dtype}, {k.dtype}, {v.dtype}")
    if q_to_kv.dtype not in INDEX_DTYPES:
        raise ArgumentTypeError(f"{op}: q_to_kv must be int64 (or int32), got {q_to_kv.dtype}")
    if tuple(q_to_kv.shape) != (R, nq):
        raise ValueError(f"{op}: q_to_kv must be [{R}, {nq}], got {tuple(q_to_kv.shape)}")
    if kv_valid.dtype.is_floating_point or kv_valid.dtype.is_complex:
        raise ArgumentTypeError(f"{op}: kv_valid must be bool (or 0/1 integers), got {kv_valid.dtype}")
    if tuple(kv_valid.shape) != (R, Tk):
        raise ValueError(f"{op}: kv_valid must be [{R}, {Tk}], got {tuple(kv_valid.shape)}")


def _attention_launch(q, k, v, q_to_kv, kv_valid, scale, splits=None):
    check_launch("head_sparse_attention", q, k, v, q_to_kv, kv_valid)
    _check_attention_args(q, k, v, q_to_kv, kv_valid)
    R, T, nq, d = q.shape
    Tk = k.shape[2]
    out = q.new_empty((R, T, nq, d))
    if out.numel() == 0:
        return out
    if q_to_kv.dtype != torch.int64:
        q_to_kv = q_to_kv.long()
    valid = kv_valid.view(torch.uint8) if kv_valid.dtype == torch.bool else (kv_valid != 0).view(torch.uint8)
    regime = "few" if T <= 16 else "many"
    if splits is None:
        splits = _num_splits(R * nq, Tk, num_sms(q.device.index or 0)) if regime == "few" else 1
    keys_per_split = 64 * cdiv(Tk, 64 * splits)
    block_d = max(16, bucket(d))
    if splits > 1:
        pm = torch.empty((R, splits, nq, T), device=q.device, dtype=torch.float32)
        pl = torch.empty_like(pm)
        po = torch.empty((R, splits, nq, T, d), device=q.device, dtype=torch.float32)
    else:
        pm = pl = po = out

    def grid(meta):
        return (cdiv(T, meta["BLOCK_M"]), nq, R * splits)

    args = (q, k, v, q_to_kv, valid, out, pm, pl, po, T, Tk, nq, keys_per_split, scale * math.log2(math.e),
            *q.stride(), *k.stride(), *v.stride(), *q_to_kv.stride(), *valid.stride(), *out.stride(),
            bucket(T), bucket(Tk))
    consts = dict(HEAD_D=d, NUM_SPLITS=splits, PREC=dot_precision(q.dtype), BLOCK_D=block_d)
    launch(_ATTN, _INTERPRET_ATTN, regime, grid, *args, **consts)
    if splits > 1:
        run(_combine_kernel, (R * nq * T,), pm, pl, po, out, T, nq, *out.stride(), HEAD_D=d, NUM_SPLITS=splits,
            BLOCK_D=block_d)
    return out


@torch.library.custom_op("adaptive_kernels::head_sparse_attention", mutates_args=())
def _head_sparse_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_to_kv: torch.Tensor,
                              kv_valid: torch.Tensor, scale: float) -> torch.Tensor:
    return _attention_launch(q, k, v, q_to_kv, kv_valid, scale)


@_head_sparse_attention_op.register_fake
def _(q, k, v, q_to_kv, kv_valid, scale):
    return q.new_empty(q.shape)


differentiate_by_reference(_head_sparse_attention_op, head_sparse_attention_reference)


@register_flop_formula(torch.ops.adaptive_kernels.head_sparse_attention, get_raw=True)
def _attention_flops(q, k, v, q_to_kv, kv_valid, scale, *, out_val=None) -> int:
    R, T, nq, d = q.shape
    return 4 * T * k.shape[2] * active_count(q_to_kv) * d


def head_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_to_kv: torch.Tensor,
                          kv_valid: torch.Tensor, scale: float) -> torch.Tensor:
    """``o[r, t, i] = softmax_j(scale * q[r, t, i] . k[r, c, j]) @ v[r, c, j]`` with ``c = q_to_kv[r, i]``.

    q [R, T, nq, d]; k, v [R, nkv, Tk, d] (any strides); q_to_kv int64 [R, nq]; kv_valid bool
    [R, Tk] -> o [R, T, nq, d], with the masking of ``head_sparse_attention_reference`` (causal,
    queries the last T of the Tk keys; no visible key or q_to_kv = -1 gives 0). Triton; reads only
    the kv slots that active q heads use. The custom op
    ``torch.ops.adaptive_kernels.head_sparse_attention``; FLOPs counted: 4*T*Tk*d per active q
    head (q_to_kv >= 0).
    """
    check_tensors("head_sparse_attention", q=q, k=k, v=v, q_to_kv=q_to_kv, kv_valid=kv_valid)
    scale = finite_float("head_sparse_attention", "scale", scale)
    if call_directly(q, k, v):
        return _attention_launch(q, k, v, q_to_kv, kv_valid, scale)
    return torch.ops.adaptive_kernels.head_sparse_attention(q, k, v, q_to_kv, kv_valid, scale)
