"""How the package measures and records: timers (wall, CUDA graph replay, GPU kernel sums), the device's copy
bandwidth and matrix-product rate, what a run records of itself, and result files written whole."""

from __future__ import annotations

import contextlib
import csv
import datetime
import gc
import importlib.metadata
import os
import platform
import re
import statistics
import time
from pathlib import Path

import torch

from .errors import ArgumentTypeError
from .graphs import graph_safe


def median_timer(device: str):
    """``median_ms(fn, repeats)``: one warm-up call of ``fn``, then the median ms of ``repeats`` timed calls
    (``_once_ms``), each without garbage collection."""
    def median_ms(fn, repeats: int) -> float:
        fn()  # warm-up: compilation, allocator, autotuning
        times = []
        for _ in range(repeats):
            with _no_garbage_collection():
                times.append(_once_ms(fn, device))
        return statistics.median(times)
    return median_ms


def _once_ms(fn, device: str) -> float:
    """Wall time of one call of ``fn``: ms (between CUDA events on CUDA, from an idle device: a start queued behind
    earlier work, a warm-up's say, would miss the host time the call spent meanwhile)."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


@contextlib.contextmanager
def _no_garbage_collection():
    """No garbage collection inside: collected before, re-enabled after (as timeit does); a collection
    that lands inside one timed call adds its own time to that call only."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def graph_replay_ms(fn, median_ms, repeats: int) -> float:
    """Median ms of a replay of ``fn`` captured as one CUDA graph. Warmed up first on a side stream within
    ``graph_safe()``, so that the kernels of the captured shapes compile (and tune) outside the capture."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), graph_safe():
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return median_ms(graph.replay, repeats)


def kernel_ms(fn) -> float:
    """Sum of the CUDA kernel times of one call of ``fn``, from torch.profiler: ms; NaN where the profiler
    saw no kernel time (it measured nothing)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    total = sum(e.self_device_time_total for e in prof.key_averages())
    return total / 1e3 if total > 0 else float("nan")


def copy_bandwidth(device: str) -> float:
    """Copy bandwidth on ``device`` in bytes (read + written) per second: 1 GiB copied on CUDA (64 MiB on
    the CPU), median of 20, measured at each call (on the CPU it depends on the threads set)."""
    src = torch.empty(2 ** (28 if device == "cuda" else 24), device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    ms = statistics.median(_once_ms(lambda: dst.copy_(src), device) for _ in range(20))
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def matmul_rate(device: str, dtype: torch.dtype) -> float:
    """Dense matrix-product rate on ``device`` in FLOPs per second: a square product in ``dtype`` of
    8192 on CUDA (512 on the CPU), median of 20, measured at each call (on the CPU it depends on the threads set)."""
    n = 8192 if device == "cuda" else 512
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    a @ b
    ms = statistics.median(_once_ms(lambda: a @ b, device) for _ in range(20))
    return 2 * n ** 3 / (ms * 1e-3)


def device_name(device: str) -> str:
    """The GPU's name on CUDA, else the CPU's model name (Linux), the processor's or the machine's architecture."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        cpu_info = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpu_info = ""
    model_names = re.findall(r"^model name\s*:\s*(.+)$", cpu_info, flags=re.MULTILINE)
    return model_names[0].strip() if model_names else platform.processor() or platform.machine() or "cpu"


def default_dtype(device: str) -> torch.dtype:
    """The dtype a model is timed in unless told: bfloat16 on CUDA, float32 on the CPU."""
    return torch.bfloat16 if device == "cuda" else torch.float32


def package_version(name: str) -> str:
    """The installed version of the distribution ``name``, or "not installed"."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def run_stamp() -> dict:
    """What every result row records of its run besides the device: torch's, transformers' and Triton's
    versions and the UTC date (ISO 8601, seconds)."""
    return dict(torch=torch.__version__, transformers=package_version("transformers"),
                triton=package_version("triton"),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


@contextlib.contextmanager
def cpu_threads(threads: int | None):
    """torch's CPU threads set to ``threads`` (None: left as they are) within the block, restored after."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def make_out_dir(name: str, out_dir, files=()) -> Path:
    """Make the folder ``out_dir`` (a str or Path) and return it; ``ValueError`` naming ``name`` where it is an
    empty str (which Path reads as the current folder), cannot be a folder, a file cannot be created in it, or one
    of ``files`` (the names the job writes there) is a folder (before anything is timed)."""
    import tempfile

    if not isinstance(out_dir, (str, Path)):
        raise ArgumentTypeError(f"{name} must be a str or Path of a folder, got {out_dir!r}")
    if isinstance(out_dir, str) and not out_dir:
        raise ValueError(f"{name}: an empty path names no folder")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{name}: {out} exists and is not a folder")
    for file in files:
        for written in (out / file, part_file(out / file)):
            if written.is_dir():
                raise ValueError(f"{name}: {written} is a folder, where the job writes a file")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"{name}: cannot make the folder {out} ({error.strerror or error})") from error
    try:
        with tempfile.TemporaryFile(dir=out):  # removed on closing
            pass
    except OSError as error:
        raise ValueError(f"{name}: the folder {out} cannot be written ({error.strerror or error})") from error
    return out


def part_file(path: Path) -> Path:
    """Where ``whole_file`` writes ``path`` before it renames it: ``<name>.part`` beside it."""
    return path.with_name(f"{path.name}.part")


@contextlib.contextmanager
def whole_file(path: Path):
    """A text file open for writing whose contents replace ``path`` at once when the block ends without error
    (written beside it as ``<name>.part``, then renamed): a run killed mid-write, as a time limit does, or a
    write that fails, leaves the previous file whole."""
    part = part_file(path)
    try:
        with open(part, "w", newline="") as f:
            yield f
        os.replace(part, path)
    except BaseException:
        part.unlink(missing_ok=True)
        raise


def write_csv(records: list[dict], path: Path) -> None:
    """``records`` (dicts with the same keys) as a CSV file at ``path``, None as an empty cell (csv's way)."""
    with whole_file(path) as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)


def pyplot(skipped: str):
    """``matplotlib.pyplot`` drawing to files (Agg), or None, with a note that ``skipped`` is skipped,
    where matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"note: matplotlib is not installed (pip install 'adaptive_kernels[plot]'); skipping {skipped}")
        return None
    return plt
