"""Settings for tests/ and bench/: Triton runs in its CPU interpreter when there is no CUDA device, tests marked
`cuda` skip without one, and every test starts from a seeded RNG."""

import os

import torch

# Must happen before anything imports triton: without a GPU the kernels run in the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip_cuda)
