"""The CUDA extension's decode GEMV at LLaVA-1.5-7B shapes, bf16, one token: against Triton, dense and ideal.

Per projection (q/k/v: a 4096x4096 weight gathered by rows in 32 heads of 128; o: 4096x4096 by
columns in heads; gate/up: 11008x4096 by rows in 32 groups of 344; down: 4096x11008 by columns
in groups) and active share (1.0, 0.85, 0.6, 0.5 of the units, chosen at random, ascending as
plans list them), in one run:

- ``cuda``: ``cuda_ext.gather_rows_linear`` / ``gather_cols_linear``, the list cut to the active
  units (as ``plan.compile_plan`` gives it);
- ``cuda_padded``: the same op on the fixed-width list ``compact_plan`` gives (-1 up to the full
  count, as a graph-captured request would pass it);
- ``triton``: ``adaptive_kernels.ops.projections.gather_rows_linear`` / ``gather_cols_linear``
  (left out if they cannot be imported);
- ``dense``: ``F.linear`` on the full weight; ``ideal``: ``F.linear`` on a weight cut to the
  active units before timing.

Each time is the median over 50 calls replayed from a CUDA graph (plain calls if capture
fails), timed with CUDA events, warmed up, each after a 256 MiB read that evicts the weights from
L2. ``*_GBps`` is the active weight bytes over that time (for dense, the full weight's bytes);
``cuda_bw_share`` is that of ``cuda`` as a share of the measured device-to-device copy bandwidth
(bytes read + written); ``floor_us`` is the active bytes at that bandwidth. Rows go to
benchmarks/results/cuda_ext-<device>-<time>.{json,csv}. Skipped without CUDA.
``AK_CUDA_BENCH_TOKENS=1,16`` times other token counts (at most 16).
"""

from __future__ import annotations

import csv
import datetime
import json
import os
import statistics
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not CUDA, reason="the CUDA-extension benchmarks time GPU kernels and need CUDA")

RESULTS = Path(__file__).parent / "results"
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
IMPLS = ("cuda", "cuda_padded", "triton", "dense", "ideal")


def run_info() -> dict:
    """Device, versions and date, stored with every row."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    props = torch.cuda.get_device_properties(0)
    return dict(device=props.name, sms=props.multi_processor_count, torch=torch.__version__,
                cuda=torch.version.cuda, triton=triton_version,
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))


class Results(list):
    """Rows of one run, rewritten to results/cuda_ext-<device>-<time>.{json,csv} after each append."""

    def __init__(self):
        super().__init__()
        self.info = run_info()
        slug = self.info["device"].replace("NVIDIA ", "").replace(" ", "-")
        self.stem = RESULTS / f"cuda_ext-{slug}-{self.info['date'].replace(':', '').replace('-', '')}"

    def append(self, row: dict) -> None:
        super().append(row)
        RESULTS.mkdir(exist_ok=True)
        self.stem.with_suffix(".json").write_text(json.dumps(dict(info=self.info, rows=list(self)), indent=1))
        fields = list(self.info) + list(dict.fromkeys(k for r in self for k in r))
        with self.stem.with_suffix(".csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            for r in self:
                writer.writerow({**self.info, **r})


_SCRATCH: list[torch.Tensor] = []


def timed_us(fn, reps: int = 50) -> float:
    """Median microseconds of ``fn`` (replayed from a CUDA graph when it can be captured), CUDA events,
    each call after a 256 MiB read that evicts L2."""
    if not _SCRATCH:
        _SCRATCH.append(torch.randn(2 ** 26, device="cuda"))
    scratch = _SCRATCH[0]
    fn()  # build, compile and autotune outside the capture
    torch.cuda.synchronize()
    call, graph = fn, None
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        call = graph.replay
    except RuntimeError:
        torch.cuda.synchronize()
    for _ in range(3):
        scratch.sum()
        call()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        scratch.sum()
        start.record()
        call()
        end.record()
    torch.cuda.synchronize()
    median_ms = statistics.median(start.elapsed_time(end) for start, end in events)
    del graph
    return median_ms * 1e3


_COPY_BW: list[float] = []


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes (read + written) per second, 1 GiB copied, median of 20."""
    if not _COPY_BW:
        src = torch.empty(2 ** 28, device="cuda")
        dst = torch.empty_like(src)
        dst.copy_(src)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(20)]
        for start, end in events:
            start.record()
            dst.copy_(src)
            end.record()
        torch.cuda.synchronize()
        ms = statistics.median(start.elapsed_time(end) for start, end in events)
        _COPY_BW.append(2 * src.numel() * src.element_size() / (ms * 1e-3))
    return _COPY_BW[0]


