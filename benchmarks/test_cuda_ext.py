"""The CUDA extension's decode GEMV at LLaVA-1.5-7B shapes, bf16, one token: against Triton, dense and ideal.

Per projection (q/k/v: a 4096x4096 weight gathered by rows in 32 heads of 128; o: 4096x4096 by
columns in heads; gate/up: 11008x4096 by rows in 32 groups of 344; down: 4096x11008 by columns
in groups) and active share (1.0, 0.85, 0.6, 0.5 of the units, chosen at random, ascending as
plans list them), in one run:

- ``cuda``: ``cuda_ext.gather_rows_linear`` / ``gather_cols_linear``, the list cut to the active
  units (as ``plan.listed_schedule`` gives it);
- ``cuda_padded``: the same op on the fixed-width list ``compact_plan`` gives (-1 up to the full
  count, as a graph-captured request would pass it);
- ``triton``: ``adaptive_kernels.ops.projections.gather_rows_linear`` / ``gather_cols_linear``
  on the same weight; for the column side also
  ``triton_cols_major``: the Triton op on the column-major copy a patched model keeps (the layout
  each backend reads o/down in decides which one the ``cuda`` backend uses there);
- ``dense``: ``F.linear`` on the full weight (on the column side its input is the active one in the
  full width, zeros elsewhere: the masked computation); ``ideal``: ``F.linear`` on a weight cut to the
  active units before timing.

Each time is the median over 30 calls replayed from a CUDA graph, timed with CUDA events, warmed
up, each after a 256 MiB read that evicts the weights from L2. ``*_GBps`` is the active weight
bytes over that time (for dense, the full weight's bytes); ``<impl>_rel_err`` is each gathered
product's relative error against ``ideal``'s (the test fails above ``MAX_REL_ERR``, its rows
kept); ``cuda_bw_share`` is that of ``cuda`` as a share of the measured device-to-device copy
bandwidth (bytes read + written); ``floor_us`` is the active bytes at that bandwidth. Rows go to
benchmarks/results/cuda_ext-<device>-<time>.{json,csv}. Skipped without CUDA.
``AK_CUDA_BENCH_TOKENS=1,16`` times other token counts (at most 16).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from adaptive_kernels.ops.projections import cols_major, gather_cols_linear, gather_rows_linear
from measure import ResultRows, copy_bandwidth, timed_us

CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not CUDA, reason="the CUDA-extension benchmarks time GPU kernels and need CUDA")

DTYPE = torch.bfloat16
UNITS = 32
SHARES = (1.0, 0.85, 0.6, 0.5)
TOKENS = tuple(int(t) for t in os.environ.get("AK_CUDA_BENCH_TOKENS", "1").split(","))
# name: (gathered side, out_features, in_features, rows or columns per unit)
PROJECTIONS = {
    "q/k/v": ("rows", 4096, 4096, 128),
    "o": ("cols", 4096, 4096, 128),
    "gate/up": ("rows", 11008, 4096, 344),
    "down": ("cols", 4096, 11008, 344),
}
IMPLS = ("cuda", "cuda_padded", "triton", "triton_cols_major", "dense", "ideal")
MAX_REL_ERR = 2e-2  # of each gathered product against the ideal's (bf16, the norm of the difference)
DEVICE = "cuda" if CUDA else "cpu"  # on the CPU the tests build the variants to check this code, and time nothing


def active_list(share: float, unit: int, full: int, gen: torch.Generator) -> torch.Tensor:
    """Rows (or columns) of round(32 * share) units picked at random, ascending: int64 [n] on ``DEVICE``."""
    units = torch.randperm(UNITS, generator=gen)[:round(UNITS * share)].sort().values
    return torch.cat([torch.arange(u * unit, min(full, (u + 1) * unit)) for u in units.tolist()]).to(DEVICE)


def variants(projection: str, share: float, T: int, gen: torch.Generator) -> tuple[dict, int, int]:
    """{impl: callable} for one projection and share, the active weight bytes and the full ones."""
    from adaptive_kernels import cuda_ext

    side, out_f, in_f, unit = PROJECTIONS[projection]
    W = (torch.randn(out_f, in_f, generator=gen) * 0.02).to(device=DEVICE, dtype=DTYPE)
    full = out_f if side == "rows" else in_f
    idx = active_list(share, unit, full, gen)
    n = idx.numel()
    lists = idx[None]
    padded = torch.full((1, full), -1, dtype=torch.int64, device=DEVICE)
    padded[0, :n] = idx
    es = W.element_size()
    if side == "rows":
        x = (torch.randn(1, T, in_f, generator=gen)).to(device=DEVICE, dtype=DTYPE)
        cut = W[idx].contiguous()
        fns = dict(cuda=lambda: cuda_ext.gather_rows_linear(x, W, lists),
                   cuda_padded=lambda: cuda_ext.gather_rows_linear(x, W, padded),
                   triton=lambda: gather_rows_linear(x, W, lists),
                   dense=lambda: F.linear(x, W), ideal=lambda: F.linear(x, cut))
        active = n * in_f * es
    else:
        a = (torch.randn(1, T, n, generator=gen)).to(device=DEVICE, dtype=DTYPE)
        a_padded = torch.zeros(1, T, full, device=DEVICE, dtype=DTYPE)
        a_padded[..., :n] = a
        a_full = torch.zeros(1, T, in_f, device=DEVICE, dtype=DTYPE).index_copy(-1, idx, a)  # the masked input
        cut = W[:, idx].contiguous()
        W_cols_major = cols_major(W)
        fns = dict(cuda=lambda: cuda_ext.gather_cols_linear(a, W, lists),
                   cuda_padded=lambda: cuda_ext.gather_cols_linear(a_padded, W, padded),
                   triton=lambda: gather_cols_linear(a, W, lists),
                   triton_cols_major=lambda: gather_cols_linear(a, W_cols_major, lists),
                   dense=lambda: F.linear(a_full, W), ideal=lambda: F.linear(a, cut))
        active = out_f * n * es
    return fns, active, out_f * in_f * es


def row_of(projection: str, T: int, share: float, us: dict, errors: dict, active: int, full: int,
           bandwidth: float) -> dict:
    """One projection's row at ``T`` tokens and ``share``: ``us`` the median microseconds per implementation (of
    ``IMPLS``; ``triton_cols_major`` on the column side only), ``errors`` the ``<impl>_rel_err`` of the gathered
    ones, ``active`` and ``full`` the active and whole weight bytes, ``bandwidth`` the copy bandwidth in bytes
    (read + written) per second."""
    side, out_features, in_features, _ = PROJECTIONS[projection]
    row = dict(projection=projection, side=side, tokens=T, share=share, out_features=out_features,
               in_features=in_features, active_bytes=active, copy_bw_GBps=bandwidth / 1e9,
               floor_us=active / bandwidth * 1e6, **errors)
    for impl in IMPLS:
        t = us.get(impl)
        row[f"{impl}_us"] = t
        row[f"{impl}_GBps"] = None if t is None else (full if impl == "dense" else active) / (t * 1e-6) / 1e9
    row["cuda_bw_share"] = row["cuda_GBps"] * 1e9 / bandwidth
    row["cuda_vs_ideal"] = us["cuda"] / us["ideal"]
    row["cuda_vs_dense"] = us["cuda"] / us["dense"]
    row["cuda_vs_triton"] = us["cuda"] / us["triton"]
    row["cuda_vs_triton_cols_major"] = us["cuda"] / us["triton_cols_major"] if "triton_cols_major" in us else None
    return row


def measure(projection: str) -> list[dict]:
    """Rows of one projection: every share, token count and implementation, timed in this process."""
    from adaptive_kernels import cuda_ext

    cuda_ext.load()
    bw = copy_bandwidth()
    rows = []
    for T in TOKENS:
        for share in SHARES:
            gen = torch.Generator().manual_seed(int(share * 1000) + T)
            fns, active, full = variants(projection, share, T, gen)
            us = {impl: timed_us(fn) for impl, fn in fns.items()}
            ideal = fns["ideal"]().float()
            errors = {}
            for impl, fn in fns.items():
                if impl in ("dense", "ideal"):
                    continue
                out = fn().float()  # a padded rows list gives an output column per entry, 0 at its -1s
                want = F.pad(ideal, (0, out.shape[-1] - ideal.shape[-1]))
                errors[f"{impl}_rel_err"] = ((out - want).norm() / ideal.norm()).item()
            rows.append(row_of(projection, T, share, us, errors, active, full, bw))
            del fns
    return rows


@pytest.fixture(scope="module")
def results():
    rows = ResultRows("cuda_ext")
    yield rows
    if rows:
        print(f"\nCUDA-extension benchmark rows written to {rows.stem}.json and .csv")


@pytest.mark.parametrize("projection", list(PROJECTIONS))
def test_cuda_ext_decode_projection(benchmark, results, projection):
    rows = benchmark.pedantic(measure, args=(projection,), rounds=1, iterations=1)
    for row in rows:
        results.append(row)
    benchmark.extra_info["rows"] = rows
    wrong = {(row["tokens"], row["share"], name): error for row in rows for name, error in row.items()
             if name.endswith("_rel_err") and not error < MAX_REL_ERR}
    assert not wrong, f"{projection}: (tokens, share, impl) off the ideal by more than {MAX_REL_ERR}: {wrong}"


def main() -> Path:
    """Every projection without pytest (for a machine without pytest-benchmark); returns the JSON path."""
    rows = ResultRows("cuda_ext")
    for projection in PROJECTIONS:
        for row in measure(projection):
            rows.append(row)
    return rows.stem.with_suffix(".json")


if __name__ == "__main__":
    print(main())
