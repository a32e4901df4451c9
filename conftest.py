"""Settings for tests/ and bench/: Triton runs in its CPU interpreter when there is no CUDA device, tests marked
`cuda` skip without one, and every test starts from a seeded RNG."""

import os
import subprocess
import sys
from pathlib import Path

import torch

# Must happen before anything imports triton: without a GPU the kernels run in the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

# Not on the lent GPU machine (its image has torch, triton and transformers): `datasets` and what it needs. Only
# reading data files may need them.
NOT_ON_THE_GPU_MACHINE = ("datasets", "dill", "multiprocess", "pandas", "xxhash")


@pytest.fixture
def run_without_datasets():
    """Run Python code in a fresh interpreter (in the repository root, so bench/ imports as `bench`) in which the
    packages of NOT_ON_THE_GPU_MACHINE cannot be imported, as if not installed; returns the finished process."""
    prelude = f"import sys\nfor _name in {NOT_ON_THE_GPU_MACHINE!r}:\n    sys.modules[_name] = None\n"

    def run(code: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-X", "faulthandler", "-c", prelude + code],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return run


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
