"""Test-wide settings: Triton runs in its CPU interpreter when there is no CUDA device; seeded RNG per test."""

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


# Shared small-world fixtures: the offline tokenizer, a processor with a small pixel budget, random images.
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from moca_fast.data.processor import Processor  # noqa: E402
from moca_fast.data.tokenizer import tiny_tokenizer  # noqa: E402

SMALL_MIN_PIXELS = 4 * 28 * 28  # 4..64 LLM tokens per image keeps CPU tests fast
SMALL_MAX_PIXELS = 64 * 28 * 28


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def processor(tokenizer):
    return Processor(tokenizer, min_pixels=SMALL_MIN_PIXELS, max_pixels=SMALL_MAX_PIXELS)


@pytest.fixture
def make_image():
    rng = np.random.default_rng(1234)

    def make(height: int, width: int) -> Image.Image:
        return Image.fromarray((rng.random((height, width, 3)) * 255).astype("uint8"))

    return make
