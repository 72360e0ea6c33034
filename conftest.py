"""Root pytest setup, shared by tests/ and bench/.

Without a GPU the Triton kernels run in the interpreter on CPU tensors; TRITON_INTERPRET must be
set before Triton is imported, so it is set here, before any test module loads.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end runs; the CI runs them with `-m slow`")
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (bf16 parity at real shapes)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    import pytest

    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
