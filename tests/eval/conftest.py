"""Fixtures for the evaluation tests: a tiny checkpoint, its embedder, synthetic MMEB and BEIR data on disk."""

import pytest

from moca_fast.data import synthetic
from moca_fast.embed import MocaEmbedder

from .tiny import SMALL_PIXELS, write_tiny_checkpoint


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory, tokenizer):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-moca"), tokenizer)


@pytest.fixture(scope="session")
def embedder(checkpoint):
    return MocaEmbedder.from_pretrained(checkpoint, **SMALL_PIXELS)


@pytest.fixture
def mmeb_data(tmp_path):
    synthetic.write_mmeb(tmp_path / "mmeb", n_queries=3, seed=0)
    return tmp_path / "mmeb"


@pytest.fixture
def beir_data(tmp_path):
    return synthetic.write_beir(tmp_path / "beir" / "SynPages", n_queries=6, seed=0)
