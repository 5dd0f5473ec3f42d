"""What the op benchmarks share: run stamps, result files, graph-replayed timing, copy bandwidth and matrix rate."""

from __future__ import annotations

import csv
import datetime
import functools
import json
import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
# AK_BENCH_DRY=1 on a machine without CUDA: tiny shapes through Triton's interpreter, plain timers,
# to check the benchmark code itself
DRY = os.environ.get("AK_BENCH_DRY") == "1" and not torch.cuda.is_available()


def fmt(value, spec: str) -> str:
    """``value`` formatted by ``spec``; "-" for None (a number not measured)."""
    return "-" if value is None else format(value, spec)


def run(cmd: list[str], **env) -> tuple[int, str]:
    """Run ``cmd`` in the repository root (on PYTHONPATH), with ``env`` added to the environment, echoing its
    output: (exit status, its last non-empty line)."""
    print("$", " ".join(cmd), flush=True)
    start = time.time()
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])), **env}
    last = ""
    with subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          errors="replace") as proc:
        for line in proc.stdout:
            print(line, end="", flush=True)
            if line.strip():
                last = line.strip()
    print(f"-> exit {proc.returncode} after {time.time() - start:.0f} s", flush=True)
    return proc.returncode, last


def newest_result(prefix: str, before: set) -> Path | None:
    """The newest results/<prefix>-*.json not in ``before`` (None: none was written since), copied with its CSV
    into $OUT when that is set."""
    new = sorted(set(RESULTS.glob(f"{prefix}-*.json")) - before)
    if not new:
        return None
    if os.environ.get("OUT"):
        for f in (new[-1], new[-1].with_suffix(".csv")):
            shutil.copy(f, os.environ["OUT"])
    return new[-1]


def run_info() -> dict:
    """Device name, library versions and the date, stored with every row."""
    from adaptive_kernels.measuring import run_stamp  # not at import: conftest sets TRITON_INTERPRET first

    info = dict(device="cpu (dry run)", cuda=torch.version.cuda, **run_stamp())
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, sms=props.multi_processor_count)
    return info


class ResultRows(list):
    """Rows of one run, rewritten to results/<prefix>-<device>-<time>.{json,csv} after each append,
    so an interrupted run keeps what it measured. Each CSV row carries the run's info but its tuned
    configs (``info["autotune"]``, one per kernel and key), which only the JSON holds."""

    def __init__(self, prefix: str):
        super().__init__()
        self.info = run_info()
        slug = "dry" if DRY else self.info["device"].replace("NVIDIA ", "").replace(" ", "-")
        started = datetime.datetime.fromisoformat(self.info["date"])
        self.stem = RESULTS / f"{prefix}-{slug}-{started:%Y%m%dT%H%M%SZ}"

    def append(self, row: dict) -> None:
        super().append(row)
        self.write()

    def write(self) -> None:
        from adaptive_kernels.measuring import whole_file  # not at import: conftest sets TRITON_INTERPRET first

        RESULTS.mkdir(exist_ok=True)
        with whole_file(self.stem.with_suffix(".json")) as f:
            f.write(json.dumps(dict(info=self.info, rows=list(self)), indent=1))
        info = {k: v for k, v in self.info.items() if k != "autotune"}
        fields = list(info) + list(dict.fromkeys(k for r in self for k in r))
        with whole_file(self.stem.with_suffix(".csv")) as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            for r in self:
                writer.writerow({**info, **r})


_SCRATCH: list[torch.Tensor] = []


def timed_us(fn, reps: int = 30) -> float:
    """Median microseconds of ``fn`` replayed from a CUDA graph, timed with CUDA events; before each
    call a 256 MiB read evicts L2 with clean lines, so that weights come from memory as in a real
    forward pass (no dirty write-back competing). A capture that fails raises: timed as plain calls,
    one variant of a row would carry the host's launch time and the others not."""
    if DRY:
        fn()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e6
    if not _SCRATCH:
        _SCRATCH.append(torch.randn(2 ** 26, device="cuda"))
    scratch = _SCRATCH[0]
    fn()  # build, compile and autotune outside the capture
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(3):
        scratch.sum()
        graph.replay()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        scratch.sum()
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    median_ms = statistics.median(start.elapsed_time(end) for start, end in events)
    del graph
    return median_ms * 1e3


@functools.cache
def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes (read + written) per second (``adaptive_kernels.measuring``'s),
    measured once per benchmark session."""
    from adaptive_kernels import measuring  # not at import: conftest sets TRITON_INTERPRET for dry runs first

    return 1e9 if DRY else measuring.copy_bandwidth("cuda")


@functools.cache
def matmul_rate() -> float:
    """Dense bf16 matrix-product rate in FLOPs per second (``adaptive_kernels.measuring``'s), measured once per
    benchmark session."""
    from adaptive_kernels import measuring  # not at import: conftest sets TRITON_INTERPRET for dry runs first

    return 1e12 if DRY else measuring.matmul_rate("cuda", torch.bfloat16)
