"""Every Triton kernel of the package compiles for an H100 (sm_90), in bf16 and fp16, without a GPU.

The interpreter (how the other CPU tests run the kernels) does not compile them, so a kernel that
is right in the interpreter can still fail Triton's GPU compiler. ``tests/compile_kernels.py``
compiles every specialisation that patched models launch (prefill and decode, dense and partial
plans, 7B and toy widths) down to a cubin with ptxas, and runs nothing. It runs in its own process:
the kernels must be decorated with the interpreter off.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "compile_kernels.py"

pytestmark = pytest.mark.triton


def _kernels_in_source() -> set[str]:
    """Names of the ``@jit`` kernels in adaptive_kernels/ops/ (``*_kernel``; other ``@jit`` functions are
    device helpers that kernels call)."""
    return {name for path in (ROOT / "adaptive_kernels" / "ops").glob("*.py")
            for name in re.findall(r"^@jit\s*\ndef (\w+_kernel)\(", path.read_text(), flags=re.MULTILINE)}


def test_every_kernel_compiles_for_sm90():
    done = subprocess.run([sys.executable, str(SCRIPT), "--arch", "90", "--dtypes", "bfloat16", "float16"],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    report = done.stdout[-6000:] + done.stderr[-4000:]
    assert done.returncode == 0, report
    summary = re.search(r"^compiled (\d+), failed 0, kernels \d+: (.*)$", done.stdout, flags=re.MULTILINE)
    assert summary, report
    compiled = set(summary.group(2).split())
    expected = _kernels_in_source()
    assert expected, "no @jit kernels found in adaptive_kernels/ops"
    assert compiled == expected, f"launched by the models: {sorted(compiled)}; defined: {sorted(expected)}"