def triton_ops():
    """(gather_rows_linear, gather_cols_linear) of ops.projections, or None when they cannot be imported."""
    try:
        from adaptive_kernels.ops.projections import gather_cols_linear, gather_rows_linear
    except ImportError:
        return None
    return gather_rows_linear, gather_cols_linear


def active_list(share: float, unit: int, full: int, gen: torch.Generator) -> torch.Tensor:
    """Rows (or columns) of round(32 * share) units picked at random, ascending: int64 [n] on CUDA."""
    units = torch.randperm(UNITS, generator=gen)[:round(UNITS * share)].sort().values
    return torch.cat([torch.arange(u * unit, min(full, (u + 1) * unit)) for u in units.tolist()]).cuda()


def variants(projection: str, share: float, T: int, gen: torch.Generator) -> tuple[dict, int, int]:
    """{impl: callable} for one projection and share, the active weight bytes and the full ones."""
    from adaptive_kernels import cuda_ext

    side, out_f, in_f, unit = PROJECTIONS[projection]
    W = (torch.randn(out_f, in_f, generator=gen) * 0.02).to(device="cuda", dtype=DTYPE)
    full = out_f if side == "rows" else in_f
    idx = active_list(share, unit, full, gen)
    n = idx.numel()
    lists = idx[None]
    padded = torch.full((1, full), -1, dtype=torch.int64, device="cuda")
    padded[0, :n] = idx
    es = W.element_size()
    triton = triton_ops()
    if side == "rows":
        x = (torch.randn(1, T, in_f, generator=gen)).to(device="cuda", dtype=DTYPE)
        cut = W[idx].contiguous()
        fns = dict(cuda=lambda: cuda_ext.gather_rows_linear(x, W, lists),
                   cuda_padded=lambda: cuda_ext.gather_rows_linear(x, W, padded),
                   dense=lambda: F.linear(x, W), ideal=lambda: F.linear(x, cut))
        if triton is not None:
            fns["triton"] = lambda: triton[0](x, W, lists)
        active = n * in_f * es
    else:
        a = (torch.randn(1, T, n, generator=gen)).to(device="cuda", dtype=DTYPE)
        a_padded = torch.zeros(1, T, full, device="cuda", dtype=DTYPE)
        a_padded[..., :n] = a
        a_full = (torch.randn(1, T, in_f, generator=gen)).to(device="cuda", dtype=DTYPE)
        cut = W[:, idx].contiguous()
        fns = dict(cuda=lambda: cuda_ext.gather_cols_linear(a, W, lists),
                   cuda_padded=lambda: cuda_ext.gather_cols_linear(a_padded, W, padded),
                   dense=lambda: F.linear(a_full, W), ideal=lambda: F.linear(a, cut))
        if triton is not None:
            fns["triton"] = lambda: triton[1](a, W, lists)
        active = out_f * n * es
    return fns, active, out_f * in_f * es


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
            row = dict(projection=projection, side=PROJECTIONS[projection][0], tokens=T, share=share,
                       out_features=PROJECTIONS[projection][1], in_features=PROJECTIONS[projection][2],
                       active_bytes=active, copy_bw_GBps=bw / 1e9, floor_us=active / bw * 1e6)
            for impl in IMPLS:
                t = us.get(impl)
                row[f"{impl}_us"] = t
                row[f"{impl}_GBps"] = None if t is None else (full if impl == "dense" else active) / (t * 1e-6) / 1e9
            row["cuda_bw_share"] = row["cuda_GBps"] * 1e9 / bw
            row["cuda_vs_ideal"] = us["cuda"] / us["ideal"]
            row["cuda_vs_dense"] = us["cuda"] / us["dense"]
            row["cuda_vs_triton"] = us["cuda"] / us["triton"] if "triton" in us else None
            rows.append(row)
            del fns
    return rows


@pytest.fixture(scope="module")
def results():
    rows = Results()
    yield rows
    if rows:
        print(f"\nCUDA-extension benchmark rows written to {rows.stem}.json and .csv")


@pytest.mark.parametrize("projection", list(PROJECTIONS))
def test_cuda_ext_decode_projection(benchmark, results, projection):
    rows = benchmark.pedantic(measure, args=(projection,), rounds=1, iterations=1)
    for row in rows:
        results.append(row)
    benchmark.extra_info["rows"] = rows


def main() -> Path:
    """Every projection without pytest (for a machine without pytest-benchmark); returns the JSON path."""
    rows = Results()
    for projection in PROJECTIONS:
        for row in measure(projection):
            rows.append(row)
    return rows.stem.with_suffix(".json")


if __name__ == "__main__":
    print(main())
