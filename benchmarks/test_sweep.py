"""End-to-end latency versus budget (``adaptive_kernels.sweep``), as a pytest-benchmark entry.

On a CUDA machine it sweeps a LLaVA-1.5-7B-shaped model in bf16; elsewhere the tiny built-in
one. Rows, and the plot, land in benchmarks/results/; the rows, budget adherence and target
ratios are printed as ``adaptive-kernels sweep`` prints them.
"""

import torch

from adaptive_kernels.sweep import BUDGETS, report, sweep
from measure import RESULTS


def test_latency_versus_budget(benchmark, capsys):
    on_gpu = torch.cuda.is_available()
    kwargs = dict(budgets=BUDGETS, new_tokens=48 if on_gpu else 4, repeats=3 if on_gpu else 2, out_dir=RESULTS,
                  progress=False)
    rows = benchmark.pedantic(sweep, kwargs=kwargs, rounds=1, iterations=1)
    benchmark.extra_info["rows"] = [r.__dict__ for r in rows]
    with capsys.disabled():
        print("\n" + report(rows))
