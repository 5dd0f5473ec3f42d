"""Latency of the Triton ops and of one decoder layer composed from them, LLaVA-1.5-7B shapes, bf16.

Per op, tokens (1 and 640) and active share (1.0, 0.85, 0.6, 0.5; active heads and MLP groups
are whole units chosen at random), in one run: ``backend`` (the Triton ops), ``dense`` (full
weights, F.linear / SDPA; o and down get the active inputs in the full width, zeros elsewhere: the
masked computation), ``ideal`` (F.linear / SDPA on weights cut to the active set before
timing), ``copy`` (``weight[rows]`` then F.linear per call, as AdaLLaVA's reference code does).
Each time is the median over 30 CUDA-graph replays of the variant, timed with CUDA events, warmed
up, each after a 256 MiB read that evicts the weights from L2 (see ``timed_us``). At one token,
``bw_share`` is the active bytes (weights, keys/values for attention, and for ``add_rms_norm`` and
``rotary`` every byte read and written) over the backend's time, as a share of the measured
device-to-device copy bandwidth (bytes read + written). At 640 tokens, ``flop_share`` is the FLOPs
the active units must do (attention over the causal pairs) over the backend's time, as a share of
the measured dense bf16 matrix-product rate. The layer skips RMSNorm and RoPE. ``[cols-major]``
rows run o/down on weights re-laid out once by ``cols_major``, their ``dense`` too (cuBLAS on that
layout, as a patched model's dense layers run it). ``add_rms_norm`` (residual add and RMSNorm, one
kernel) and ``rotary`` (all 64 q and k heads, one kernel) have no active share, so they run first
and at 1.0 only: their ``dense`` and ``ideal`` are the eager PyTorch formulas Llama runs.

Needs CUDA (skips elsewhere); ``AK_BENCH_DRY=1`` runs tiny shapes on the CPU to check this code.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from adaptive_kernels.ops.attention import head_sparse_attention
from adaptive_kernels.ops.norm import rms_norm, rms_norm_reference
from adaptive_kernels.ops.rotary import rotary, rotary_reference
from adaptive_kernels.ops.projections import cols_major, gather_cols_linear, gather_rows_linear
from adaptive_kernels.ops.swiglu import gathered_swiglu
from measure import DRY, copy_bandwidth, matmul_rate, timed_us

CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not (CUDA or DRY), reason="the op benchmarks time GPU kernels and need CUDA "
                                "(AK_BENCH_DRY=1 checks this code on the CPU at tiny shapes)")

if DRY:  # tiny shapes, fp32 (the interpreter's bf16 is wrong)
    HIDDEN, HEADS, HEAD_DIM, MLP, TOKENS, DTYPE = 64, 4, 16, 88, (1, 7), torch.float32
else:
    HIDDEN, HEADS, HEAD_DIM, MLP, TOKENS, DTYPE = 4096, 32, 128, 11008, (1, 640), torch.bfloat16
GROUPS = HEADS
SHARES = (1.0, 0.85, 0.6, 0.5)
CACHE = TOKENS[-1]  # keys in the cache at decode (the prompt), and the prefill length
DEVICE = "cuda" if CUDA else "cpu"


class Model:
    """One decoder layer's weights (random, std 0.02) and a compact KV cache of every head."""

    def __init__(self):
        g = torch.Generator(device=DEVICE).manual_seed(0)

        def w(*shape):
            return (torch.randn(*shape, generator=g, device=DEVICE) * 0.02).to(DTYPE)

        D, M = HIDDEN, MLP
        self.q, self.k, self.v, self.o = w(D, D), w(D, D), w(D, D), w(D, D)
        self.gate, self.up, self.down = w(M, D), w(M, D), w(D, M)
        self.o_cm, self.down_cm = cols_major(self.o), cols_major(self.down)
        self.cache_k = w(1, HEADS, CACHE, HEAD_DIM) * 50
        self.cache_v = w(1, HEADS, CACHE, HEAD_DIM) * 50
        self.gen = g


_MODEL: Model | None = None


def model() -> Model:
    global _MODEL
    if _MODEL is None:
        _MODEL = Model()
    return _MODEL


