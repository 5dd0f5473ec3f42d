"""Benchmark fixtures: the rows of a run, written as JSON and CSV under benchmarks/results/.

``AK_BENCH_DRY=1`` on a machine without CUDA runs the op benchmarks at tiny shapes in Triton's
interpreter with host timers: a check of the benchmark code itself, its numbers mean nothing.
"""

from __future__ import annotations

import os

import pytest

from measure import DRY, ResultRows

if DRY:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def autotune_choices() -> dict:
    """The tile configs the autotuner chose in this run, per kernel, regime and key."""
    from adaptive_kernels.ops import attention, projections
    chosen = {}
    for name, kernels in (("rows", projections._ROWS), ("cols", projections._COLS), ("attention", attention._ATTN)):
        for regime, kernel in kernels.items():
            for key, config in getattr(kernel, "cache", {}).items():
                chosen[f"{name}/{regime}/{key}"] = str(config)
    return chosen


@pytest.fixture(scope="session")
def op_rows():
    """The op benchmarks' rows, written under benchmarks/results/ as they come."""
    rows = ResultRows("ops")
    yield rows
    if rows:
        rows.info["autotune"] = autotune_choices()
        rows.write()
        print(f"\nop benchmark rows written to {rows.stem}.json and .csv")
