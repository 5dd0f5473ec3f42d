"""Benchmark fixtures: the rows of a run, written as JSON and CSV under benchmarks/results/.

``AK_BENCH_DRY=1`` on a machine without CUDA runs the op benchmarks at tiny shapes in Triton's
interpreter with host timers: a check of the benchmark code itself, its numbers mean nothing.
"""

from __future__ import annotations

import csv
import datetime
import json
import os
from pathlib import Path

import pytest
import torch

DRY = os.environ.get("AK_BENCH_DRY") == "1" and not torch.cuda.is_available()
if DRY:
    os.environ.setdefault("TRITON_INTERPRET", "1")

RESULTS = Path(__file__).parent / "results"


def run_info() -> dict:
    """Device name, library versions and the date, stored with every row."""
    import transformers
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return dict(device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (dry run)",
                torch=torch.__version__, triton=triton_version, transformers=transformers.__version__,
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))


class Rows(list):
    """Rows of one run, rewritten to results/ops-<device>-<time>.{json,csv} after each append, so an
    interrupted run keeps what it measured."""

    def __init__(self):
        super().__init__()
        self.info = run_info()
        slug = "dry" if DRY else self.info["device"].replace("NVIDIA ", "").replace(" ", "-")
        self.stem = RESULTS / f"ops-{slug}-{self.info['date'].replace(':', '').replace('-', '')}"

    def append(self, row: dict) -> None:
        super().append(row)
        self.write()

    def write(self) -> None:
        RESULTS.mkdir(exist_ok=True)
        self.stem.with_suffix(".json").write_text(json.dumps(dict(info=self.info, rows=list(self)), indent=1))
        fields = list(self.info) + list(dict.fromkeys(k for r in self for k in r))
        with self.stem.with_suffix(".csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            for r in self:
                writer.writerow({**self.info, **r})


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
    rows = Rows()
    yield rows
    if rows:
        rows.info["autotune"] = autotune_choices()
        rows.write()
        print(f"\nop benchmark rows written to {rows.stem}.json and .csv")
