"""Test-suite set-up: Triton's interpreter on machines without a GPU, deterministic CPU runs."""

import os

import pytest

try:  # decide before anything imports triton
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("PYTHONHASHSEED", "0")
os.environ.setdefault("MLSYS24_BATCH", "1")  # no progress bars in test output


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(1)  # small tensors; and xdist runs one worker per core
    yield


@pytest.fixture(autouse=True)
def _grad_mode_is_restored():
    """Every test leaves autograd as it found it (a generator abandoned inside ``torch.no_grad()``
    would silently disable gradients for the tests that follow on the same worker)."""
    before = torch.is_grad_enabled()
    yield
    assert torch.is_grad_enabled() == before, "the test left torch's grad mode changed"
    torch.set_grad_enabled(before)
