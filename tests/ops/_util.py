"""Shared helpers of the op tests: devices, dtypes, tolerances and index lists."""

from __future__ import annotations

import zlib

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# bf16 arithmetic is wrong inside Triton's interpreter: test it on CUDA only
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
DTYPE_PARAMS = [pytest.param(dt, id=str(dt).removeprefix("torch.")) for dt in DTYPES]
TOL = {torch.float32: dict(atol=2e-4, rtol=2e-4), torch.float16: dict(atol=1e-2, rtol=1e-2),
       torch.bfloat16: dict(atol=4e-2, rtol=4e-2)}


def generator(*key) -> torch.Generator:
    """A CPU generator seeded from the test's parameters (stable across runs and processes)."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def randn(*shape, gen, dtype=torch.float32, scale=1.0):
    """Fresh normal values (never zeros), made on the CPU from ``gen`` and moved to DEVICE."""
    return (torch.randn(*shape, generator=gen) * scale).to(device=DEVICE, dtype=dtype)


def index_lists(counts, N, gen, kind="runs", unit=5, width=None):
    """int64 [len(counts), width] on DEVICE: row r holds counts[r] distinct indices into range(N), -1 after.

    kind "runs": whole units of ``unit`` consecutive indices in random order of units (the last
    unit may be cut); "sorted": such units in ascending order (as plans list them); "shifted": 3, 4, ...,
    N-1, 0, 1, 2; "scattered": a random sample in random order; "holes": ascending, with -1 entries in
    between; "all": range(N) in order.
    """
    width = max(counts) if width is None else width
    out = torch.full((len(counts), width), -1, dtype=torch.int64)
    for r, c in enumerate(counts):
        if kind == "holes":
            idx = torch.randperm(N, generator=gen)[:c].sort().values
            out[r, torch.randperm(width, generator=gen)[:c].sort().values] = idx
            continue
        if kind == "all":
            idx = torch.arange(N)[:c]
        elif kind == "shifted":  # one long run starting off any alignment, wrapping around
            idx = torch.arange(N).roll(-3)[:c]
        elif kind in ("runs", "sorted"):
            units = torch.randperm(-(-N // unit), generator=gen)
            if kind == "sorted":  # enough units for c indices (the last unit may be short), ascending
                sizes = torch.clamp(N - units * unit, max=unit)
                units = units[:int((sizes.cumsum(0) < c).sum()) + 1].sort().values
            idx = torch.cat([torch.arange(u * unit, min(N, u * unit + unit)) for u in units.tolist()])[:c]
        else:
            idx = torch.randperm(N, generator=gen)[:c]
        out[r, :c] = idx
    return out.to(DEVICE)


def check(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """Every element, with the tolerance of ``dtype`` (expected computed in fp32)."""
    assert actual.dtype == dtype
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual.float(), expected.float(), **TOL[dtype])
