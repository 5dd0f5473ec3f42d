"""Test set-up: without a GPU, Triton kernels run in Triton's interpreter on the CPU; tests marked ``triton``
skip where the triton package is missing (pip installs it on Linux only).

TRITON_INTERPRET must be set before any kernel is decorated, so before the package is imported.
"""

import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(items):
    if importlib.util.find_spec("triton") is not None:
        return
    missing = pytest.mark.skip(reason="needs the triton package, which is not installed (pip installs it on Linux "
                                      "only)")
    for item in items:
        if item.get_closest_marker("triton") is not None:
            item.add_marker(missing)