class Plan:
    """Active heads and MLP groups for a share: whole units, at random, in order."""

    def __init__(self, share: float, m: Model):
        gen = torch.Generator().manual_seed(int(share * 1000))
        nh, ng = round(HEADS * share), round(GROUPS * share)
        self.heads = torch.randperm(HEADS, generator=gen)[:nh].sort().values
        groups = torch.randperm(GROUPS, generator=gen)[:ng].sort().values
        gsize = MLP // GROUPS
        self.q_rows = torch.cat([torch.arange(h * HEAD_DIM, (h + 1) * HEAD_DIM) for h in self.heads.tolist()])
        self.mlp_rows = torch.cat([torch.arange(u * gsize, (u + 1) * gsize) for u in groups.tolist()])
        self.q_rows, self.mlp_rows = self.q_rows.to(DEVICE), self.mlp_rows.to(DEVICE)
        self.heads = self.heads.to(DEVICE)
        self.nq = nh
        # index lists as the kernels take them: [R=1, n]
        self.q_idx, self.mlp_idx = self.q_rows[None], self.mlp_rows[None]
        self.q_to_kv = torch.arange(nh, device=DEVICE)[None]
        # the ideal: weights cut before timing
        self.q, self.k, self.v = m.q[self.q_rows], m.k[self.q_rows], m.v[self.q_rows]
        self.o = m.o[:, self.q_rows].contiguous()
        self.gate, self.up = m.gate[self.mlp_rows], m.up[self.mlp_rows]
        self.down = m.down[:, self.mlp_rows].contiguous()
        self.cache_k = m.cache_k[:, self.heads].contiguous()
        self.cache_v = m.cache_v[:, self.heads].contiguous()


def sdpa(q, k, v, causal):
    """q [1, T, h, d] -> [1, T, h, d] through SDPA (k, v [1, h, Tk, d])."""
    return F.scaled_dot_product_attention(q.transpose(1, 2), k, v, is_causal=causal).transpose(1, 2)


