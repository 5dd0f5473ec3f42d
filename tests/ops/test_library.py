"""When the public ops skip their custom op's dispatch (plain eager inference) and when they must not."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from adaptive_kernels.ops._library import call_directly


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
