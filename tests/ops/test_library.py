"""When the public ops skip their custom op's dispatch (plain eager inference) and when they must not."""

from __future__ import annotations

import math

import torch
from torch.utils.flop_counter import FlopCounterMode

from adaptive_kernels.ops._library import bucket, call_directly, cdiv


def test_direct_calls_only_where_nothing_watches_the_custom_op():
    x, w = torch.randn(2, 3), torch.nn.Parameter(torch.randn(4, 3))
    assert call_directly(x, None)
    assert not call_directly(x, w)  # autograd: through the op, whose backward is the reference's
    with torch.no_grad():
        assert call_directly(x, w)
        with FlopCounterMode(display=False):  # a dispatch mode counts only what reaches the dispatcher
            assert not call_directly(x)
    with torch.inference_mode():
        assert call_directly(x, w)
    assert not torch.compile(lambda t: torch.tensor(call_directly(t)), backend="eager", fullgraph=False)(x)


def test_bucket_is_the_smallest_power_of_two_at_or_above_n_and_at_least_1():
    """bucket(n) == min{2**k : 2**k >= max(n, 1)} for n in 0..4096."""
    for n in range(4097):
        want = 1
        while want < n:
            want *= 2
        assert bucket(n) == want, n


def test_cdiv_is_the_ceiling_of_the_quotient():
    """cdiv(a, b) == ceil(a / b) for a in 0..200, b in 1..32 (an exact quotient gives no extra 1)."""
    for a in range(201):
        for b in range(1, 33):
            assert cdiv(a, b) == math.ceil(a / b) == -(-a // b), (a, b)
