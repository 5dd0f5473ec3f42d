"""Every Triton op, and on a GPU the CUDA extension's GEMV ops, is differentiable: its gradient is its PyTorch
reference's, for every input that needs one."""

from __future__ import annotations

import pytest
import torch

from adaptive_kernels import cuda_ext
from adaptive_kernels.ops.attention import head_sparse_attention, head_sparse_attention_reference
from adaptive_kernels.ops.norm import rms_norm, rms_norm_reference
from adaptive_kernels.ops.projections import (gather_cols_linear, gather_cols_linear_reference, gather_rows_linear,
                                              gather_rows_linear_reference)
from adaptive_kernels.ops.rotary import rotary, rotary_reference
from adaptive_kernels.ops.swiglu import gathered_swiglu, gathered_swiglu_reference

from ._util import DEVICE, generator, index_lists, randn

pytestmark = pytest.mark.triton


def _cases(gen):
    """name -> (op, reference, float inputs (all get gradients), other arguments, argument order)."""
    x, w = randn(2, 3, 13, gen=gen), randn(11, 13, gen=gen)
    rows = index_lists([7, 4], 11, gen, kind="scattered")
    q, k, v = randn(2, 3, 4, 8, gen=gen), randn(2, 2, 5, 8, gen=gen), randn(2, 2, 5, 8, gen=gen)
    q_to_kv = torch.tensor([[0, 0, 1, 1], [1, 0, -1, -1]], device=DEVICE)
    kv_valid = torch.tensor([[True] * 5, [False, True, True, True, True]], device=DEVICE)
    angles = randn(2, 3, 4, gen=gen)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    return {
        "rows": (gather_rows_linear, gather_rows_linear_reference, dict(x=x, weight=w, bias=randn(11, gen=gen)),
                 dict(rows=rows), ["x", "weight", "rows", "bias"]),
        "cols": (gather_cols_linear, gather_cols_linear_reference, dict(a=randn(2, 3, 7, gen=gen), weight=w.t()),
                 dict(cols=index_lists([7, 5], 11, gen, kind="scattered")), ["a", "weight", "cols"]),
        "swiglu": (gathered_swiglu, gathered_swiglu_reference, dict(x=x, w_gate=w, w_up=randn(11, 13, gen=gen)),
                   dict(rows=rows), ["x", "w_gate", "w_up", "rows"]),
        "attention": (head_sparse_attention, head_sparse_attention_reference, dict(q=q, k=k, v=v),
                      dict(q_to_kv=q_to_kv, kv_valid=kv_valid, scale=0.3),
                      ["q", "k", "v", "q_to_kv", "kv_valid", "scale"]),
        "rms_norm": (rms_norm, rms_norm_reference, dict(x=x, weight=randn(13, gen=gen)), dict(eps=1e-5),
                     ["x", "weight", "eps", "residual"]),
        "add_rms_norm": (rms_norm, rms_norm_reference,
                         dict(x=x, weight=randn(13, gen=gen), residual=randn(2, 3, 13, gen=gen)), dict(eps=1e-5),
                         ["x", "weight", "eps", "residual"]),
        "rotary": (rotary, rotary_reference, dict(x=q), dict(cos=cos, sin=sin), ["x", "cos", "sin"]),
        "cuda_rows": (cuda_ext.gather_rows_linear, gather_rows_linear_reference,
                      dict(x=x, weight=w, bias=randn(11, gen=gen)), dict(rows=rows), ["x", "weight", "rows", "bias"]),
        "cuda_cols": (cuda_ext.gather_cols_linear, gather_cols_linear_reference,
                      dict(a=randn(2, 3, 7, gen=gen), weight=w.t()),
                      dict(cols=index_lists([7, 5], 11, gen, kind="scattered")), ["a", "weight", "cols"]),
    }


CUDA_ONLY = pytest.mark.skipif(DEVICE != "cuda", reason="the CUDA extension's ops take CUDA tensors only")


@pytest.mark.parametrize("name", ["rows", "cols", "swiglu", "attention", "rms_norm", "add_rms_norm", "rotary"] + [
    pytest.param(name, marks=[pytest.mark.gpu, CUDA_ONLY]) for name in ("cuda_rows", "cuda_cols")])
def test_gradient_is_the_references(name):
    """With every float input needing a gradient, and with each alone (a bias or one weight trained, the rest
    frozen): an op that asked only some inputs whether they need one launched without autograd, and the one
    trained got no gradient."""
    gen = generator("grad", name)
    op, reference, floats, others, order = _cases(gen)[name]

    def run(fn, needing: set):
        leaves = {n: t.detach().clone().requires_grad_(n in needing) for n, t in floats.items()}
        out = fn(*[leaves.get(n, others.get(n)) for n in order])
        outs = out if isinstance(out, tuple) else (out,)
        weights = [randn(*o.shape, gen=generator("weights", name, i)) for i, o in enumerate(outs)]
        sum((o * w).sum() for o, w in zip(outs, weights)).backward()
        return outs, {n: leaves[n].grad for n in needing}

    for needing in [set(floats)] + [{n} for n in floats]:
        (got_out, got_grads), (want_out, want_grads) = run(op, needing), run(reference, needing)
        for a, b in zip(got_out, want_out):
            torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-4)
        for n in needing:
            assert got_grads[n] is not None and torch.count_nonzero(want_grads[n]) > 0, (n, needing)
            torch.testing.assert_close(got_grads[n], want_grads[n], rtol=2e-4, atol=2e-4, msg=f"{n} of {needing}")
