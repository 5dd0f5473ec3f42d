"""On a CUDA machine, everything about the Triton ops in one call: the op tests on CUDA (bf16
included), then the op benchmarks (benchmarks/test_ops.py), then a short table, printed last.

    PYTHONPATH=. python3 benchmarks/gpu_kernels.py [--skip-tests] [-k PYTEST_EXPR]

The results land in benchmarks/results/ops-<device>-<time>.{json,csv} (and in $OUT when set).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from measure import RESULTS, fmt, newest_result, run


def table(path: Path) -> str:
    data = json.loads(path.read_text())
    info, rows = data["info"], data["rows"]
    lines = [f"{info['device']}  {info['date']}  torch {info['torch']}  triton {info['triton']}",
             f"{'op':<22}{'T':>4}{'share':>6}{'backend':>9}{'dense':>9}{'ideal':>9}{'copy':>9}"
             f"{'/ideal':>8}{'/dense':>8}{'peak%':>6}   (us; peak: copy bandwidth at T=1, matrix rate above)"]
    for r in rows:
        peak = r.get("bw_share") or r.get("flop_share")
        lines.append(f"{r['op']:<22}{r['tokens']:>4}{r['share']:>6.2f}{r['backend_us']:>9.1f}{r['dense_us']:>9.1f}"
                     f"{r['ideal_us']:>9.1f}{fmt(r['copy_us'], '9.1f'):>9}{r['vs_ideal']:>8.2f}{r['vs_dense']:>8.2f}"
                     f"{fmt(peak and 100 * peak, '6.0f'):>6}")
    bandwidth = next((r["copy_bw_GBps"] for r in rows if r.get("copy_bw_GBps")), None)
    rate = next((r["matmul_TFLOPs"] for r in rows if r.get("matmul_TFLOPs")), None)
    if bandwidth:
        lines.append(f"copy bandwidth (read + write): {bandwidth:.0f} GB/s")
    if rate:
        lines.append(f"dense bf16 matrix-product rate: {rate:.0f} TFLOP/s")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-tests", action="store_true",
                        help="only the benchmarks: skip the GPU run of tests/ops before them")
    parser.add_argument("-k", default=None, help="pytest -k expression for the benchmarks")
    args = parser.parse_args()
    import torch
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to do here (the CPU runs tests/ops through the Triton interpreter)")
        return 1
    rc = 0
    if not args.skip_tests:  # fixed tile configs: the tests check the kernels' code, quickly
        rc |= run([sys.executable, "-m", "pytest", "tests/ops", "-q", "-p", "no:cacheprovider"],
                  ADAPTIVE_KERNELS_AUTOTUNE="0")[0]
    before = set(RESULTS.glob("ops-*.json"))
    bench = [sys.executable, "-m", "pytest", "benchmarks/test_ops.py", "--benchmark-only", "-q", "-p",
             "no:cacheprovider", "--benchmark-columns=median"]
    rc |= run(bench + (["-k", args.k] if args.k else []))[0]
    result = newest_result("ops", before)
    if result is None:
        print("no benchmark results were written")
        return rc or 1
    print("\n" + table(result))
    return rc


if __name__ == "__main__":
    sys.exit(main())
