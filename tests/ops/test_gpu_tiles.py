"""Every tile shape the GPU's autotuner may pick, run in Triton's interpreter against the references.

The interpreter otherwise runs each kernel with one small fixed tile per regime, which divides the
test shapes' splits and hides a mask that is wrong only where a larger tile overhangs an edge. Here
each autotune config's block sizes take that tile's place, at shapes that every tile overhangs.
"""

from __future__ import annotations

import pytest
import torch

from adaptive_kernels.ops import attention, projections
from adaptive_kernels.ops.projections import cols_major
from adaptive_kernels.ops.swiglu import gathered_swiglu, gathered_swiglu_reference

from ._util import DEVICE, check, generator, index_lists, randn

pytestmark = [pytest.mark.triton,
              pytest.mark.skipif(DEVICE != "cpu", reason="sets the interpreter's tiles; a GPU runs the autotuner")]

TOKENS = {"gemv": 1, "few": 5, "many": 37}  # a count each regime takes
D, N = 600, 300  # above the largest reduction tile (512) and output tile (256), divisible by neither


def _configs(table: dict) -> list:
    return [pytest.param(regime, kwargs, id=f"{regime}-" + "-".join(map(str, kwargs.values())))
            for regime, configs in table.items() for kwargs, _, _ in configs]


@pytest.mark.parametrize("regime,tile", _configs(projections.ROWS_CONFIGS))
def test_row_gathers_with_every_tile(regime, tile, monkeypatch):
    monkeypatch.setitem(projections._INTERPRET_ROWS, regime, tile)
    gen = generator("rows", regime, tile)
    T = TOKENS[regime]
    rows = index_lists([270, 41], N, gen, "runs")
    x, w, b = randn(2, T, D, gen=gen), randn(N, D, gen=gen, scale=D ** -0.5), randn(N, gen=gen)
    check(projections.gather_rows_linear(x, w, rows, b), projections.gather_rows_linear_reference(x, w, rows, b),
          torch.float32)
    w_up = randn(N, D, gen=gen, scale=D ** -0.5)
    check(gathered_swiglu(x, w, w_up, rows), gathered_swiglu_reference(x, w, w_up, rows), torch.float32)


@pytest.mark.parametrize("layout", ["row-major", "cols-major"])
@pytest.mark.parametrize("regime,tile", _configs(projections.COLS_CONFIGS))
def test_column_gathers_with_every_tile(regime, tile, layout, monkeypatch):
    monkeypatch.setitem(projections._INTERPRET_COLS, regime, tile)
    gen = generator("cols", regime, tile, layout)
    T, n = TOKENS[regime], 560
    cols = index_lists([n, 77], D + 100, gen, "runs")
    a = randn(2, T, n, gen=gen)
    w = randn(N, D + 100, gen=gen, scale=n ** -0.5)
    w = cols_major(w) if layout == "cols-major" else w
    check(projections.gather_cols_linear(a, w, cols), projections.gather_cols_linear_reference(a, w, cols),
          torch.float32)


@pytest.mark.parametrize("regime,tile", _configs(attention.ATTN_CONFIGS))
def test_attention_with_every_tile(regime, tile, monkeypatch):
    """Decode-sized queries against 600 keys split in two (320 keys each: a 128-key tile overhangs the
    split), and prefill-sized ones (T = Tk, causal), with GQA, a padded head and left padding."""
    monkeypatch.setitem(attention._INTERPRET_ATTN, regime, tile)
    gen = generator("attention", regime, tile)
    T, Tk, splits = (3, 600, 2) if regime == "few" else (150, 150, 1)
    d = 24
    q = randn(2, T, 3, d, gen=gen)
    k, v = randn(2, 2, Tk, d, gen=gen), randn(2, 2, Tk, d, gen=gen)
    q_to_kv = torch.tensor([[0, 1, 1], [1, 0, -1]], device=DEVICE)
    valid = torch.ones(2, Tk, dtype=torch.bool, device=DEVICE)
    valid[1, :7] = False
    want = attention.head_sparse_attention_reference(q, k, v, q_to_kv, valid, d ** -0.5)
    check(attention._attention_launch(q, k, v, q_to_kv, valid, d ** -0.5, splits), want, torch.float32)
