"""The CUDA extension (adaptive_kernels.cuda_ext, csrc/) against its PyTorch references.

On the CPU: ``plan.compact_plan`` (the torch compaction the CUDA one must equal) against a plain
loop and against ``plan.listed_schedule``, the fake implementations and FLOP formulas, the errors, and
the cuda backend's choice between the CUDA and Triton ops. On a GPU (``gpu`` marked, skipped elsewhere): plan compaction against its
reference on random masks, the GEMV ops against ``gather_*_linear_reference`` for T in 1, 2, 3, 8, 16,
odd sizes, -1 padded lists and fp32/fp16/bf16, every element compared; CUDA-graph capture and no
host synchronisation.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension
from torch.utils.flop_counter import FlopCounterMode

from adaptive_kernels import cuda_ext
from adaptive_kernels.ops.projections import gather_cols_linear_reference, gather_rows_linear_reference
from adaptive_kernels.plan import (CompactPlan, DecoderShape, ExecutionPlan, compact_plan, fixed_width_schedule,
                                   listed_schedule)
from ops._util import check, generator, index_lists, randn

CUDA = torch.cuda.is_available()
gpu = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA device")]


def on_gpu(test):
    """Marks ``test`` gpu and skips it without CUDA."""
    for mark in gpu:
        test = mark(test)
    return test
DTYPES = [pytest.param(dt, id=str(dt).removeprefix("torch.")) for dt in (torch.float32, torch.float16, torch.bfloat16)]


# ---------------------------------------------------------------------------------------------
# Plan compaction
# ---------------------------------------------------------------------------------------------

# (B, L, H, Hkv, head_dim, M): GQA with M % G != 0; LLaVA-7B's sizes; MQA with fewer neurons than
# groups (empty groups); more heads than a warp has lanes; the most heads the CUDA compaction takes
PLAN_SHAPES = [(3, 5, 12, 4, 7, 101), (2, 3, 32, 32, 128, 11008), (1, 4, 7, 1, 5, 6), (2, 3, 100, 20, 3, 997),
               (1, 2, 1024, 128, 1, 3000)]


def shape_of(H, Hkv, d, M, L) -> DecoderShape:
    return DecoderShape(num_layers=L, hidden_size=H * d, num_heads=H, num_kv_heads=Hkv, head_dim=d,
                        intermediate_size=M)


def random_plan(B, L, H, gen, device="cpu") -> ExecutionPlan:
    """Masks of mixed densities per (row, layer), with one all-off and one all-on pair."""
    density = torch.rand(B, L, 1, generator=gen)
    heads = torch.rand(B, L, H, generator=gen) < density
    groups = torch.rand(B, L, H, generator=gen) < density.flip(1)
    heads[0, 0], groups[0, 0] = False, False
    heads[-1, -1], groups[-1, -1] = True, True
    return ExecutionPlan(torch.ones(B, L, dtype=torch.bool), heads, groups).to(device)


def naive_buffers(heads: list[bool], groups: list[bool], shape: DecoderShape):
    """One (row, layer)'s buffers, written out from the definitions."""
    H, Hkv, d, M = shape.num_heads, shape.num_kv_heads, shape.head_dim, shape.intermediate_size
    per_kv = H // Hkv
    q_heads = [h for h in range(H) if heads[h]]
    kv_heads = [k for k in range(Hkv) if any(heads[k * per_kv:(k + 1) * per_kv])]
    G = len(groups)
    sizes = [M // G + (g < M % G) for g in range(G)]  # the first M % G groups one neuron larger
    starts = [sum(sizes[:g]) for g in range(len(groups))]
    q_rows = [h * d + i for h in q_heads for i in range(d)]
    kv_rows = [k * d + i for k in kv_heads for i in range(d)]
    q_to_kv = [kv_heads.index(h // per_kv) for h in q_heads]
    neurons = [starts[g] + i for g in range(len(groups)) if groups[g] for i in range(sizes[g])]

    def pad(v, width):
        return v + [-1] * (width - len(v))

    return (pad(q_rows, H * d), pad(kv_rows, Hkv * d), pad(q_to_kv, H), pad(neurons, M),
            len(q_rows), len(kv_rows), len(neurons))


@pytest.mark.parametrize("B,L,H,Hkv,d,M", PLAN_SHAPES)
def test_torch_compact_plan_is_the_definition(B, L, H, Hkv, d, M):
    shape = shape_of(H, Hkv, d, M, L)
    plan = random_plan(B, L, H, generator(B, L, H, Hkv, d, M))
    ref = compact_plan(plan, shape)
    assert ref.q_rows.shape == (B, L, H * d) and ref.kv_rows.shape == (B, L, Hkv * d)
    assert ref.q_to_kv.shape == (B, L, H) and ref.mlp_rows.shape == (B, L, M) and ref.q_count.shape == (B, L)
    for b in range(B):
        for l in range(L):
            want = naive_buffers(plan.heads[b, l].tolist(), plan.groups[b, l].tolist(), shape)
            got = tuple(t[b, l].tolist() for t in ref)
            assert got == want, (b, l)


@pytest.mark.parametrize("B,L,H,Hkv,d,M", PLAN_SHAPES[:3])
def test_torch_compact_plan_agrees_with_compile_plan(B, L, H, Hkv, d, M):
    """Cut to its counts, each (row, layer) lists what plan.listed_schedule lists for it."""
    shape = shape_of(H, Hkv, d, M, L)
    plan = random_plan(B, L, H, generator("li", B, L, H))
    ref = compact_plan(plan, shape)
    for l, idx in enumerate(listed_schedule(plan, shape).layers):
        for i in range(idx.num_batch_rows):
            b = i if idx.batch_rows is None else int(idx.batch_rows[i])
            nq, nkv, nm = int(ref.q_count[b, l]), int(ref.kv_count[b, l]), int(ref.mlp_count[b, l])
            dense_q = torch.arange(H * d).tolist()
            q_rows = dense_q if idx.q_rows is None else idx.q_rows[i].tolist()
            assert ref.q_rows[b, l, :nq].tolist() == [v for v in q_rows if v >= 0]
            kv_rows = torch.arange(Hkv * d).tolist() if idx.kv_rows is None else idx.kv_rows[i].tolist()
            assert ref.kv_rows[b, l, :nkv].tolist() == [v for v in kv_rows if v >= 0]
            assert ref.q_to_kv[b, l, :nq // d].tolist() == [v for v in idx.q_to_kv[i].tolist() if v >= 0]
            mlp = torch.arange(M).tolist() if idx.mlp_rows is None else idx.mlp_rows[i].tolist()
            assert ref.mlp_rows[b, l, :nm].tolist() == [v for v in mlp if v >= 0]


@pytest.mark.parametrize("B,L,H,Hkv,d,M", PLAN_SHAPES[:3])
def test_fixed_width_schedule_reads_the_stacked_rows_of_active_heads_only(B, L, H, Hkv, d, M):
    """Every layer on every row at full width: the stacked q, k, v weight's rows of the row's active heads (k's
    after the H*d q rows, v's after Hkv*d more), each part -1 padded so that a padded entry reads no weight."""
    shape = shape_of(H, Hkv, d, M, L)
    plan = random_plan(B, L, H, generator("fixed", B, L, H))
    schedule = fixed_width_schedule(plan, shape, compact_plan(plan, shape))
    for l, idx in enumerate(schedule.layers):
        assert idx.batch_rows is None and idx.batch_rows_on.tolist() == plan.layers[:, l].tolist()
        for b in range(B):
            q_rows, kv_rows, *_ = naive_buffers(plan.heads[b, l].tolist(), plan.groups[b, l].tolist(), shape)
            k_rows, v_rows = ([v + offset if v >= 0 else -1 for v in kv_rows] for offset in (H * d, (H + Hkv) * d))
            assert idx.qkv_rows[b].tolist() == q_rows + k_rows + v_rows, (b, l)


@on_gpu
@pytest.mark.parametrize("B,L,H,Hkv,d,M", PLAN_SHAPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_compact_plan_on_the_device(B, L, H, Hkv, d, M, seed):
    shape = shape_of(H, Hkv, d, M, L)
    plan = random_plan(B, L, H, generator("dev", seed, B, L, H), device="cuda")
    got, want = cuda_ext.compact_plan(plan, shape), compact_plan(plan, shape)
    for name, a, b in zip(CompactPlan._fields, got, want):
        assert a.dtype == torch.int64 and a.device.type == "cuda", name
        assert torch.equal(a, b), name


@on_gpu
def test_compact_plan_is_captured_in_a_cuda_graph_without_host_sync():
    B, L, H, Hkv, d, M = 2, 4, 12, 4, 7, 101
    shape = shape_of(H, Hkv, d, M, L)
    first = random_plan(B, L, H, generator("graph", 1), device="cuda")
    second = random_plan(B, L, H, generator("graph", 2), device="cuda")
    heads, groups = first.heads.clone(), first.groups.clone()
    static = ExecutionPlan(torch.ones(B, L, dtype=torch.bool, device="cuda"), heads, groups)
    cuda_ext.compact_plan(static, shape)  # build and warm up outside the capture
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        cuda_ext.compact_plan(static, shape)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = cuda_ext.compact_plan(static, shape)
    heads.copy_(second.heads)
    groups.copy_(second.groups)
    graph.replay()
    for a, b in zip(out, compact_plan(second, shape)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("compact", [compact_plan, cuda_ext.compact_plan], ids=["torch", "cuda"])
def test_compact_plan_refuses_a_cpu_plan_and_a_mismatched_shape(compact):
    """Both compactions check the plan against the shape (the CUDA one before its device check, so here too)."""
    plan = random_plan(1, 2, 4, generator("err"))
    with pytest.raises(ValueError, match="CUDA device"):
        cuda_ext.compact_plan(plan, shape_of(4, 2, 3, 10, 2))
    with pytest.raises(ValueError, match="num_heads"):
        compact(plan, shape_of(6, 2, 3, 10, 2))
    with pytest.raises(ValueError, match="num_kv_heads"):
        compact(plan, shape_of(4, 3, 3, 10, 2))


def test_the_head_limit_is_max_units_inclusive_as_in_csrc():
    """The host check takes MAX_UNITS heads (csrc: H <= kMaxUnits, the same constant) and refuses MAX_UNITS + 1."""
    header = (cuda_ext.CSRC / "adaptive_kernels.h").read_text()
    assert cuda_ext.MAX_UNITS == int(re.search(r"constexpr int64_t kMaxUnits = (\d+);", header).group(1))
    for H in (cuda_ext.MAX_UNITS, cuda_ext.MAX_UNITS + 1):
        plan, shape = ExecutionPlan.full(1, 1, H), shape_of(H, H, 1, H, 1)
        if H <= cuda_ext.MAX_UNITS:
            cuda_ext._check_compactable(plan, shape)
        else:
            with pytest.raises(ValueError, match=f"at most {cuda_ext.MAX_UNITS} heads"):
                cuda_ext._check_compactable(plan, shape)


# ---------------------------------------------------------------------------------------------
# Gathered projections
# ---------------------------------------------------------------------------------------------

# (D, N, counts per batch row, index kind): D = 67 (odd: element-wise loads) or 296 (8*37: 16-byte
# loads in every dtype); an empty list row and a full one. Few outputs over a long reduction split it
# between warps: D = 1032 gives 2 (fp16, bf16) or 4 (fp32) per output group, 4104 and 4099 (odd) 8
ROWS_CASES = {
    "odd-runs": (67, 53, [13, 7, 0], "runs"),
    "odd-scattered": (67, 53, [53, 9, 1], "scattered"),
    "wide-runs": (296, 301, [301, 77, 0], "runs"),
    "wide-sorted": (296, 301, [150, 41], "sorted"),
    "wide-holes": (296, 301, [60, 33], "holes"),
    "split-sorted": (1032, 45, [45, 17], "sorted"),
    "deep-runs": (4104, 37, [37, 5, 0], "runs"),
    "deep-odd-scattered": (4099, 37, [21, 0], "scattered"),
}
TOKENS = [1, 2, 3, 8, 16]  # every kernel variant (1, 2, 4, 8 and 16 tokens), one of them part-filled


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("case", list(ROWS_CASES))
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("x_layout", ["contiguous", "offset-view"])
@on_gpu
def test_gather_rows_linear(dtype, T, case, bias, x_layout):
    gen = generator("rows", dtype, T, case, bias, x_layout)
    D, N, counts, kind = ROWS_CASES[case]
    R = len(counts)
    rows = index_lists(counts, N, gen, kind, unit=8, width=max(counts) + (kind == "holes") * 9).cuda()
    if x_layout == "contiguous":
        x = randn(R, T, D, gen=gen, dtype=dtype)
    else:  # a view one element in: every row of x misaligned for 16-byte loads
        x = randn(R, T, D + 3, gen=gen, dtype=dtype)[..., 1:D + 1]
    w = randn(N, D, gen=gen, dtype=dtype, scale=D ** -0.5)
    b = randn(N, gen=gen, dtype=dtype) if bias else None
    y = cuda_ext.gather_rows_linear(x, w, rows, b)
    ref = gather_rows_linear_reference(x.double(), w.double(), rows, None if b is None else b.double())
    check(y, ref, dtype)
    assert bool((y[rows[:, None, :].expand(-1, T, -1) < 0] == 0).all())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("w_layout", ["column-offset", "transposed"])
@on_gpu
def test_gather_rows_linear_reads_any_weight_layout(dtype, w_layout):
    """A weight sliced one column in (its rows misaligned for 16-byte loads) or stored transposed."""
    gen = generator("rows-weight", dtype, w_layout)
    D, N = 296, 301
    rows = index_lists([77, 0, 301], N, gen, "runs", unit=8).cuda()
    if w_layout == "column-offset":
        w = randn(N, D + 1, gen=gen, dtype=dtype, scale=D ** -0.5)[:, 1:]
    else:
        w = randn(D, N, gen=gen, dtype=dtype, scale=D ** -0.5).t()
    for T in (1, 16):
        x = randn(3, T, D, gen=gen, dtype=dtype)
        check(cuda_ext.gather_rows_linear(x, w, rows), gather_rows_linear_reference(x.double(), w.double(), rows),
              dtype)


# (D, N, counts, kind): N = 328 (8*41) gives 16-byte aligned rows, so sorted runs load wide; lists
# of 4104 columns split their reduction between 8 warps
COLS_CASES = {
    "odd-runs": (67, 53, [13, 7, 0], "runs"),
    "odd-scattered": (67, 53, [53, 9, 1], "scattered"),
    "wide-sorted": (296, 328, [328, 120, 0], "sorted"),
    "wide-runs": (61, 328, [96, 40], "runs"),
    "wide-holes": (61, 328, [70, 12], "holes"),
    "deep-sorted": (37, 4104, [4104, 1500], "sorted"),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("case", list(COLS_CASES))
@pytest.mark.parametrize("layout", ["row-major", "cols-major", "a-transposed"])
@on_gpu
def test_gather_cols_linear(dtype, T, case, layout):
    gen = generator("cols", dtype, T, case, layout)
    D, N, counts, kind = COLS_CASES[case]
    R = len(counts)
    cols = index_lists(counts, N, gen, kind, unit=8, width=max(counts) + (kind == "holes") * 9).cuda()
    n = cols.shape[1]
    if layout == "a-transposed":
        a = randn(R, n, T, gen=gen, dtype=dtype).transpose(1, 2)
    else:
        a = randn(R, T, n, gen=gen, dtype=dtype)
    a[cols[:, None, :].expand(-1, T, -1) < 0] = float("nan")  # padded entries must not be read
    w = randn(D, N, gen=gen, dtype=dtype, scale=max(1, n) ** -0.5)
    if layout == "cols-major":
        w = w.t().contiguous().t()
    y = cuda_ext.gather_cols_linear(a, w, cols)
    check(y, gather_cols_linear_reference(a.double(), w.double(), cols), dtype)


@on_gpu
def test_strided_weights_int32_lists_and_empty_lists():
    gen = generator("misc")
    big = randn(2 * 301, 296, gen=gen, dtype=torch.bfloat16)
    w = big[1::2]  # every other row, one row in: rows stay 16-byte aligned
    rows = index_lists([40, 17], 301, gen, "runs", unit=8)
    x = randn(2, 3, 296, gen=gen, dtype=torch.bfloat16)
    ref = gather_rows_linear_reference(x.double(), w.double(), rows.cuda())
    check(cuda_ext.gather_rows_linear(x, w, rows.int().cuda()), ref, torch.bfloat16)
    w_cols = randn(67, 2 * 53, gen=gen, dtype=torch.float16)[:, ::2]  # column stride 2
    cols = index_lists([20, 5], 53, gen, "scattered").cuda()
    a = randn(2, 3, 20, gen=gen, dtype=torch.float16)
    check(cuda_ext.gather_cols_linear(a, w_cols, cols), gather_cols_linear_reference(a.double(), w_cols.double(), cols),
          torch.float16)
    none = torch.empty(2, 0, dtype=torch.int64, device="cuda")
    assert cuda_ext.gather_rows_linear(x, w, none).shape == (2, 3, 0)
    y = cuda_ext.gather_cols_linear(a[..., :0], w_cols, none)
    assert y.shape == (2, 3, 67) and bool((y == 0).all())


@on_gpu
def test_gemv_ops_are_captured_in_a_cuda_graph_without_host_sync():
    gen = generator("graph-gemv")
    x = randn(2, 1, 296, gen=gen, dtype=torch.float16)
    w = randn(301, 296, gen=gen, dtype=torch.float16, scale=0.05)
    rows = index_lists([77, 150], 301, gen, "sorted", unit=8).cuda()
    w_o = randn(296, 301, gen=gen, dtype=torch.float16, scale=0.05)
    cuda_ext.gather_cols_linear(cuda_ext.gather_rows_linear(x, w, rows), w_o, rows)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        cuda_ext.gather_cols_linear(cuda_ext.gather_rows_linear(x, w, rows), w_o, rows)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = cuda_ext.gather_cols_linear(cuda_ext.gather_rows_linear(x, w, rows), w_o, rows)
    x.copy_(randn(2, 1, 296, gen=gen, dtype=torch.float16))
    graph.replay()
    eager = cuda_ext.gather_cols_linear(cuda_ext.gather_rows_linear(x, w, rows), w_o, rows)
    torch.testing.assert_close(y, eager, rtol=0, atol=0)


@on_gpu
def test_opcheck():
    gen = generator("opcheck")
    rows = index_lists([5, 3], 11, gen, "runs", unit=8).cuda()
    x, w, b = randn(2, 3, 9, gen=gen, dtype=torch.float32), randn(11, 9, gen=gen, dtype=torch.float32), \
        randn(11, gen=gen, dtype=torch.float32)
    ops = torch.ops.adaptive_kernels
    torch.library.opcheck(ops.cuda_gather_rows_linear.default, (x, w, rows, b))
    torch.library.opcheck(ops.cuda_gather_rows_linear.default, (x, w, rows, None))
    torch.library.opcheck(ops.cuda_gather_cols_linear.default, (randn(2, 3, 5, gen=gen, dtype=torch.float32),
                                                                randn(9, 11, gen=gen, dtype=torch.float32), rows))
    heads = torch.rand(2, 3, 8, generator=gen).cuda() < 0.5
    torch.library.opcheck(ops.cuda_compact_plan.default, (heads, ~heads, 4, 2, 30))
    trained = x.detach().requires_grad_(), w.detach().requires_grad_(), rows, b.detach().requires_grad_()
    torch.library.opcheck(ops.cuda_gather_rows_linear.default, trained)  # with the backward (the reference's)


def test_host_limits_are_the_ones_csrc_enforces():
    """The wrappers refuse past DECODE_MAX_TOKENS tokens and MAX_BATCH_ROWS rows; the kernels' own limits
    (kMaxDecodeTokens in adaptive_kernels.h, the batch-row check of gemv_common.cuh) are the same numbers, so the
    host check neither lets through what the kernels refuse nor refuses what they take."""
    header = (cuda_ext.CSRC / "adaptive_kernels.h").read_text()
    common = (cuda_ext.CSRC / "gemv_common.cuh").read_text()
    assert cuda_ext.DECODE_MAX_TOKENS == int(re.search(r"constexpr int64_t kMaxDecodeTokens = (\d+);", header)[1])
    assert cuda_ext.MAX_BATCH_ROWS == int(re.search(r"if \(R > (\d+)\) return", common)[1])


BAD_GEMV_CALLS = {  # what is wrong -> (call, error type, message pattern); CPU tensors: refused before any launch
    "too many tokens": (lambda x, w, rows: cuda_ext.gather_rows_linear(x, w, rows), ValueError,
                        "at most 16 tokens per row \\(x.shape\\[1\\]\\), got 17"),
    "weight dtype": (lambda x, w, rows: cuda_ext.gather_rows_linear(x[:, :1], w.half(), rows), TypeError,
                     "weight must have x's dtype"),
    "weight width": (lambda x, w, rows: cuda_ext.gather_rows_linear(x[:, :1], w[:, :7], rows), ValueError,
                     "weight must be \\[N, D\\] with D = 8"),
    "bias size": (lambda x, w, rows: cuda_ext.gather_rows_linear(x[:, :1], w, rows, w[0]), ValueError,
                  "bias must be \\[N\\] with N = 5"),
    "bias list": (lambda x, w, rows: cuda_ext.gather_rows_linear(x[:, :1], w, rows, [0.0] * 5), TypeError,
                  "gather_rows_linear: bias must be a tensor or None, got list"),
    "weight array": (lambda x, w, rows: cuda_ext.gather_cols_linear(x[:, :1, :2], w.t().numpy(), rows), TypeError,
                     "gather_cols_linear: weight must be a tensor, got ndarray"),
    "float rows": (lambda x, w, rows: cuda_ext.gather_rows_linear(x[:, :1], w, rows.float()), TypeError,
                   "rows must be int64"),
    "float cols": (lambda x, w, rows: cuda_ext.gather_cols_linear(x[:, :1, :2], w.t(), rows.float()), TypeError,
                   "^gather_cols_linear: cols must be int64"),
    "int8 activations": (lambda x, w, rows: cuda_ext.gather_cols_linear(x[:, :1, :2].to(torch.int8), w.t(), rows),
                         TypeError, "a must be float32, float16 or bfloat16"),
    "cols width": (lambda x, w, rows: cuda_ext.gather_cols_linear(x[:, :1, :3], w.t(), rows), ValueError,
                   "cols must be \\[R, n\\] with n = 3"),
    "lists per row": (lambda x, w, rows: cuda_ext.gather_cols_linear(x[:, :1, :2], w.t(), rows.expand(2, -1)),
                      ValueError, "^gather_cols_linear: cols must hold one list per row of a \\(1\\)"),
    "cpu tensors": (lambda x, w, rows: cuda_ext.gather_cols_linear(x[:, :1, :2], w.t(), rows), ValueError,
                    "the GEMV kernels take CUDA tensors, got a on cpu"),
    "too many rows": (lambda x, w, rows: cuda_ext.gather_rows_linear(x[:, :1].expand(65536, -1, -1), w,
                                                                     rows.expand(65536, -1)), ValueError,
                      "at most 65535 batch rows \\(x.shape\\[0\\]\\), got 65536"),
}


@pytest.mark.parametrize("case", list(BAD_GEMV_CALLS))
def test_bad_gemv_arguments_get_errors_naming_them(case):
    call, error, pattern = BAD_GEMV_CALLS[case]
    x, w, rows = torch.randn(1, 17, 8), torch.randn(5, 8), torch.zeros(1, 2, dtype=torch.int64)
    with pytest.raises(error, match=pattern):
        call(x, w, rows)


@pytest.mark.parametrize("T", [1, 16, 17])
@pytest.mark.parametrize("side", ["rows", "cols"])
def test_gemv_token_limit_is_16_inclusive(side, T):
    """Up to DECODE_MAX_TOKENS = 16 tokens pass the token check (CPU tensors then stop at the device check,
    which runs after it); 17 are refused, naming the count."""
    assert cuda_ext.DECODE_MAX_TOKENS == 16
    gen = generator("token limit", side, T)
    x, w, idx = torch.randn(2, T, 8, generator=gen), torch.randn(5, 8, generator=gen), torch.tensor([[0, 3], [4, -1]])
    if side == "rows":
        call, name = lambda: cuda_ext.gather_rows_linear(x, w, idx), "x"
    else:
        call, name = lambda: cuda_ext.gather_cols_linear(x[..., :2], w.t(), idx), "a"
    if T <= 16:
        with pytest.raises(ValueError, match=f"the GEMV kernels take CUDA tensors, got {name} on cpu"):
            call()
    else:
        with pytest.raises(ValueError, match=rf"at most 16 tokens per row \({name}.shape\[1\]\), got 17"):
            call()


@on_gpu
def test_the_extension_raises_for_a_bad_direct_call_without_crashing():
    """Called through torch.ops, past the Python checks, the extension's own checks raise a Python
    error (run in a child process, so a crash fails this test instead of ending the session)."""
    code = textwrap.dedent("""
        import torch
        from adaptive_kernels import cuda_ext
        cuda_ext.load()
        x = torch.randn(1, 17, 8, device="cuda")
        w = torch.randn(5, 8, device="cuda")
        rows = torch.zeros(1, 2, dtype=torch.int64, device="cuda")
        try:
            torch.ops.adaptive_kernels.cuda_gather_rows_linear(x, w, rows)
        except RuntimeError as error:
            print("raised:", error)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env=os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    assert "raised: cuda_gather_rows_linear: the GEMV kernels take 1 to 16 tokens" in done.stdout


# ---------------------------------------------------------------------------------------------
# The backend, fakes, FLOPs, errors (CPU)
# ---------------------------------------------------------------------------------------------

@on_gpu
def test_cuda_backend_matches_the_references_both_sides_of_16_tokens():
    backend = cuda_ext.cuda_backend()
    gen = generator("backend")
    w, w_o = randn(301, 296, gen=gen, dtype=torch.bfloat16, scale=0.05), randn(296, 301, gen=gen, dtype=torch.bfloat16)
    rows = index_lists([150, 77], 301, gen, "sorted", unit=8).cuda()
    for T in (1, 16, 17, 40):
        x = randn(2, T, 296, gen=gen, dtype=torch.bfloat16)
        h = backend.rows_linear(x, w, rows)
        check(h, gather_rows_linear_reference(x.double(), w.double(), rows), torch.bfloat16)
        check(backend.cols_linear(h, w_o, rows), gather_cols_linear_reference(h.double(), w_o.double(), rows),
              torch.bfloat16)


def test_cuda_backend_uses_the_cuda_ops_up_to_16_tokens_and_triton_above(monkeypatch):
    """Rows side: CUDA GEMV for 1 to 16 tokens and up to 65535 rows, Triton otherwise. Cols side: Triton at every
    length (a patched model keeps o/down column-major, which the CUDA GEMV does not read). Each op is handed the
    arguments as given, a projection's bias (attention_bias, mlp_bias) included."""
    from adaptive_kernels.ops import attention, norm, projections, rotary, swiglu
    calls = []

    def spy(name):
        return lambda *args: calls.append((name, args))

    monkeypatch.setattr(cuda_ext, "load", lambda *a, **k: None)
    monkeypatch.setattr(cuda_ext, "gather_rows_linear", spy("cuda rows"))
    monkeypatch.setattr(cuda_ext, "gather_cols_linear", spy("cuda cols"))
    monkeypatch.setattr(projections, "gather_rows_linear", spy("triton rows"), raising=False)
    monkeypatch.setattr(projections, "gather_cols_linear", spy("triton cols"), raising=False)
    backend = cuda_ext.cuda_backend()
    assert backend.name == "cuda"
    w, bias, idx = torch.empty(4, 8), torch.empty(4), torch.zeros(1, 2, dtype=torch.int64)
    w_cols = projections.cols_major(w)
    given = []
    for T in (1, 16, 17):
        given += [(torch.empty(1, T, 8), w, idx, bias), (torch.empty(1, T, 2), w_cols, idx)]
        backend.rows_linear(*given[-2])
        backend.cols_linear(*given[-1])
    assert [name for name, _ in calls] == ["cuda rows", "triton cols"] * 2 + ["triton rows", "triton cols"]
    for (name, args), want in zip(calls, given, strict=True):
        assert len(args) == len(want) and all(a is b for a, b in zip(args, want)), name
    assert backend.swiglu is getattr(swiglu, "gathered_swiglu", None)
    assert backend.attention is getattr(attention, "head_sparse_attention", None)
    assert backend.rms_norm is norm.rms_norm and backend.rotary is rotary.rotary
    for R, op in ((cuda_ext.MAX_BATCH_ROWS, "cuda rows"), (cuda_ext.MAX_BATCH_ROWS + 1, "triton rows")):
        backend.rows_linear(torch.empty(R, 1, 8), w, idx)  # one token a row, but more rows than the GEMV's grid takes
        assert calls[-1][0] == op, R


def test_fake_implementations_give_shapes_and_dtypes():
    x = torch.empty(2, 3, 67, device="meta", dtype=torch.bfloat16)
    w = torch.empty(53, 67, device="meta", dtype=torch.bfloat16)
    rows = torch.empty(2, 9, device="meta", dtype=torch.int64)
    ops = torch.ops.adaptive_kernels
    y = ops.cuda_gather_rows_linear(x, w, rows)
    assert y.shape == (2, 3, 9) and y.dtype == torch.bfloat16
    y = ops.cuda_gather_cols_linear(torch.empty(2, 3, 9, device="meta", dtype=torch.float16), w.half(), rows)
    assert y.shape == (2, 3, 53) and y.dtype == torch.float16
    heads = torch.empty(2, 5, 12, device="meta", dtype=torch.bool)
    outs = ops.cuda_compact_plan(heads, heads, 7, 4, 101)
    assert [tuple(t.shape) for t in outs] == [(2, 5, 84), (2, 5, 28), (2, 5, 12), (2, 5, 101), (2, 5, 3)]
    assert all(t.dtype == torch.int64 for t in outs)


def test_gemv_ops_are_differentiable():
    """Their backward is the reference's (values checked on the GPU by opcheck and the training test)."""
    x = torch.empty(2, 3, 67, device="meta", requires_grad=True)
    w = torch.empty(53, 67, device="meta", requires_grad=True)
    rows = torch.empty(2, 9, device="meta", dtype=torch.int64)
    ops = torch.ops.adaptive_kernels
    ops.cuda_gather_rows_linear(x, w, rows).sum().backward()
    a = torch.empty(2, 3, 9, device="meta", requires_grad=True)
    ops.cuda_gather_cols_linear(a, w, rows).sum().backward()
    assert x.grad.shape == x.shape and a.grad.shape == a.shape and w.grad.shape == w.shape


def test_flop_formulas_count_the_active_products():
    R, T, D, N, n = 2, 3, 67, 53, 9
    rows = torch.empty(R, n, device="meta", dtype=torch.int64)
    with FlopCounterMode(display=False) as counter:
        torch.ops.adaptive_kernels.cuda_gather_rows_linear(torch.empty(R, T, D, device="meta"),
                                                           torch.empty(N, D, device="meta"), rows)
        torch.ops.adaptive_kernels.cuda_gather_cols_linear(torch.empty(R, T, n, device="meta"),
                                                           torch.empty(D, N, device="meta"), rows)
    assert counter.get_total_flops() == 2 * (2 * R * T * n * D)


def test_cpu_tensors_are_refused_by_name():
    with pytest.raises(ValueError, match="cuda_gather_rows_linear runs on CUDA tensors only"):
        torch.ops.adaptive_kernels.cuda_gather_rows_linear(torch.randn(1, 1, 4), torch.randn(3, 4),
                                                           torch.zeros(1, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="cuda_gather_cols_linear runs on CUDA tensors only"):
        torch.ops.adaptive_kernels.cuda_gather_cols_linear(torch.randn(1, 1, 2), torch.randn(3, 4),
                                                           torch.zeros(1, 2, dtype=torch.int64))
    heads = torch.ones(1, 2, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="cuda_compact_plan runs on CUDA tensors only"):
        torch.ops.adaptive_kernels.cuda_compact_plan(heads, heads, 3, 2, 10)


def test_load_without_a_toolchain_says_what_is_missing():
    problem = cuda_ext.toolchain_problem()
    if problem is None:
        pytest.skip("this machine has a CUDA toolchain")
    with pytest.raises(RuntimeError, match="backend='cuda' compiles the CUDA sources .* backend='triton'"):
        cuda_ext.load()
    with pytest.raises(RuntimeError, match="backend='triton'"):
        cuda_ext.cuda_backend()


@pytest.fixture
def fake_toolchain(monkeypatch):
    """A machine whose toolchain is complete (faked) and whose extension is not loaded yet: the builds that
    ``load()`` asks ``torch.utils.cpp_extension.load`` for are recorded; each call's outcome is taken from
    ``outcomes`` (an exception to raise, or None for a good build)."""
    builds, outcomes = [], []

    def build(**kwargs):
        builds.append(kwargs)
        outcome = outcomes.pop(0) if outcomes else None
        if outcome is not None:
            raise outcome

    monkeypatch.setattr(cuda_ext, "toolchain_problem", lambda: None)
    monkeypatch.setattr(cpp_extension, "load", build)
    monkeypatch.setattr(cuda_ext, "_loaded", False)
    return builds, outcomes


def test_load_builds_once_and_is_idempotent(fake_toolchain):
    """``load()`` is idempotent: the first call builds csrc/ (every source, with csrc/ on the include path), later
    calls return at once without asking for another build."""
    builds, _ = fake_toolchain
    for _ in range(3):
        cuda_ext.load()
    assert len(builds) == 1, builds
    assert builds[0]["name"] == cuda_ext._extension_name()
    assert sorted(builds[0]["sources"]) == sorted(str(cuda_ext.CSRC / n) for n in cuda_ext.SOURCES)


def test_a_failed_build_is_reported_again_on_the_next_call(fake_toolchain):
    """A build that fails raises, and the next ``load()`` tries again (and raises again while it fails) rather
    than returning as if the kernels were registered; once a build succeeds, no further build runs."""
    builds, outcomes = fake_toolchain
    outcomes += [RuntimeError("nvcc: error 1"), RuntimeError("nvcc: error 2"), None]
    for n in (1, 2):
        with pytest.raises(RuntimeError, match=f"nvcc: error {n}"):
            cuda_ext.load()
    cuda_ext.load()
    cuda_ext.load()
    assert len(builds) == 3


def test_toolchain_problem_names_the_first_missing_piece(tmp_path, monkeypatch):
    """Each piece the build needs, taken away in turn from a machine that has them all (faked), the headers of
    csrc/ first: the sentence names it, and with every piece present there is no problem."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").touch()
    sources_only = tmp_path / "csrc"
    sources_only.mkdir()
    for name in cuda_ext.SOURCES:
        (sources_only / name).write_bytes((cuda_ext.CSRC / name).read_bytes())
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(tmp_path))
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: True)
    assert cuda_ext.toolchain_problem() is None
    takings = [(lambda m: m.setattr(cuda_ext, "CSRC", sources_only),
                re.escape(f"the sources {list(cuda_ext.HEADERS)} are missing from {sources_only}")),
               (lambda m: m.setattr(cpp_extension, "is_ninja_available", lambda: False), "ninja is not installed"),
               (lambda m: m.setattr(cpp_extension, "CUDA_HOME", str(tmp_path / "bin")), "it has no bin/nvcc"),
               (lambda m: m.setattr(cpp_extension, "CUDA_HOME", None), "no CUDA toolkit was found"),
               (lambda m: m.setattr(torch.version, "cuda", None), "this torch build .* has no CUDA support")]
    for take, says in takings:  # each taking also hides the ones before it: the earlier checks come first
        take(monkeypatch)
        assert re.search(says, cuda_ext.toolchain_problem()), says


def copy_of_csrc(folder: Path) -> None:
    """Every source and header of csrc/ copied into ``folder``."""
    for name in cuda_ext.SOURCES + cuda_ext.HEADERS:
        (folder / name).write_bytes((cuda_ext.CSRC / name).read_bytes())


def test_an_edited_source_or_header_gets_a_fresh_build(tmp_path, monkeypatch):
    """The build folder is named after a hash of every file of csrc/ (sources and headers), so an edit to any
    of them builds afresh instead of loading a stale cached build."""
    assert {p.name for p in cuda_ext.CSRC.iterdir() if p.suffix in (".cpp", ".cu", ".h", ".cuh")} == \
        set(cuda_ext.SOURCES + cuda_ext.HEADERS)
    copy_of_csrc(tmp_path)
    built = cuda_ext._extension_name()
    monkeypatch.setattr(cuda_ext, "CSRC", tmp_path)
    assert cuda_ext._extension_name() == built  # the same contents elsewhere: the same build
    names = {built}
    for name in cuda_ext.SOURCES + cuda_ext.HEADERS:
        original = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(original + b"\n// edited\n")
        names.add(cuda_ext._extension_name())
        (tmp_path / name).write_bytes(original)
    assert len(names) == 1 + len(cuda_ext.SOURCES + cuda_ext.HEADERS)
    assert cuda_ext._extension_name() == built


def test_build_name_tells_apart_text_moved_between_files(tmp_path, monkeypatch):
    """The build is named after each file of csrc/ (its name and contents), not after their concatenation: a line
    moved from the end of one source to the start of the next is a different build (a stale cached one would be
    loaded otherwise)."""
    copy_of_csrc(tmp_path)
    monkeypatch.setattr(cuda_ext, "CSRC", tmp_path)
    built = cuda_ext._extension_name()
    first, second = (tmp_path / n for n in cuda_ext.SOURCES[:2])
    moved = b"// a trailing comment\n"
    first.write_bytes(first.read_bytes() + moved)
    with_moved_line = cuda_ext._extension_name()
    first.write_bytes(first.read_bytes()[:-len(moved)])
    second.write_bytes(moved + second.read_bytes())
    assert len({built, with_moved_line, cuda_ext._extension_name()}) == 3


def test_the_package_imports_without_nvcc_on_path():
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                           if not os.path.exists(os.path.join(p, "nvcc")))
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH")} | {"PATH": path}
    code = ("import adaptive_kernels, adaptive_kernels.cuda_ext as ce; "
            "assert not ce._loaded; import shutil; assert shutil.which('nvcc') is None; print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr
