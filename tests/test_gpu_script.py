"""benchmarks/gpu_end_to_end.sh on the CPU: a stage that fails or runs out of time is reported and the next one
runs, and the report (tables, redrawn plot, packed results) works; and the op benchmarks its ops stage runs work at
tiny shapes. So a GPU session's one call is not lost to the code around the measurements."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def checkout_copy(tmp_path: Path) -> Path:
    """The package and benchmarks/ copied under ``tmp_path`` (the stages write under benchmarks/results/, and the
    script puts its folder on PYTHONPATH)."""
    work = tmp_path / "checkout"
    shutil.copytree(ROOT / "adaptive_kernels", work / "adaptive_kernels", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "benchmarks", work / "benchmarks", ignore=shutil.ignore_patterns("results", "__pycache__"))
    (work / "benchmarks" / "results").mkdir()
    return work


def test_gpu_script_reports_failed_and_cut_stages(tmp_path):
    work = checkout_copy(tmp_path)
    out = tmp_path / "out"
    # the sweep takes what the extension's stage left of their 60 s: its first row took 8 s on a 2-core machine, its
    # whole run longer
    env = {**os.environ, "OUT": str(out), "STAGES": "ext sweep", "EXT_SECONDS": "30", "SWEEP_SECONDS": "30",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(["bash", "benchmarks/gpu_end_to_end.sh"], cwd=work, env=env, capture_output=True, text=True,
                          timeout=600)
    report = done.stdout[-3000:] + done.stderr[-2000:]
    assert done.returncode == 1, report  # the extension's stage needs CUDA
    verdicts = done.stdout.strip().splitlines()[-2:]
    assert verdicts[0] == "ext: FAILED (exit 1; see gpu.log)", report
    assert re.fullmatch(r"sweep: (TIMED OUT after \d+ s|ok in \d+ s)", verdicts[1]), report
    limit, began = map(int, re.search(r"== sweep \((\d+) s at most, from (\d+) s\)", done.stdout).groups())
    assert 60 <= limit + began <= 61, report  # the time the extension's stage left went to the sweep
    assert "ratio (bound)" in done.stdout and "decode ms per token" in done.stdout, report
    with tarfile.open(out / "results.tar.gz") as packed:
        names = set(packed.getnames())
        sweep_csv = packed.extractfile("benchmarks/results/sweep-tiny.csv").read().decode()
    assert {"gpu.log", "benchmarks/results/sweep-tiny.csv", "benchmarks/results/sweep-tiny-targets.json",
            "benchmarks/results/sweep-tiny.png"} <= names, names
    # budget 1.0 first, which the ideal line and adherence need, then each budget for both variants
    measured = [(r["variant"], float(r["budget"])) for r in csv.DictReader(io.StringIO(sweep_csv))
                if r["system"] == "adaptive"]
    order = [(variant, b) for b in (1.0, 0.5, 0.7, 0.9, 0.6, 0.8) for variant in ("L", "H")]
    assert measured and measured == order[:len(measured)], measured


def test_gpu_script_refuses_an_unknown_stage_before_running_any(tmp_path):
    """A mistyped name in STAGES stops the call at once, naming it, rather than after the stages before it ran
    (whose results the exit would then leave unreported)."""
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "STAGES": "ext sweeep",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_end_to_end.sh")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "STAGES: unknown stage sweeep" in done.stdout
    assert "== ext" not in (out / "gpu.log").read_text()


def test_a_stage_cut_off_releases_the_extension_builds_lock(tmp_path):
    """A stage killed while it built csrc/ leaves torch's build lock behind; the next stage's build would wait on it
    until its own limit, so the script removes it."""
    builds = tmp_path / "extensions"
    lock = builds / "adaptive_kernels_cuda_0123456789ab" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    env = {**os.environ, "OUT": str(tmp_path / "out"), "STAGES": "sweep ops", "SWEEP_SECONDS": "1",
           "TORCH_EXTENSIONS_DIR": str(builds),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(["bash", "benchmarks/gpu_end_to_end.sh"], cwd=checkout_copy(tmp_path), env=env,
                          capture_output=True, text=True, timeout=300)
    assert "sweep: TIMED OUT after 1 s" in done.stdout.splitlines(), done.stdout + done.stderr
    assert not lock.exists()


def run_with_pytest_stand_in(tmp_path: Path, pytest_body: str, **env_vars) -> tuple[subprocess.CompletedProcess,
                                                                                      Path]:
    """The script's tests stage run with a python3 whose ``-m pytest`` runs ``pytest_body`` (bash; every other python3
    call runs the real interpreter), started with SIGINT at its default, as a shell in the foreground starts it:
    (the finished run, $OUT)."""
    stand_in = tmp_path / "bin" / "python3"
    stand_in.parent.mkdir()
    stand_in.write_text(f"""#!/usr/bin/env bash
