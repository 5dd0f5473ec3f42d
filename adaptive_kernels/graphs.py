"""CUDA graphs: one decode step of a request's plan, captured once per cache capacity and replayed per
token; and whether a request must read nothing back to the host (inside a caller's capture, or
``graph_safe()``).

At batch 1 an eager decode step is bound by kernel launches, not by the weights it reads; a
replayed graph launches them all at once. The plan, and so every weight the step touches, is fixed
for the request; the shapes are fixed until the cache grows to its next capacity, and the KV cache
writes in place at a device-side position.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch

_GRAPH_SAFE = contextvars.ContextVar("adaptive_kernels_graph_safe", default=False)


@contextlib.contextmanager
def graph_safe():
    """Within the block, patched models run requests as they do inside CUDA-graph capture: the plan's index
    buffers are made on the device at fixed widths (``plan.fixed_width_schedule``; the scheduler's top-n
    runs there anyway) and nothing is read back to the host. Warm a request up in this block before
    capturing it, so that the kernels of those widths are compiled (and tuned) outside the capture."""
    token = _GRAPH_SAFE.set(True)
    try:
        yield
    finally:
        _GRAPH_SAFE.reset(token)


def capturable(x: torch.Tensor) -> bool:
    """Whether work on ``x`` can be captured as a CUDA graph: ``x`` is on a CUDA device."""
    return x.is_cuda


def capturing(on: torch.Tensor | torch.device) -> bool:
    """Whether ``on`` (a tensor, or a device) is on CUDA and the current stream is recording a graph."""
    device = on.device if isinstance(on, torch.Tensor) else torch.device(on)
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def runs_graph_safe(x: torch.Tensor) -> bool:
    """Whether a request on ``x`` must read nothing back to the host: inside ``graph_safe()`` or a capture."""
    return _GRAPH_SAFE.get() or capturing(x)


class DecodeGraph:
    """A captured ``step(*inputs) -> output`` whose cache writes go to ``cache.write_position``."""

    def __init__(self, step, inputs: tuple, cache):
        with torch.inference_mode(False):  # written at each replay, which may run outside inference mode
            self.inputs = tuple(t.clone() for t in inputs)
            self.position = torch.tensor([cache.length], device=inputs[0].device)
        self.graph = torch.cuda.CUDAGraph()
        cache.write_position = self.position
        try:
            # thread_local: another thread's work (a request's prefill, say) may not end this capture
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                self.output = step(*self.inputs)
        finally:
            cache.write_position = None

    def replay(self, inputs: tuple, position: int) -> torch.Tensor:
        """Run the step on new inputs (same shapes) writing the cache at ``position``."""
        for static, new in zip(self.inputs, inputs):
            static.copy_(new)
        self.position.fill_(position)
        self.graph.replay()
        return self.output.clone()
