"""Shared small-world fixtures: the offline tokenizer, a processor with a small pixel budget, random images."""

import numpy as np
import pytest
from PIL import Image

from moca_fast.data.processor import Processor
from moca_fast.data.tokenizer import tiny_tokenizer
from moca_fast.embed import MocaEmbedder

from .eval.tiny import SMALL_PIXELS, write_tiny_checkpoint, write_tiny_multi_vector_checkpoint
from .model.varlen_oracle import cpu_varlen_attention

SMALL_MIN_PIXELS = 4 * 28 * 28  # 4..64 LLM tokens per image keeps CPU tests fast
SMALL_MAX_PIXELS = 64 * 28 * 28


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def processor(tokenizer):
    return Processor(tokenizer, min_pixels=SMALL_MIN_PIXELS, max_pixels=SMALL_MAX_PIXELS)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory, tokenizer):
    """A tiny random Qwen2.5-VL checkpoint on disk, shared: a test that damages one works on a copy."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-moca"), tokenizer)


@pytest.fixture(scope="session")
def embedder(checkpoint):
    return MocaEmbedder.from_pretrained(checkpoint, **SMALL_PIXELS)


@pytest.fixture(scope="session")
def multi_vector_checkpoint(tmp_path_factory, tokenizer):
    """The tiny checkpoint with a multi-vector head (16 dims) and Matryoshka dims (32, 16) declared."""
    return write_tiny_multi_vector_checkpoint(tmp_path_factory.mktemp("tiny-moca-heads"), tokenizer)


@pytest.fixture(scope="session")
def multi_vector_embedder(multi_vector_checkpoint):
    return MocaEmbedder.from_pretrained(multi_vector_checkpoint, **SMALL_PIXELS)


@pytest.fixture
def make_image():
    rng = np.random.default_rng(1234)

    def make(height: int, width: int) -> Image.Image:
        return Image.fromarray((rng.random((height, width, 3)) * 255).astype("uint8"))

    return make


@pytest.fixture(params=["sdpa", "varlen"])
def attention_backend(request):
    """Each CPU-testable attention backend: SDPA, and torch's varlen_attn run through the CPU oracle."""
    if request.param == "varlen":
        with cpu_varlen_attention():
            yield request.param
    else:
        yield request.param
