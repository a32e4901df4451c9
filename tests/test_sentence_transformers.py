"""sentence-transformers (the real package) loads a moca_fast checkpoint and gets our embeddings."""

import numpy as np
import pytest
import torch
from PIL import Image

from moca_fast import prompts
from moca_fast.config import ModelSpec
from moca_fast.data.processor import Processor
from moca_fast.embed import MocaEmbedder
from moca_fast.integrations import write_sentence_transformers_config
from moca_fast.model.loading import save_pretrained
from moca_fast.model.moca import MocaModel
from moca_fast.model.tiny import tiny_hf_config

from .conftest import SMALL_MAX_PIXELS, SMALL_MIN_PIXELS

pytest.importorskip("sentence_transformers")


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer):
    """A checkpoint as moca_fast's trainers write it: weights, tokenizer, processor settings, ST config."""
    path = tmp_path_factory.mktemp("st")
    torch.manual_seed(4)
    save_pretrained(MocaModel(ModelSpec.from_hf_config(tiny_hf_config(tokenizer))).init_weights(), path)
    write_sentence_transformers_config(path)
    Processor(tokenizer, min_pixels=SMALL_MIN_PIXELS, max_pixels=SMALL_MAX_PIXELS).save_pretrained(path)
    return path


def test_sentence_transformer_gives_our_embeddings(saved, tmp_path):
    from sentence_transformers import SentenceTransformer

    rng = np.random.default_rng(0)
    image = Image.fromarray((rng.random((70, 100, 3)) * 255).astype("uint8"))
    path = tmp_path / "page.png"
    image.save(path)
    inputs = ["a text", image, {"text": "What is shown?", "image": image}, str(path) + " is only a string"]
    ours = MocaEmbedder.from_pretrained(saved)
    with pytest.raises(ValueError, match="trust_remote_code=True"):  # sentence-transformers' rule for any custom module
        SentenceTransformer(str(saved))
    model = SentenceTransformer(str(saved), trust_remote_code=True, device="cpu")
    assert model.get_embedding_dimension() == ours.dim
    np.testing.assert_allclose(model.encode(inputs), ours.encode(inputs), atol=1e-6, rtol=0)
    np.testing.assert_allclose(model.encode_query(inputs), ours.encode_query(inputs), atol=1e-6, rtol=0)
    np.testing.assert_allclose(model.encode_document(inputs), ours.encode_document(inputs), atol=1e-6, rtol=0)
    named = model.encode([image], prompt_name="document_page")
    np.testing.assert_allclose(named, ours.encode([prompts.document_page(image)]), atol=1e-6, rtol=0)
    model.save(str(tmp_path / "again"))  # and what it saves loads the same
    again = SentenceTransformer(str(tmp_path / "again"), trust_remote_code=True, device="cpu")
    np.testing.assert_allclose(again.encode(inputs), ours.encode(inputs), atol=1e-6, rtol=0)