def op_variants(op: str, T: int, p: Plan, m: Model):
    """(backend, dense, ideal, copy, active bytes) callables of one op; copy is None where moot."""
    x = (torch.randn(1, T, HIDDEN, generator=m.gen, device=DEVICE)).to(DTYPE)
    n_q, n_mlp = p.q_rows.numel(), p.mlp_rows.numel()
    es = torch.tensor([], dtype=DTYPE).element_size()
    if op == "q_proj":
        return (lambda: gather_rows_linear(x, m.q, p.q_idx), lambda: F.linear(x, m.q), lambda: F.linear(x, p.q),
                lambda: F.linear(x, m.q[p.q_rows]), n_q * HIDDEN * es)
    if op == "attention":
        Tk = CACHE
        qa = torch.randn(1, T, HEADS * HEAD_DIM, generator=m.gen, device=DEVICE).to(DTYPE).view(1, T, HEADS, HEAD_DIM)
        q = qa[:, :, p.heads]
        if T == 1:
            K, V, Kf, Vf = p.cache_k, p.cache_v, m.cache_k, m.cache_v
        else:
            K, V, Kf, Vf = p.cache_k[:, :, :T], p.cache_v[:, :, :T], m.cache_k[:, :, :T], m.cache_v[:, :, :T]
        valid = torch.ones(1, Tk, dtype=torch.bool, device=DEVICE)
        scale = HEAD_DIM ** -0.5
        return (lambda: head_sparse_attention(q, K, V, p.q_to_kv, valid, scale), lambda: sdpa(qa, Kf, Vf, T > 1),
                lambda: sdpa(q, K, V, T > 1), None, 2 * p.nq * Tk * HEAD_DIM * es)
    if op.split("[")[0] in ("o_proj", "down_proj"):  # column gathers: o over heads, down over neurons
        full, w, w_cm, cut, idx, cols = ((HIDDEN, m.o, m.o_cm, p.o, p.q_idx, p.q_rows) if op.startswith("o_proj")
                                         else (MLP, m.down, m.down_cm, p.down, p.mlp_idx, p.mlp_rows))
        a = torch.randn(1, T, cols.numel(), generator=m.gen, device=DEVICE).to(DTYPE)
        af = torch.zeros(1, T, full, device=DEVICE, dtype=DTYPE).index_copy(-1, cols, a)  # inactive inputs 0
        W = w_cm if "cols-major" in op else w
        return (lambda: gather_cols_linear(a, W, idx), lambda: F.linear(af, W), lambda: F.linear(a, cut),
                lambda: F.linear(a, w[:, cols]), cols.numel() * HIDDEN * es)
    if op == "swiglu":
        return (lambda: gathered_swiglu(x, m.gate, m.up, p.mlp_idx),
                lambda: F.silu(F.linear(x, m.gate)) * F.linear(x, m.up),
                lambda: F.silu(F.linear(x, p.gate)) * F.linear(x, p.up),
                lambda: F.silu(F.linear(x, m.gate[p.mlp_rows])) * F.linear(x, m.up[p.mlp_rows]),
                2 * n_mlp * HIDDEN * es)
    if op in ("layer", "layer[cols-major]"):
        return layer_variants(T, p, m, cols_major_weights="cols-major" in op)
    if op == "add_rms_norm":
        r = torch.randn(1, T, HIDDEN, generator=m.gen, device=DEVICE).to(DTYPE)
        w = (1 + 0.1 * torch.randn(HIDDEN, generator=m.gen, device=DEVICE)).to(DTYPE)
        eager = lambda: rms_norm_reference(x, w, 1e-5, r)[0]  # noqa: E731
        moved = (4 * T + 1) * HIDDEN * es  # x, r and w in; y and h out
        return lambda: rms_norm(x, w, 1e-5, r)[0], eager, eager, None, moved
    if op == "rotary":
        qk = torch.randn(1, T, 2 * HEADS, HEAD_DIM, generator=m.gen, device=DEVICE).to(DTYPE)
        angles = torch.rand(1, T, HEAD_DIM // 2, generator=m.gen, device=DEVICE) * 6
        cos, sin = (torch.cat([f(angles)] * 2, -1).to(DTYPE) for f in (torch.cos, torch.sin))
        eager = lambda: rotary_reference(qk, cos, sin)  # noqa: E731
        moved = (2 * qk.numel() + 2 * cos.numel()) * es  # qk in and out, cos and sin in
        return lambda: rotary(qk, cos, sin), eager, eager, None, moved
    raise ValueError(op)


def layer_variants(T: int, p: Plan, m: Model, cols_major_weights: bool):
    """One decoder layer (no RMSNorm, no RoPE): q, k, v, attention (decode: against the cache),
    o, SwiGLU, down, with the residual adds."""
    x = torch.randn(1, T, HIDDEN, generator=m.gen, device=DEVICE).to(DTYPE)
    valid = torch.ones(1, CACHE, dtype=torch.bool, device=DEVICE)
    scale = HEAD_DIM ** -0.5
    d, nq = HEAD_DIM, p.nq
    Wo, Wd = (m.o_cm, m.down_cm) if cols_major_weights else (m.o, m.down)
    es = torch.tensor([], dtype=DTYPE).element_size()

    def kv(k, v, ck, cv):  # decode: the new token is the cache's last position
        if T == 1:
            ck[:, :, -1:].copy_(k.transpose(1, 2))
            cv[:, :, -1:].copy_(v.transpose(1, 2))
            return ck, cv
        return k.transpose(1, 2), v.transpose(1, 2)

    def backend():
        q = gather_rows_linear(x, m.q, p.q_idx).view(1, T, nq, d)
        k = gather_rows_linear(x, m.k, p.q_idx).view(1, T, nq, d)
        v = gather_rows_linear(x, m.v, p.q_idx).view(1, T, nq, d)
        K, V = kv(k, v, p.cache_k, p.cache_v)
        o = head_sparse_attention(q, K, V, p.q_to_kv, valid, scale)
        h = x + gather_cols_linear(o.view(1, T, nq * d), Wo, p.q_idx)
        return h + gather_cols_linear(gathered_swiglu(h, m.gate, m.up, p.mlp_idx), Wd, p.mlp_idx)

    def torch_layer(q_w, k_w, v_w, o_w, g_w, u_w, d_w, ck, cv, heads):
        q = F.linear(x, q_w).view(1, T, heads, d)
        k = F.linear(x, k_w).view(1, T, heads, d)
        v = F.linear(x, v_w).view(1, T, heads, d)
        K, V = kv(k, v, ck, cv)
        h = x + F.linear(sdpa(q, K, V, T > 1).reshape(1, T, heads * d), o_w)
        return h + F.linear(F.silu(F.linear(h, g_w)) * F.linear(h, u_w), d_w)

    def dense():
        return torch_layer(m.q, m.k, m.v, Wo, m.gate, m.up, Wd, m.cache_k, m.cache_v, HEADS)

    def ideal():
        return torch_layer(p.q, p.k, p.v, p.o, p.gate, p.up, p.down, p.cache_k, p.cache_v, nq)

    def copy():
        r, c = p.q_rows, p.mlp_rows
        return torch_layer(m.q[r], m.k[r], m.v[r], m.o[:, r], m.gate[c], m.up[c], m.down[:, c], p.cache_k, p.cache_v, nq)

    n_q, n_mlp = p.q_rows.numel(), p.mlp_rows.numel()
    active = (4 * n_q + 3 * n_mlp) * HIDDEN * es + (2 * nq * CACHE * d * es if T == 1 else 0)
    return backend, dense, ideal, copy, active


def prefill_flops(op: str, T: int, p: Plan) -> int:
    """The FLOPs ``op`` must do over ``T`` tokens for the plan's active units: its weight products, and for
    attention the two products over the causal query-key pairs (the least work)."""
    rows = {"q_proj": p.q_rows.numel(), "o_proj": p.q_rows.numel(), "swiglu": 2 * p.mlp_rows.numel(),
            "down_proj": p.mlp_rows.numel(), "layer": 4 * p.q_rows.numel() + 3 * p.mlp_rows.numel()}
    attention = 2 * 2 * HEAD_DIM * p.nq * T * (T + 1) // 2
    base = op.split("[")[0]
    return (attention if base in ("attention", "layer") else 0) + 2 * T * HIDDEN * rows.get(base, 0)


SHARELESS_OPS = ["add_rms_norm", "rotary"]  # no active share: timed at share 1.0 only
OPS = SHARELESS_OPS + ["q_proj", "attention", "o_proj", "o_proj[cols-major]", "swiglu", "down_proj",
                       "down_proj[cols-major]", "layer", "layer[cols-major]"]
CASES = [(op, T, share) for op in OPS for T in TOKENS
         for share in (SHARES[:1] if op in SHARELESS_OPS else SHARES)]


def measure(op: str, T: int, share: float) -> dict:
    m = model()
    p = Plan(share, m)
    backend, dense, ideal, copy, active_bytes = op_variants(op, T, p, m)
    out, ref = backend(), ideal()
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    row = dict(op=op, tokens=T, share=share, heads=p.nq, neurons=p.mlp_rows.numel(), rel_err_vs_ideal=err,
               backend_us=timed_us(backend), dense_us=timed_us(dense), ideal_us=timed_us(ideal),
               copy_us=timed_us(copy) if copy is not None else None, active_bytes=active_bytes)
    row["vs_ideal"] = row["backend_us"] / row["ideal_us"]
    row["vs_dense"] = row["backend_us"] / row["dense_us"]
    if T == 1:
        row["copy_bw_GBps"] = copy_bandwidth() / 1e9
        row["bw_share"] = active_bytes / (row["backend_us"] * 1e-6) / copy_bandwidth()
        row["ideal_bw_share"] = active_bytes / (row["ideal_us"] * 1e-6) / copy_bandwidth()
    elif op not in SHARELESS_OPS:
        flops = prefill_flops(op, T, p)
        row["matmul_TFLOPs"] = matmul_rate() / 1e12
        row["flop_share"] = flops / (row["backend_us"] * 1e-6) / matmul_rate()
        row["ideal_flop_share"] = flops / (row["ideal_us"] * 1e-6) / matmul_rate()
    assert err < (2e-2 if DTYPE == torch.bfloat16 else 1e-4), f"{op}: backend differs from the ideal by {err:.2e}"
    return row


@pytest.mark.parametrize("op,T,share", CASES)
def test_op(benchmark, op_rows, op, T, share):
    row = benchmark.pedantic(measure, args=(op, T, share), rounds=1, iterations=1)
    benchmark.extra_info.update(row)
    op_rows.append(row)
