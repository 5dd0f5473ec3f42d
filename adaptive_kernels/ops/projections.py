"""Gathered projections: matrix products that read only the active rows or columns of a weight.

Active units are given as index lists into the weight (``-1`` pads a row of the batch that has
fewer active units than the longest one). The PyTorch references below gather per call; they
define the semantics the kernels must match.
"""

from __future__ import annotations

import torch

from ..errors import ArgumentTypeError, refusal
from ._library import FLOAT_DTYPES, INDEX_DTYPES, check_tensors


def gather_rows_linear_reference(x: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor,
                                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y[r, t, j] = x[r, t] . weight[rows[r, j]] (+ bias[rows[r, j]])``, 0 where ``rows[r, j] < 0``.

    x [R, T, D]; weight [N, D]; rows int64 [R, n]; bias [N] or None -> y [R, T, n].
    Output-side gather for q, k, v, gate and up projections.
    """
    valid = rows >= 0
    index = rows.clamp_min(0)
    y = torch.matmul(x, weight[index].transpose(1, 2))
    if bias is not None:
        y = y + bias[index].unsqueeze(1)
    return y.masked_fill(~valid.unsqueeze(1), 0)


def gather_cols_linear_reference(a: torch.Tensor, weight: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``y[r, t] = sum_j a[r, t, j] * weight[:, cols[r, j]]`` over ``cols[r, j] >= 0``.

    a [R, T, n]; weight [D, N]; cols int64 [R, n] -> y [R, T, D].
    Reduction-side gather for the o and down projections.
    """
    valid = cols >= 0
    w = weight.t()[cols.clamp_min(0)].masked_fill(~valid.unsqueeze(-1), 0)  # padding reads no weight: 0 * inf is NaN
    return torch.matmul(a.masked_fill(~valid.unsqueeze(1), 0), w)


def check_gather_args(op: str, act_name: str, act, weight, index_name: str, index, bias=None,
                      weight_name: str = "weight") -> None:
    """Clear errors, naming the argument, for shapes and dtypes a gathered product cannot take (any backend's
    kernel; the references fail on them less clearly). Index values are not read: checking that they lie in
    [-1, N) would wait for the device.

    ``act_name`` "x": rows-side (weight [N, D] with D = x's last size); "a": cols-side (cols [R, n]
    with n = a's last size)."""
    check_tensors(op, ("bias",), **{act_name: act, weight_name: weight, index_name: index, "bias": bias})
    if act.dim() != 3 or weight.dim() != 2 or index.dim() != 2:
        raise ValueError(f"{op}: {act_name} must be 3-D, {weight_name} and {index_name} 2-D; got {act_name} "
                         f"{tuple(act.shape)}, {weight_name} {tuple(weight.shape)}, {index_name} {tuple(index.shape)}")
    if act.dtype not in FLOAT_DTYPES:
        raise ArgumentTypeError(f"{op}: {act_name} must be float32, float16 or bfloat16, got {act.dtype}")
    if weight.dtype != act.dtype or (bias is not None and bias.dtype != act.dtype):
        name, t = (weight_name, weight) if weight.dtype != act.dtype else ("bias", bias)
        raise ArgumentTypeError(f"{op}: {name} must have {act_name}'s dtype {act.dtype}, got {t.dtype}")
    if index.dtype not in INDEX_DTYPES:
        raise ArgumentTypeError(f"{op}: {index_name} must be int64 (or int32), got {index.dtype}")
    if index.shape[0] != act.shape[0]:
        raise ValueError(f"{op}: {index_name} must hold one list per row of {act_name} ({act.shape[0]}), "
                         f"got {tuple(index.shape)}")
    if act_name == "x" and weight.shape[1] != act.shape[2]:
        raise ValueError(f"{op}: {weight_name} must be [N, D] with D = {act.shape[2]} (x's last size), "
                         f"got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{op}: bias must be [N] with N = {weight.shape[0]} ({weight_name}'s rows), "
                         f"got {tuple(bias.shape)}")
    if act_name == "a" and index.shape[1] != act.shape[2]:
        raise ValueError(f"{op}: cols must be [R, n] with n = {act.shape[2]} (a's last size), got {tuple(index.shape)}")


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------
# Both kernels read the weight in place through its strides (no per-call copy); the index list
# is loaded per tile, so any list works and padded (-1) entries cost no weight bytes. Prefill
# tiles use tl.dot (tensor cores); one token a GEMV (elementwise products summed), or the tensor-core
# tile where autotuning finds it faster.

from torch.utils.flop_counter import register_flop_formula  # noqa: E402

from ._library import (active_count, autotune, bucket, call_directly, cdiv, check_launch,  # noqa: E402
                       differentiate_by_reference, dot_precision, jit, launch, num_sms, run, tl)


@jit
def _rows_kernel(x_ptr, w_ptr, w2_ptr, rows_ptr, b_ptr, out_ptr, T, D, n,
                 sxr, sxt, sxd, swn, swd, sw2n, sw2d, srr, srn, sb, sor, sot, son,
                 T_BUCKET, N_BUCKET,
                 HAS_BIAS: tl.constexpr, GATED: tl.constexpr, PREC: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # y[r, t, j] = x[r, t] . W[rows[r, j]]; GATED: silu(x . W[rows]) * (x . W2[rows])
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    r = tl.program_id(2).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    idx = tl.load(rows_ptr + r * srr + offs_n * srn, mask=offs_n < n, other=-1)
    valid = idx >= 0
    idx = tl.where(valid, idx, 0)
    k_end = tl.where(tl.max(valid.to(tl.int32)) > 0, D, 0)  # a tile of padded entries only: no loop, output 0
    offs_k = tl.arange(0, BLOCK_K)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    w_rows = w_ptr + idx * swn
    w2_rows = w2_ptr + idx * sw2n
    x_rows = x_ptr + r * sxr + offs_m * sxt
    if BLOCK_M == 1:  # one token: GEMV, products summed once at the end
        acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        acc2 = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        for k0 in range(0, k_end, BLOCK_K):
            kk = k0 + offs_k
            km = kk < D
            xv = tl.load(x_rows + kk * sxd, mask=km, other=0.0).to(tl.float32)[None, :]
            wv = tl.load(w_rows[:, None] + kk[None, :] * swd, mask=valid[:, None] & km[None, :], other=0.0)
            acc += wv.to(tl.float32) * xv
            if GATED:
                wv2 = tl.load(w2_rows[:, None] + kk[None, :] * sw2d, mask=valid[:, None] & km[None, :], other=0.0)
                acc2 += wv2.to(tl.float32) * xv
        y = tl.sum(acc, axis=1)[None, :]
        y2 = tl.sum(acc2, axis=1)[None, :]
    else:
        y = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        y2 = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        mm = offs_m < T
        for k0 in range(0, k_end, BLOCK_K):
            kk = k0 + offs_k
            km = kk < D
            xv = tl.load(x_rows[:, None] + kk[None, :] * sxd, mask=mm[:, None] & km[None, :], other=0.0)
            wv = tl.load(w_rows[None, :] + kk[:, None] * swd, mask=km[:, None] & valid[None, :], other=0.0)
            y = tl.dot(xv, wv, y, input_precision=PREC)
            if GATED:
                wv2 = tl.load(w2_rows[None, :] + kk[:, None] * sw2d, mask=km[:, None] & valid[None, :], other=0.0)
                y2 = tl.dot(xv, wv2, y2, input_precision=PREC)
    if HAS_BIAS:
        y += tl.load(b_ptr + idx * sb, mask=valid, other=0.0).to(tl.float32)[None, :]
    if GATED:
        y = y / (1.0 + tl.exp(-y)) * y2
    y = tl.where(valid[None, :], y, 0.0)
    out = out_ptr + r * sor + offs_m[:, None] * sot + offs_n[None, :] * son
    tl.store(out, y.to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < T) & (offs_n[None, :] < n))


@jit
def _cols_block(acc, a_rows, w_ptr, c_row, j0, j_end, offs_j, offs_d, dm, mm, saj, swd, swn, scj,
                W_COL_MAJOR: tl.constexpr, ALIGN: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_J: tl.constexpr, FULL: tl.constexpr):
    """acc += a[:, j0:j0+BLOCK_J] @ W[:, cols[j0:j0+BLOCK_J]]^T; FULL: no column past j_end."""
    jj = j0 + offs_j
    jm = jj < j_end
    if FULL:  # no mask along j: the a tile loads wide
        c = tl.load(c_row + jj * scj)
    else:
        c = tl.load(c_row + jj * scj, mask=jm, other=-1)
    cv = c >= 0
    c = tl.where(cv, c, 0)
    if W_COL_MAJOR or BLOCK_M > 1:  # column-major: each gathered column is one contiguous run
        # (tensor-core tiles of a row-major weight take this plain gather too: correct, not fast)
        wv = tl.load(w_ptr + c[:, None] * swn + offs_d[None, :] * swd, mask=cv[:, None] & dm[None, :], other=0.0)
    else:  # row-major GEMV: j is the fast axis; a block that is one aligned run of columns loads wide
        first = tl.sum(tl.where(offs_j == 0, c, 0))
        run = (tl.sum((c == first + offs_j).to(tl.int32)) == BLOCK_J) & (tl.min(cv.to(tl.int32)) == 1)
        if run & (first % ALIGN == 0):
            base = tl.multiple_of(first, ALIGN)
            wt = tl.load(w_ptr + offs_d[:, None] * swd + (base + offs_j)[None, :] * swn, mask=dm[:, None], other=0.0)
        else:
            wt = tl.load(w_ptr + offs_d[:, None] * swd + c[None, :] * swn, mask=dm[:, None] & cv[None, :], other=0.0)
        wv = tl.trans(wt)
    if BLOCK_M == 1:  # one token: [BLOCK_J, BLOCK_D] products, summed once at the end
        if FULL:
            av = tl.load(a_rows + jj * saj)
        else:
            av = tl.load(a_rows + jj * saj, mask=jm, other=0.0)
        av = tl.where(cv, av.to(tl.float32), 0.0)  # padded columns count 0, whatever a holds there
        acc += wv.to(tl.float32) * av[:, None]
    else:
        if FULL:
            av = tl.load(a_rows[:, None] + jj[None, :] * saj, mask=mm[:, None], other=0.0)
        else:
            av = tl.load(a_rows[:, None] + jj[None, :] * saj, mask=mm[:, None] & jm[None, :], other=0.0)
        av = tl.where(cv[None, :], av, 0.0).to(wv.dtype)
        acc = tl.dot(av, wv, acc, input_precision=PREC)
    return acc


@jit
def _cols_kernel(a_ptr, w_ptr, cols_ptr, out_ptr, ws_ptr, T, D, n,
                 sar, sat, saj, swd, swn, scr, scj, sor, sot, sod,
                 T_BUCKET, N_BUCKET,
                 W_COL_MAJOR: tl.constexpr, ALIGN: tl.constexpr, SPLIT_J: tl.constexpr, PREC: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_J: tl.constexpr):
    # y[r, t, d] = sum_j a[r, t, j] * W[d, cols[r, j]] over cols >= 0; SPLIT_J > 1: program s of a
    # row sums one share of j and writes fp32 partials ws[s, r, t, d] (summed by _sum_splits_kernel)
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    rs = tl.program_id(2)
    r = (rs // SPLIT_J).to(tl.int64)
    s = rs % SPLIT_J
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dm = offs_d < D
    offs_j = tl.arange(0, BLOCK_J)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mm = offs_m < T
    a_rows = a_ptr + r * sar + offs_m * sat
    c_row = cols_ptr + r * scr
    chunk = tl.cdiv(tl.cdiv(n, SPLIT_J), BLOCK_J) * BLOCK_J
    j_lo = s * chunk
    j_hi = tl.minimum(j_lo + chunk, n)
    j_full = j_lo + tl.maximum(j_hi - j_lo, 0) // BLOCK_J * BLOCK_J
    acc = tl.zeros([BLOCK_J if BLOCK_M == 1 else BLOCK_M, BLOCK_D], tl.float32)
    for j0 in range(j_lo, j_full, BLOCK_J):
        acc = _cols_block(acc, a_rows, w_ptr, c_row, j0, j_hi, offs_j, offs_d, dm, mm, saj, swd, swn, scj,
                          W_COL_MAJOR, ALIGN, PREC, BLOCK_M, BLOCK_J, True)
    if j_full < j_hi:
        acc = _cols_block(acc, a_rows, w_ptr, c_row, j_full, j_hi, offs_j, offs_d, dm, mm, saj, swd, swn, scj,
                          W_COL_MAJOR, ALIGN, PREC, BLOCK_M, BLOCK_J, False)
    if BLOCK_M == 1:
        y = tl.sum(acc, axis=0)[None, :]
    else:
        y = acc
    if SPLIT_J == 1:
        out = out_ptr + r * sor + offs_m[:, None] * sot + offs_d[None, :] * sod
        tl.store(out, y.to(out_ptr.dtype.element_ty), mask=mm[:, None] & dm[None, :])
    else:
        R = tl.num_programs(2) // SPLIT_J
        ws = ws_ptr + ((s * R + r) * T + offs_m[:, None]) * D + offs_d[None, :]
        tl.store(ws, y, mask=mm[:, None] & dm[None, :])


@jit
def _sum_splits_kernel(ws_ptr, out_ptr, size, SPLIT_J: tl.constexpr, BLOCK: tl.constexpr):
    # out.flat[i] = sum_s ws[s].flat[i] (out contiguous)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < size
    acc = tl.zeros([BLOCK], tl.float32)
    for s in tl.static_range(SPLIT_J):
        acc += tl.load(ws_ptr + s * size + offs, mask=m, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=m)


# Autotune configs per regime, (kwargs, num_warps, num_stages); keyed on coarse buckets.
_GEMV_ROWS = [({"BLOCK_M": 1, "BLOCK_N": bn, "BLOCK_K": bk}, w, 1)
              for bn, bk, w in [(4, 512, 4), (8, 256, 4), (8, 512, 4), (16, 256, 4), (16, 512, 8), (32, 256, 8)]]
_FEW_ROWS = [({"BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": bk}, w, s)
             for bn, bk, w, s in [(16, 256, 4, 3), (32, 128, 4, 4), (32, 256, 4, 3), (64, 128, 4, 4), (64, 256, 8, 3)]]
_MANY_ROWS = [({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, w, s)
              for bm, bn, bk, w, s in [(128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4),
                                       (128, 128, 64, 4, 4), (64, 256, 64, 8, 4), (128, 64, 64, 4, 4), (64, 64, 64, 4, 4)]]
_GEMV_COLS = [({"BLOCK_M": 1, "BLOCK_D": bd, "BLOCK_J": bj}, w, 1)
              for bd, bj, w in [(4, 512, 4), (8, 256, 4), (16, 256, 4), (32, 128, 4), (64, 64, 4), (64, 128, 4),
                                (128, 32, 4), (128, 64, 8)]]
_FEW_COLS = [({"BLOCK_M": 16, "BLOCK_D": bd, "BLOCK_J": bj}, w, s)
             for bd, bj, w, s in [(16, 256, 4, 3), (32, 128, 4, 4), (64, 128, 4, 4), (64, 64, 4, 4), (128, 64, 4, 3)]]
_MANY_COLS = [({"BLOCK_M": bm, "BLOCK_D": bd, "BLOCK_J": bj}, w, s)
              for bm, bd, bj, w, s in [(128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4),
                                       (128, 128, 64, 4, 4), (64, 256, 64, 8, 4)]]
_GEMV_ROWS += _FEW_ROWS[1:3]  # one token may also take the tensor-core path: autotune chooses
_GEMV_COLS += _FEW_COLS[1:3]
_KEY = ["T_BUCKET", "N_BUCKET", "D", "GATED", "HAS_BIAS"]
_COLS_KEY = ["T_BUCKET", "N_BUCKET", "D", "W_COL_MAJOR", "SPLIT_J"]
ROWS_CONFIGS = {"gemv": _GEMV_ROWS, "few": _FEW_ROWS, "many": _MANY_ROWS}
COLS_CONFIGS = {"gemv": _GEMV_COLS, "few": _FEW_COLS, "many": _MANY_COLS}
_ROWS = {regime: autotune(configs, _KEY)(_rows_kernel) for regime, configs in ROWS_CONFIGS.items()}
_COLS = {regime: autotune(configs, _COLS_KEY)(_cols_kernel) for regime, configs in COLS_CONFIGS.items()}
# Under the interpreter: small fixed tiles (odd test shapes still span several tiles)
_INTERPRET_ROWS = {"gemv": {"BLOCK_M": 1, "BLOCK_N": 16, "BLOCK_K": 32},
                   "few": {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32},
                   "many": {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32}}
_INTERPRET_COLS = {"gemv": {"BLOCK_M": 1, "BLOCK_D": 16, "BLOCK_J": 16},
                   "few": {"BLOCK_M": 16, "BLOCK_D": 16, "BLOCK_J": 16},
                   "many": {"BLOCK_M": 16, "BLOCK_D": 16, "BLOCK_J": 16}}


def _regime(T: int) -> str:
    return "gemv" if T == 1 else "few" if T <= 16 else "many"


def check_rows_launch(op, x, weight, rows, bias=None, weight2=None) -> None:
    """The launch and argument checks of ``rows_launch`` (weight2: SwiGLU's up projection)."""
    check_launch(op, *[t for t in (x, weight, rows, bias, weight2) if t is not None])
    if weight2 is None:
        check_gather_args(op, "x", x, weight, "rows", rows, bias)
    else:
        check_gather_args(op, "x", x, weight, "rows", rows, weight_name="w_gate")
        if weight2.shape != weight.shape or weight2.dtype != weight.dtype:
            raise refusal(weight2.dtype == weight.dtype)(
                f"{op}: w_up must match w_gate ({tuple(weight.shape)}, {weight.dtype}), got {tuple(weight2.shape)}, "
                f"{weight2.dtype}")


def rows_launch(op, x, weight, rows, bias=None, weight2=None):
    """Shared launcher of gather_rows_linear and gathered_swiglu (weight2: the up projection)."""
    check_rows_launch(op, x, weight, rows, bias, weight2)
    R, T, D = x.shape
    n = rows.shape[1]
    out = torch.empty((R, T, n), device=x.device, dtype=x.dtype)
    if out.numel() == 0:
        return out
    if rows.dtype != torch.int64:
        rows = rows.long()
    w2 = weight if weight2 is None else weight2
    b = weight if bias is None else bias
    regime = _regime(T)

    def grid(meta):
        return (cdiv(T, meta["BLOCK_M"]), cdiv(n, meta["BLOCK_N"]), R)

    launch(_ROWS, _INTERPRET_ROWS, regime, grid,
            x, weight, w2, rows, b, out, T, D, n, *x.stride(), *weight.stride(), *w2.stride(), *rows.stride(),
            b.stride(0) if bias is not None else 0, *out.stride(), bucket(T), bucket(n),
            HAS_BIAS=bias is not None, GATED=weight2 is not None, PREC=dot_precision(x.dtype))
    return out


@torch.library.custom_op("adaptive_kernels::gather_rows_linear", mutates_args=())
def _gather_rows_linear_op(x: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor,
                           bias: torch.Tensor | None = None) -> torch.Tensor:
    return rows_launch("gather_rows_linear", x, weight, rows, bias)


@_gather_rows_linear_op.register_fake
def _(x, weight, rows, bias=None):
    return x.new_empty((x.shape[0], x.shape[1], rows.shape[1]))


def _split_columns(R: int, D: int, n: int, device: torch.device) -> int:
    """Programs per batch row over the columns: two programs per multiprocessor with 64-wide
    output tiles, at most one per started 256 columns, at most 8."""
    return max(1, min(8, cdiv(2 * num_sms(device.index or 0) * 64, R * D), cdiv(n, 256)))


def _cols_launch(a, weight, cols):
    """The launcher of gather_cols_linear."""
    check_launch("gather_cols_linear", a, weight, cols)
    check_gather_args("gather_cols_linear", "a", a, weight, "cols", cols)
    R, T, n = a.shape
    D = weight.shape[0]
    if n == 0 or R * T == 0:
        return a.new_zeros((R, T, D))
    out = a.new_empty((R, T, D))
    if cols.dtype != torch.int64:
        cols = cols.long()
    regime = _regime(T)
    col_major = weight.stride(0) == 1 and weight.stride(1) != 1
    # one token on a column-major weight: split the columns over programs so that wide column
    # tiles still give every multiprocessor work
    split = _split_columns(R, D, n, a.device) if regime == "gemv" and col_major else 1
    ws = torch.empty((split, R, T, D), device=a.device, dtype=torch.float32) if split > 1 else out

    def grid(meta):
        return (cdiv(T, meta["BLOCK_M"]), cdiv(D, meta["BLOCK_D"]), R * split)

    launch(_COLS, _INTERPRET_COLS, regime, grid,
            a, weight, cols, out, ws, T, D, n, *a.stride(), *weight.stride(), *cols.stride(), *out.stride(),
            bucket(T), bucket(n), W_COL_MAJOR=col_major,
            ALIGN=16 // weight.element_size() if weight.stride(1) == 1 else 1, SPLIT_J=split,
            PREC=dot_precision(a.dtype))
    if split > 1:
        run(_sum_splits_kernel, (cdiv(out.numel(), 1024),), ws, out, out.numel(), SPLIT_J=split, BLOCK=1024)
    return out


@torch.library.custom_op("adaptive_kernels::gather_cols_linear", mutates_args=())
def _gather_cols_linear_op(a: torch.Tensor, weight: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    return _cols_launch(a, weight, cols)


@_gather_cols_linear_op.register_fake
def _(a, weight, cols):
    return a.new_empty((a.shape[0], a.shape[1], weight.shape[0]))


differentiate_by_reference(_gather_rows_linear_op, gather_rows_linear_reference)
differentiate_by_reference(_gather_cols_linear_op, gather_cols_linear_reference)


def gather_rows_flops(x, weight, rows, bias=None, *, out_val=None) -> int:
    """FLOPs of a gathered-rows product (any backend's op; a raw FLOP formula): 2 per listed (not
    padded) row, token and reduced element."""
    return 2 * x.shape[1] * active_count(rows) * x.shape[2]


def gather_cols_flops(a, weight, cols, *, out_val=None) -> int:
    """FLOPs of a gathered-columns product (any backend's op; a raw FLOP formula): 2 per listed (not
    padded) column, token and output element."""
    return 2 * a.shape[1] * active_count(cols) * weight.shape[0]


register_flop_formula(torch.ops.adaptive_kernels.gather_rows_linear, get_raw=True)(gather_rows_flops)
register_flop_formula(torch.ops.adaptive_kernels.gather_cols_linear, get_raw=True)(gather_cols_flops)


def gather_rows_linear(x: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y[r, t, j] = x[r, t] . weight[rows[r, j]] (+ bias[rows[r, j]])``, 0 where ``rows[r, j] < 0``.

    x [R, T, D] (any strides); weight [N, D]; rows int64 [R, n]; bias [N] or None -> y [R, T, n].
    Triton; reads only the listed weight rows, in place. The custom op
    ``torch.ops.adaptive_kernels.gather_rows_linear``; FLOPs counted: 2*T*D per listed row (padding
    counts 0).
    """
    check_tensors("gather_rows_linear", ("bias",), x=x, weight=weight, rows=rows, bias=bias)
    if call_directly(x, weight, bias):
        return rows_launch("gather_rows_linear", x, weight, rows, bias)
    return torch.ops.adaptive_kernels.gather_rows_linear(x, weight, rows, bias)


def gather_cols_linear(a: torch.Tensor, weight: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``y[r, t] = sum_j a[r, t, j] * weight[:, cols[r, j]]`` over ``cols[r, j] >= 0``.

    a [R, T, n] (any strides); weight [D, N]; cols int64 [R, n] -> y [R, T, D].
    Triton; reads only the listed weight columns, in place, through the weight's strides. Fastest
    when the columns are contiguous in memory: see ``cols_major``. The custom op
    ``torch.ops.adaptive_kernels.gather_cols_linear``; FLOPs counted: 2*T*D per listed column
    (padding counts 0).
    """
    check_tensors("gather_cols_linear", a=a, weight=weight, cols=cols)
    if call_directly(a, weight):
        return _cols_launch(a, weight, cols)
    return torch.ops.adaptive_kernels.gather_cols_linear(a, weight, cols)


def cols_major(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` with the same shape and values, stored column by column (strides ``(1, D)``).

    weight [D, N] -> [D, N]. A one-time re-layout for the o and down projections, done at patch
    time (e.g. ``linear.weight.data = cols_major(linear.weight.data)``; ``F.linear`` accepts it):
    ``gather_cols_linear`` then reads each active column as one contiguous run.
    """
    return weight.t().contiguous().t()
