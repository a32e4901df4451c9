"""Fixtures for the evaluation tests: synthetic MMEB and BEIR data on disk (the tiny checkpoint and its embedder
are tests/conftest.py's)."""

import pytest

from moca_fast.data import synthetic


@pytest.fixture
def mmeb_data(tmp_path):
    synthetic.write_mmeb(tmp_path / "mmeb", n_queries=3, seed=0)
    return tmp_path / "mmeb"


@pytest.fixture
def beir_data(tmp_path):
    return synthetic.write_beir(tmp_path / "beir" / "SynPages", n_queries=6, seed=0)