if [ "$1 $2" = "-m pytest" ]; then
{pytest_body}
fi
exec {sys.executable} "$@"
""")
    stand_in.chmod(0o755)
    out = tmp_path / "out"
    env = {**{k: v for k, v in os.environ.items() if k != "ADAPTIVE_KERNELS_AUTOTUNE"}, "OUT": str(out),
           "STAGES": "tests", "PATH": f"{stand_in.parent}{os.pathsep}{os.environ.get('PATH', '')}", **env_vars}
    done = subprocess.run(["bash", "benchmarks/gpu_end_to_end.sh"], cwd=checkout_copy(tmp_path), env=env,
                          capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    return done, out


def test_a_stage_out_of_time_gets_sigint_first(tmp_path):
    """A stage out of time gets SIGINT, on which pytest still logs its summary (which tests failed), where SIGTERM
    ended it with nothing logged."""
    done, out = run_with_pytest_stand_in(tmp_path, """  trap 'echo "pytest stand-in: SIGINT"; exit 2' INT
  while :; do sleep 0.1; done""", TEST_SECONDS="5")
    assert re.search(r"^tests: TIMED OUT after \d s$", done.stdout, re.M), done.stdout + done.stderr
    assert "pytest stand-in: SIGINT" in (out / "gpu.log").read_text()


def test_a_stage_ignoring_sigint_is_killed_and_reported_out_of_time(tmp_path):
    """A stage that ignores the SIGINT at its limit gets SIGKILL 10 s later (timeout's exit 137), and that too is
    reported as out of time, not as a failure."""
    done, _ = run_with_pytest_stand_in(tmp_path, "  trap '' INT\n  while :; do sleep 0.1; done", TEST_SECONDS="2")
    assert re.search(r"^tests: TIMED OUT after \d s$", done.stdout, re.M), done.stdout + done.stderr
    assert done.returncode == 1


def test_a_failed_stage_makes_the_call_exit_non_zero(tmp_path):
    """A stage that fails (at once, so that no stage times out) is reported as FAILED with its exit status, and the
    call exits 1."""
    done, _ = run_with_pytest_stand_in(tmp_path, "  exit 3")
    assert "tests: FAILED (exit 3; see gpu.log)" in done.stdout.splitlines(), done.stdout + done.stderr
    assert done.returncode == 1, done.stdout + done.stderr


def test_the_tests_stage_runs_the_listed_files_with_autotuning_off(tmp_path):
    """The test files the script's header lists (the CUDA cases the project owes) are what its tests stage hands
    pytest, with ADAPTIVE_KERNELS_AUTOTUNE=0 (fixed tile configs)."""
    listed = ["tests/test_cuda_ext.py", "tests/test_backends.py", "tests/test_generation.py",
              "tests/test_graph_safe.py", "tests/test_plan.py", "tests/ops"]
    header = (ROOT / "benchmarks" / "gpu_end_to_end.sh").read_text().split("set -uo")[0]
    assert all(name in header for name in listed), header
    seen = tmp_path / "pytest-args"
    done, _ = run_with_pytest_stand_in(
        tmp_path, f'  printf "%s\\n" "AUTOTUNE=${{ADAPTIVE_KERNELS_AUTOTUNE:-unset}}" "$@" > {seen}; exit 0')
    assert done.returncode == 0, done.stdout + done.stderr
    args = seen.read_text().splitlines()
    assert args[0] == "AUTOTUNE=0" and set(listed) <= set(args), args


def test_gpu_script_prints_its_help_and_refuses_arguments(tmp_path):
    """It is set up by environment variables: --help prints its header, any other argument is refused; neither
    starts a stage (it ignored arguments, so --help began the whole GPU run)."""
    env = {**os.environ, "OUT": str(tmp_path / "out")}
    script = str(ROOT / "benchmarks" / "gpu_end_to_end.sh")
    shown = subprocess.run(["bash", script, "--help"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and shown.stdout.startswith("Every GPU check the project owes"), shown
    assert "STAGES=" in shown.stdout and "SANITIZE_SECONDS" in shown.stdout and "#" not in shown.stdout
    refused = subprocess.run(["bash", script, "tests"], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=60)
    assert refused.returncode == 2 and "takes no arguments" in refused.stderr and "got: tests" in refused.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a CUDA machine the op benchmarks time the GPU, not a dry run "
                    "(benchmarks/gpu_kernels.py runs them there)")
def test_op_benchmarks_run_dry_and_their_table_reads_them(tmp_path):
    """``AK_BENCH_DRY=1 pytest benchmarks/test_ops.py --benchmark-only`` runs every case at tiny shapes through
    Triton's interpreter (each compares its gathered op with the ideal), writes a row per case, and gpu_kernels'
    table, which the GPU script prints, reads them: otherwise nothing but a GPU session would run this code."""
    work = checkout_copy(tmp_path)
    # without TRITON_INTERPRET, which a dry run sets itself (benchmarks/conftest.py) where no GPU runs the kernels
    env = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, "AK_BENCH_DRY": "1",
           "PYTHONPATH": str(work)}
    done = subprocess.run([sys.executable, "-m", "pytest", "benchmarks/test_ops.py", "--benchmark-only", "-q",
                           "-p", "no:cacheprovider"], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    (written,) = (work / "benchmarks" / "results").glob("ops-dry-*.json")
    record = json.loads(written.read_text())
    rows = record["rows"]
    with open(written.with_suffix(".csv"), newline="") as f:  # the run's info on every row, its tuned configs not
        csv_rows = list(csv.DictReader(f))
    assert "autotune" in record["info"] and "autotune" not in csv_rows[0], csv_rows[0].keys()
    info = {k: "" if v is None else str(v) for k, v in record["info"].items() if k != "autotune"}  # None: empty
    assert [{k: r[k] for k in info} for r in csv_rows] == [info] * len(rows)
    assert [r["op"] for r in csv_rows] == [r["op"] for r in rows]
    ops = {"add_rms_norm", "rotary", "q_proj", "attention", "o_proj", "o_proj[cols-major]", "swiglu", "down_proj",
           "down_proj[cols-major]", "layer", "layer[cols-major]"}
    cases = {(r["op"], r["tokens"], r["share"]) for r in rows}
    assert len(cases) == len(rows) == 2 * 2 + 9 * 2 * 4 and {op for op, _, _ in cases} == ops, cases
    for r in rows:
        assert 0 <= r["rel_err_vs_ideal"] < 1e-4 and r["backend_us"] > 0 and r["ideal_us"] > 0, r
        peak = "bw_share" if r["tokens"] == 1 else None if r["op"] in ("add_rms_norm", "rotary") else "flop_share"
        assert peak is None or r[peak] > 0, r
    shown = subprocess.run([sys.executable, "-c", f"import gpu_kernels, pathlib; print(gpu_kernels.table("
                            f"pathlib.Path({str(written)!r})))"], cwd=work / "benchmarks", env=env,
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0].startswith("cpu (dry run)") and lines[1].startswith("op"), lines[:2]
    assert len(lines) == 2 + len(rows) + 2, lines  # a line per row, then copy bandwidth and matrix rate

