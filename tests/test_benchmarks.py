"""The benchmark code's own arithmetic, on the CPU: what each op benchmark's variants compute and how many bytes and
FLOPs it counts, the shares and ratios of its rows, the CUDA-extension benchmark's rows, the tables and exit statuses
of the one-call GPU scripts, and benchmarks/measure.py's runner, timer and result files. A GPU session's numbers are
only as good as this code, and nothing but such a session would otherwise run it.

Byte and FLOP counts are written out by hand at the op benchmarks' dry shapes (hidden 64, 4 heads of 16, an MLP of
88 in 4 groups of 22, 7 tokens of prompt, float32) and at the extension benchmark's 7B shapes (bf16)."""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import json
import math
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
FP32 = 4
BACKEND_US, DENSE_US, IDEAL_US, COPY_US = 10.0, 20.0, 8.0, 12.0  # the faked timer's answers


@pytest.fixture
def load(monkeypatch):
    """``load(name)`` imports benchmarks/<name>.py afresh, as a dry run (``AK_BENCH_DRY=1``) on a machine without
    CUDA sees it, with a fresh ``measure`` beside it; sys.modules is as it was after the test."""
    monkeypatch.setenv("AK_BENCH_DRY", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    saved = sys.modules.pop("measure", None)
    loaded = []

    def load_module(name: str):
        spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        loaded.append(spec.name)
        spec.loader.exec_module(module)
        return module

    yield load_module
    for name in loaded + ["measure"]:
        sys.modules.pop(name, None)
    if saved is not None:
        sys.modules["measure"] = saved


class FakeBenchmark:
    """pytest-benchmark's fixture as the benchmark entries use it: ``pedantic`` runs the function once."""

    def __init__(self):
        self.extra_info = {}

    def pedantic(self, fn, args=(), kwargs=None, rounds=1, iterations=1):
        return fn(*args, **(kwargs or {}))


def units_of(share: float) -> int:
    """Active heads (and MLP groups) of 4 at ``share``."""
    return round(4 * share)


def op_bytes(op: str, T: int, heads: int, groups: int) -> int:
    """The bytes an op benchmark counts at the dry shapes: active weights (and keys and values at decode), or every
    byte read and written for the ops without a share."""
    rows, neurons = heads * 16, groups * 22
    decode_kv = 2 * heads * 7 * 16 if T == 1 else 0
    elements = {"q_proj": rows * 64, "attention": 2 * heads * 7 * 16, "o_proj": rows * 64, "swiglu": 2 * neurons * 64,
                "down_proj": neurons * 64, "layer": (4 * rows + 3 * neurons) * 64 + decode_kv,
                "add_rms_norm": (2 * T + 1) * 64 + 2 * T * 64,  # x, residual and weight in; output and sum out
                "rotary": 2 * T * 8 * 16 + 2 * T * 16}  # 8 q and k heads in and out; cos and sin in
    return elements[op.split("[")[0]] * FP32


def op_flops(op: str, T: int, heads: int, groups: int) -> int:
    """The FLOPs an op benchmark counts over ``T`` tokens at the dry shapes: 2 per multiply-add of the active weight
    products, and for attention QK^T and PV over the T(T+1)/2 causal pairs of each active head."""
    rows, neurons = heads * 16, groups * 22
    attention = 2 * (2 * 16) * heads * (T * (T + 1) // 2)
    products = {"q_proj": rows, "o_proj": rows, "swiglu": 2 * neurons, "down_proj": neurons, "attention": 0,
                "layer": 4 * rows + 3 * neurons}
    base = op.split("[")[0]
    return 2 * T * 64 * products[base] + (attention if base in ("attention", "layer") else 0)


def test_the_op_benchmarks_dry_shapes_are_the_ones_counted_here(load):
    ops = load("test_ops")
    assert (ops.HIDDEN, ops.HEADS, ops.HEAD_DIM, ops.MLP, ops.TOKENS, ops.CACHE, ops.DTYPE) == \
        (64, 4, 16, 88, (1, 7), 7, torch.float32)


def test_op_benchmark_plans_cut_whole_units_in_order(load):
    ops = load("test_ops")
    m = ops.model()
    for share in ops.SHARES:
        p = ops.Plan(share, m)
        heads = p.heads.tolist()
        assert p.nq == len(heads) == units_of(share) and heads == sorted(set(heads)), (share, heads)
        assert p.q_rows.tolist() == [h * 16 + i for h in heads for i in range(16)]
        groups = sorted({r // 22 for r in p.mlp_rows.tolist()})
        assert len(groups) == units_of(share) and p.mlp_rows.tolist() == [g * 22 + i for g in groups for i in range(22)]
        assert p.q_idx.tolist() == [p.q_rows.tolist()] and p.mlp_idx.tolist() == [p.mlp_rows.tolist()]
        assert p.q_to_kv.tolist() == [list(range(p.nq))]
        cuts = [(p.q, m.q[p.q_rows]), (p.k, m.k[p.q_rows]), (p.v, m.v[p.q_rows]), (p.o, m.o[:, p.q_rows]),
                (p.gate, m.gate[p.mlp_rows]), (p.up, m.up[p.mlp_rows]), (p.down, m.down[:, p.mlp_rows]),
                (p.cache_k, m.cache_k[:, p.heads]), (p.cache_v, m.cache_v[:, p.heads])]
        for cut, want in cuts:
            assert torch.equal(cut, want)


def test_op_benchmark_variants_compute_one_product_and_count_its_bytes_and_flops(load):
    """Per op, tokens and share: ``copy`` gives the ideal's output, ``dense`` gives it at the active units (o and
    down: the masked computation; the layer: at share 1.0, where nothing is cut), and the bytes and FLOPs counted
    are those written out here. (The backend against the ideal: the dry run in test_gpu_script.py.)"""
    ops = load("test_ops")
    m = ops.model()
    for op, T, share in ops.CASES:
        p = ops.Plan(share, m)
        _, dense, ideal, copy, active = ops.op_variants(op, T, p, m)
        case = (op, T, share)
        assert active == op_bytes(op, T, p.nq, units_of(share)), case
        if op not in ops.SHARELESS_OPS:
            assert ops.prefill_flops(op, T, p) == op_flops(op, T, p.nq, units_of(share)), case
        want = ideal()
        if copy is not None:
            torch.testing.assert_close(copy(), want, rtol=1e-6, atol=1e-6, msg=str(case))
        full, base = dense(), op.split("[")[0]
        assert full.shape[-1] == {"swiglu": 88, "attention": 16, "rotary": 16}.get(base, 64), case
        active_part = {"q_proj": (..., p.q_rows), "attention": (..., p.heads, slice(None)),
                       "swiglu": (..., p.mlp_rows)}.get(base, ...)
        if base != "layer" or share == 1.0:
            torch.testing.assert_close(full[active_part], want, rtol=1e-5, atol=1e-5, msg=str(case))


def test_op_benchmark_rows_carry_the_shares_and_ratios_of_their_times(load, monkeypatch):
    """measure's row from faked times (backend 10, dense 20, ideal 8, copy 12 us; copy bandwidth 1e9 B/s and matrix
    rate 1e12 FLOP/s, a dry run's): the ratios, bandwidth share at one token, FLOP share at seven, none for the ops
    without a share there, every key accounted for. The backend is the ideal here, so no kernel runs."""
    ops = load("test_ops")
    timings = {}
    real_variants = ops.op_variants

    def variants_timed_by_role(op, T, p, m):
        _, dense, ideal, copy, active = real_variants(op, T, p, m)
        backend = lambda: ideal()  # noqa: E731
        timings.update({id(backend): BACKEND_US, id(dense): DENSE_US, id(ideal): IDEAL_US, id(copy): COPY_US})
        return backend, dense, ideal, copy, active

    monkeypatch.setattr(ops, "op_variants", variants_timed_by_role)
    monkeypatch.setattr(ops, "timed_us", lambda fn: timings[id(fn)])
    for op in ops.OPS:
        for T in (1, 7):
            share = 1.0 if op in ops.SHARELESS_OPS else 0.6
            row = ops.measure(op, T, share)
            heads = units_of(share)
            active = op_bytes(op, T, heads, heads)
            has_copy = op not in ("attention", *ops.SHARELESS_OPS)
            dense_us = IDEAL_US if op in ops.SHARELESS_OPS else DENSE_US  # there one eager formula is both
            want = dict(op=op, tokens=T, share=share, heads=heads, neurons=22 * heads, rel_err_vs_ideal=0.0,
                        backend_us=BACKEND_US, dense_us=dense_us, ideal_us=IDEAL_US,
                        copy_us=COPY_US if has_copy else None, active_bytes=active, vs_ideal=10 / 8,
                        vs_dense=10 / dense_us)
            if T == 1:
                want.update(copy_bw_GBps=1.0, bw_share=active / 10e-6 / 1e9, ideal_bw_share=active / 8e-6 / 1e9)
            elif op not in ops.SHARELESS_OPS:
                flops = op_flops(op, T, heads, heads)
                want.update(matmul_TFLOPs=1.0, flop_share=flops / 10e-6 / 1e12, ideal_flop_share=flops / 8e-6 / 1e12)
            assert row.keys() == want.keys(), (op, T, row.keys() ^ want.keys())
            for key, value in want.items():
                assert row[key] == (value if not isinstance(value, float) else pytest.approx(value, rel=1e-12)), \
                    (op, T, key, row[key], value)


def write_results(path: Path, info: dict, rows: list[dict]) -> Path:
    path.write_text(json.dumps(dict(info=info, rows=rows)))
    return path


def test_the_op_table_shows_each_rows_times_ratios_and_peak_share(load, tmp_path):
    """gpu_kernels' table: a line per row with its times, ``-`` for a copy not timed, /ideal then /dense, and the
    peak share in percent from the bandwidth share at one token, the FLOP share above, ``-`` where neither is;
    then the copy bandwidth and matrix rate the rows carry."""
    table = load("gpu_kernels").table
    info = dict(device="GPU X", date="2026-12-07T00:00:00+00:00", torch="2.11", triton="3.6")
    rows = [dict(op="q_proj", tokens=1, share=0.5, backend_us=10.0, dense_us=20.0, ideal_us=8.0, copy_us=12.34,
                 vs_ideal=1.25, vs_dense=0.5, bw_share=0.8, copy_bw_GBps=3000.4),
            dict(op="attention", tokens=640, share=0.85, backend_us=300.0, dense_us=350.5, ideal_us=290.0,
                 copy_us=None, vs_ideal=300 / 290, vs_dense=300 / 350.5, flop_share=0.4567, matmul_TFLOPs=750.0),
            dict(op="rotary", tokens=640, share=1.0, backend_us=5.0, dense_us=9.0, ideal_us=9.0, copy_us=None,
                 vs_ideal=5 / 9, vs_dense=5 / 9)]
    lines = table(write_results(tmp_path / "ops.json", info, rows)).splitlines()
    assert lines[0].split() == ["GPU", "X", "2026-12-07T00:00:00+00:00", "torch", "2.11", "triton", "3.6"]
    assert lines[1].split()[:10] == ["op", "T", "share", "backend", "dense", "ideal", "copy", "/ideal", "/dense",
                                     "peak%"]
    assert [line.split() for line in lines[2:5]] == [
        ["q_proj", "1", "0.50", "10.0", "20.0", "8.0", "12.3", "1.25", "0.50", "80"],
        ["attention", "640", "0.85", "300.0", "350.5", "290.0", "-", "1.03", "0.86", "46"],
        ["rotary", "640", "1.00", "5.0", "9.0", "9.0", "-", "0.56", "0.56", "-"]]
    assert lines[5:] == ["copy bandwidth (read + write): 3000 GB/s", "dense bf16 matrix-product rate: 750 TFLOP/s"]
    decode_only = table(write_results(tmp_path / "decode.json", info, rows[:1])).splitlines()
    assert decode_only[3:] == ["copy bandwidth (read + write): 3000 GB/s"]
    assert len(table(write_results(tmp_path / "none.json", info, rows[2:])).splitlines()) == 3  # neither: no line


def run_main(module, monkeypatch, argv: list[str], codes: dict, result: Path | None):
    """``module.main()`` as on a CUDA machine, its stages faked: each command exits with the code of the first key
    of ``codes`` in it, and the benchmark leaves ``result`` (None: nothing). Returns (exit status, commands run)."""
    commands = []

    def fake_run(cmd, **env):
        commands.append((cmd, env))
        code = next(c for key, c in codes.items() if key in " ".join(cmd))
        return code, f"last line of {cmd[-1]}"

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(sys, "argv", ["script", *argv])
    monkeypatch.setattr(module, "run", fake_run)
    monkeypatch.setattr(module, "newest_result", lambda prefix, before: result)
    return module.main(), commands


def test_the_kernel_scripts_exit_status_counts_every_stage(load, monkeypatch, tmp_path, capsys):
    """gpu_kernels.py exits 0 only when the op tests passed, the benchmarks passed and wrote rows; the tests run
    with fixed tiles; without CUDA it does nothing and exits 1."""
    gpu_kernels = load("gpu_kernels")
    result = write_results(tmp_path / "ops.json", dict(device="GPU X", date="d", torch="t", triton="tr"), [])
    for tests, bench, written, status in [(0, 0, result, 0), (1, 0, result, 1), (0, 1, result, 1), (0, 0, None, 1),
                                          (0, 2, None, 2)]:
        rc, commands = run_main(gpu_kernels, monkeypatch, [], {"tests/ops": tests, "test_ops.py": bench}, written)
        assert rc == status, (tests, bench, written)
        (test_cmd, test_env), (bench_cmd, _) = commands
        assert "tests/ops" in test_cmd and test_env == {"ADAPTIVE_KERNELS_AUTOTUNE": "0"}
        assert "benchmarks/test_ops.py" in bench_cmd and "--benchmark-only" in bench_cmd
        shown = capsys.readouterr().out
        assert ("GPU X  d  torch t  triton tr" in shown) == (written is not None), shown
    rc, commands = run_main(gpu_kernels, monkeypatch, ["--skip-tests", "-k", "rotary"], {"test_ops.py": 0}, result)
    assert rc == 0 and len(commands) == 1 and commands[0][0][-2:] == ["-k", "rotary"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_kernels.main() == 1


def test_the_extension_scripts_exit_status_counts_every_stage(load, monkeypatch, tmp_path, capsys):
    """gpu_cuda_ext.py exits 0 only when csrc/ built, its tests passed and its benchmark passed and wrote rows; a
    failed build still runs the tests (they say why) but not the benchmark."""
    gpu_cuda_ext = load("gpu_cuda_ext")
    result = write_results(tmp_path / "cuda_ext.json", dict(device="GPU X", sms=132, date="d", torch="t", cuda="c",
                                                              triton="tr"), [])
    monkeypatch.setattr(gpu_cuda_ext, "environment", lambda: "the toolchain")
    for built, tests, bench, written, status in [(True, 0, 0, result, 0), (False, 0, 0, None, 1),
                                                 (True, 1, 0, result, 1), (True, 0, 1, result, 1),
                                                 (True, 0, 0, None, 1)]:
        monkeypatch.setattr(gpu_cuda_ext, "build", lambda verbose: (built, "the build's account"))
        rc, commands = run_main(gpu_cuda_ext, monkeypatch, [], {"tests/": tests, "benchmarks/": bench}, written)
        assert rc == status, (built, tests, bench, written)
        ran = [" ".join(cmd) for cmd, _ in commands]
        assert "tests/test_cuda_ext.py tests/test_csrc_compiles.py" in ran[0]
        assert len(ran) == (2 if built else 1) and (not built or "benchmarks/test_cuda_ext.py" in ran[1]), ran
        shown = capsys.readouterr().out
        assert ("GPU X (132 SMs)" in shown) == (written is not None), shown
        assert ("no benchmark results were written" in shown) == (written is None), shown
    for built in (True, False):
        monkeypatch.setattr(gpu_cuda_ext, "build", lambda verbose: (built, "the build's account"))
        rc, commands = run_main(gpu_cuda_ext, monkeypatch, ["--skip-tests", "--skip-bench"], {}, None)
        assert rc == (0 if built else 1) and commands == [] and "no benchmark results" not in capsys.readouterr().out


EXT_SHAPES = {"q/k/v": ("rows", 4096, 4096, 128), "o": ("cols", 4096, 4096, 128),
              "gate/up": ("rows", 11008, 4096, 344), "down": ("cols", 4096, 11008, 344)}
BF16 = 2


def test_extension_benchmark_variants_count_the_active_weight_bytes(load):
    """Per projection at 7B shapes: the active bytes are the active units' rows or columns of the weight, the full
    bytes the whole weight's; the ideal is as wide as the active rows (or the output), and on the column side the
    dense product (the active input in the full width, zeros elsewhere) is the ideal's."""
    bench = load("test_cuda_ext")
    assert bench.PROJECTIONS == EXT_SHAPES
    for projection, (side, out_f, in_f, unit) in EXT_SHAPES.items():
        for share in (0.85, 0.5):
            fns, active, full = bench.variants(projection, share, 1, torch.Generator().manual_seed(5))
            n = round(32 * share) * unit
            assert active == (n * in_f if side == "rows" else out_f * n) * BF16 and full == out_f * in_f * BF16
            ideal = fns["ideal"]().float()
            assert ideal.shape == (1, 1, n if side == "rows" else out_f), (projection, share)
            assert set(fns) == set(bench.IMPLS) - ({"triton_cols_major"} if side == "rows" else set())
            if side == "cols":
                torch.testing.assert_close(fns["dense"]().float(), ideal, rtol=2e-2, atol=2e-2)


def test_extension_benchmark_rows_carry_bandwidths_floor_and_ratios(load):
    """row_of from given times (cuda 10, padded 11, Triton 12.5, its column-major 9 on the column side, dense 20,
    ideal 8 us), 3 MB active of 8 MB and a 3 TB/s copy bandwidth: each implementation's GB/s (dense over the whole
    weight), the floor, the CUDA GEMV's bandwidth share and ratios, every key accounted for."""
    bench = load("test_cuda_ext")
    us = dict(cuda=10.0, cuda_padded=11.0, triton=12.5, triton_cols_major=9.0, dense=20.0, ideal=8.0)
    active, full, bandwidth = 3_000_000, 8_000_000, 3e12
    errors = dict(cuda_rel_err=0.001, triton_rel_err=0.002)
    for projection, cols in (("down", True), ("gate/up", False)):
        times = us if cols else {k: v for k, v in us.items() if k != "triton_cols_major"}
        row = bench.row_of(projection, 1, 0.6, times, errors, active, full, bandwidth)
        side, out_f, in_f, _ = EXT_SHAPES[projection]
        want = dict(projection=projection, side=side, tokens=1, share=0.6, out_features=out_f, in_features=in_f,
                    active_bytes=active, copy_bw_GBps=3000.0, floor_us=1.0, **errors,
                    cuda_bw_share=300.0 / 3000.0, cuda_vs_ideal=10 / 8, cuda_vs_dense=0.5, cuda_vs_triton=0.8,
                    cuda_vs_triton_cols_major=10 / 9 if cols else None)
        for impl in bench.IMPLS:
            t = times.get(impl)
            want[f"{impl}_us"] = t
            want[f"{impl}_GBps"] = None if t is None else {"dense": 400.0}.get(impl, 300.0 / t * 10)
        assert row.keys() == want.keys(), row.keys() ^ want.keys()
        for key, value in want.items():
            assert row[key] == (pytest.approx(value, rel=1e-12) if isinstance(value, float) else value), key


def test_the_extension_table_shows_each_rows_times_bandwidth_and_ratios(load, tmp_path):
    """gpu_cuda_ext's table: a line per row with the times of every implementation (``-`` for the column-major
    Triton on the row side), the floor, the CUDA GEMV's GB/s and share of the copy bandwidth in percent, its ratios
    to the ideal and to Triton; then the copy bandwidth."""
    bench, table = load("test_cuda_ext"), load("gpu_cuda_ext").table
    us = dict(cuda=10.0, cuda_padded=11.0, triton=12.5, triton_cols_major=9.0, dense=20.0, ideal=8.0)
    rows = [bench.row_of("down", 1, 0.5, us, {}, 3_000_000, 8_000_000, 3e12),
            bench.row_of("q/k/v", 1, 0.85, {k: v for k, v in us.items() if k != "triton_cols_major"}, {}, 1_500_000,
                         2_000_000, 3e12)]
    info = dict(device="GPU X", sms=132, date="2026-12-07T00:00:00+00:00", torch="2.11", cuda="12.8", triton="3.6")
    lines = table(write_results(tmp_path / "cuda_ext.json", info, rows)).splitlines()
    assert lines[0].split() == ["GPU", "X", "(132", "SMs)", "2026-12-07T00:00:00+00:00", "torch", "2.11", "CUDA",
                                "12.8", "triton", "3.6"]
    assert lines[1].split()[:14] == ["proj", "T", "share", "cuda", "padded", "triton", "tr-cmaj", "dense", "ideal",
                                     "floor", "GB/s", "bw%", "/ideal", "/triton"]
    assert [line.split() for line in lines[2:4]] == [
        ["down", "1", "0.50", "10.0", "11.0", "12.5", "9.0", "20.0", "8.0", "1.0", "300", "10", "1.25", "0.80"],
        ["q/k/v", "1", "0.85", "10.0", "11.0", "12.5", "-", "20.0", "8.0", "0.5", "150", "5", "1.25", "0.80"]]
    assert lines[4:] == ["copy bandwidth (read + write): 3000 GB/s; floor = active bytes at it"]


@pytest.mark.parametrize("error", [math.nan, 0.021, math.inf])
def test_extension_benchmark_fails_a_projection_off_the_ideal(load, monkeypatch, error):
    """A gathered product off the ideal by more than MAX_REL_ERR, or not a number, fails its benchmark entry, its
    rows still kept; one within passes."""
    bench = load("test_cuda_ext")
    rows = [dict(tokens=1, share=1.0, cuda_rel_err=0.001), dict(tokens=1, share=0.5, triton_rel_err=error)]
    monkeypatch.setattr(bench, "measure", lambda projection: rows)
    kept = []
    with pytest.raises(AssertionError, match=r"\(1, 0.5, 'triton_rel_err'\)"):
        bench.test_cuda_ext_decode_projection(FakeBenchmark(), kept, "o")
    assert kept == rows
    rows[1]["triton_rel_err"] = 0.019
    bench.test_cuda_ext_decode_projection(FakeBenchmark(), kept, "o")


@pytest.mark.parametrize("cuda", [False, True])
def test_the_sweep_entry_sweeps_every_budget(load, monkeypatch, capsys, cuda):
    """benchmarks/test_sweep.py sweeps adaptive_kernels.sweep's budgets (1.0 among them, which the ideal line and
    adherence need) into benchmarks/results/, with 48 new tokens on a GPU (the tiny model's 4 elsewhere), and
    prints the sweep's report."""
    from adaptive_kernels.sweep import BUDGETS

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    entry = load("test_sweep")
    called = {}
    rows = [SimpleNamespace(budget=1.0, ms=2.0)]
    monkeypatch.setattr(entry, "sweep", lambda **kwargs: called.update(kwargs) or rows)
    monkeypatch.setattr(entry, "report", lambda swept: f"report of {len(swept)} row")
    benchmark = FakeBenchmark()
    entry.test_latency_versus_budget(benchmark, SimpleNamespace(disabled=contextlib.nullcontext))
    assert 1.0 in BUDGETS and called == dict(budgets=BUDGETS, new_tokens=48 if cuda else 4, repeats=3 if cuda else 2,
                                             out_dir=BENCHMARKS / "results", progress=False)
    assert benchmark.extra_info["rows"] == [dict(budget=1.0, ms=2.0)] and "report of 1 row" in capsys.readouterr().out


def test_the_gpu_scripts_runner_and_result_finder(load, tmp_path, monkeypatch, capsys):
    """measure's ``run`` (what gpu_kernels.py and gpu_cuda_ext.py launch their stages with) runs the command in the
    repository root with the repository first on PYTHONPATH and the extra environment given, echoes its output and
    error in order (bytes that are not UTF-8 replaced), and returns its exit status and last line, from either.
    ``newest_result`` gives the newest result file the run wrote, copied with its CSV into $OUT where that is
    set."""
    measure = load("measure")
    monkeypatch.chdir(tmp_path)
    script = ("import os, sys; print('first'); sys.stdout.flush(); sys.stdout.buffer.write(b'caf\\xe9\\n'); "
              "print(os.environ['PYTHONPATH'].split(os.pathsep)[0]); print(os.getcwd()); print(os.environ['EXTRA']);"
              "print(); sys.stdout.flush(); print('on stderr', file=sys.stderr); raise SystemExit(3)")
    assert measure.run([sys.executable, "-c", script], EXTRA="last words") == (3, "on stderr")
    assert f"first\ncaf\ufffd\n{ROOT}\n{ROOT}\nlast words\n\non stderr\n" in capsys.readouterr().out
    results, out = tmp_path / "results", tmp_path / "out"
    for folder in (results, out):
        folder.mkdir()
    monkeypatch.setattr(measure, "RESULTS", results)
    monkeypatch.setenv("OUT", str(out))

    def write_result_files(*names):
        for name in names:
            for suffix in (".json", ".csv"):
                (results / name).with_suffix(suffix).write_text("")

    write_result_files("ops-a-1", "cuda_ext-a-3")
    before = set(results.glob("ops-*.json"))
    assert measure.newest_result("ops", before) is None and not list(out.iterdir())
    write_result_files("ops-a-2", "ops-a-3")
    assert measure.newest_result("ops", before) == results / "ops-a-3.json"
    assert sorted(p.name for p in out.iterdir()) == ["ops-a-3.csv", "ops-a-3.json"]
    monkeypatch.delenv("OUT")  # without $OUT the result stays where it is
    write_result_files("ops-a-4")
    assert measure.newest_result("ops", before) == results / "ops-a-4.json" and len(list(out.iterdir())) == 2


def test_result_rows_are_on_disk_after_each_append(load, tmp_path, monkeypatch):
    """A run cut off keeps every row it measured: after each append the JSON holds the rows so far and the CSV a
    line per row under the union of their keys, each with the run's info; the tuned configs only the JSON holds."""
    measure = load("measure")
    monkeypatch.setattr(measure, "RESULTS", tmp_path)
    rows = measure.ResultRows("ops")
    assert rows.stem.parent == tmp_path and rows.stem.name.startswith("ops-dry-") and rows.stem.name.endswith("Z")
    appended = [dict(op="q_proj", backend_us=1.5), dict(op="rotary", backend_us=2.5, bw_share=0.75)]
    for count, row in enumerate(appended, 1):
        rows.append(row)
        written = json.loads(rows.stem.with_suffix(".json").read_text())
        assert written == dict(info=rows.info, rows=appended[:count])
        with open(rows.stem.with_suffix(".csv"), newline="") as f:
            lines = list(csv.DictReader(f))
        info = {k: "" if v is None else str(v) for k, v in rows.info.items()}
        keys = dict.fromkeys(k for r in appended[:count] for k in r)
        assert lines == [{**info, **{k: str(r.get(k, "")) for k in keys}} for r in appended[:count]]
    assert rows.info["device"] == "cpu (dry run)"
    rows.info["autotune"] = {"rows/decode/(64, 16)": "BLOCK_N: 32"}  # the JSON's alone
    rows.write()
    assert json.loads(rows.stem.with_suffix(".json").read_text())["info"]["autotune"] == rows.info["autotune"]
    with open(rows.stem.with_suffix(".csv"), newline="") as f:
        assert "autotune" not in next(csv.reader(f))


def test_the_dry_timer_leaves_the_first_call_untimed(load):
    """A dry run's timer calls the op once to build it (the interpreter's first launch), then times a second call,
    in microseconds."""
    measure = load("measure")
    calls = []

    def slow_first_call():
        calls.append(time.perf_counter())
        if len(calls) == 1:
            time.sleep(0.3)
        else:
            time.sleep(0.01)

    us = measure.timed_us(slow_first_call)
    assert len(calls) == 2 and 0.01e6 <= us < 0.2e6, (calls, us)
    assert measure.copy_bandwidth() == 1e9 and measure.matmul_rate() == 1e12


@pytest.mark.parametrize("dry_env,cuda,dry", [("1", False, True), ("1", True, False), (None, False, False),
                                              ("0", False, False)])
def test_a_dry_run_is_asked_for_and_never_on_a_cuda_machine(load, monkeypatch, dry_env, cuda, dry):
    """``AK_BENCH_DRY=1`` asks for a dry run, which a CUDA machine never does: there the benchmarks time the GPU."""
    if dry_env is None:
        monkeypatch.delenv("AK_BENCH_DRY")
    else:
        monkeypatch.setenv("AK_BENCH_DRY", dry_env)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert load("measure").DRY is dry
