"""The mteb encoder wrapper, driven the way mteb drives an encoder (mteb itself is not needed)."""

import sys
from types import SimpleNamespace

import numpy as np
from PIL import Image

from moca_fast import prompts
from moca_fast.eval.mteb import MtebEncoder


def test_batches_get_the_reference_prompts(embedder, monkeypatch):
    monkeypatch.setitem(sys.modules, "mteb", None)  # `import mteb` would fail: the wrapper must not need it
    a, b = Image.new("RGB", (60, 80), "red"), Image.new("RGB", (90, 50), "blue")
    encoder = MtebEncoder(embedder)
    batches = [{"text": ["a question", ""], "image": [a, b]}, {"text": ["what?"], "image": [a]}]
    documents = encoder.encode(batches, task_metadata=SimpleNamespace(name="Vidore2X", type="DocumentUnderstanding"),
                               hf_split="test", hf_subset="default")
    expected = embedder.encode([prompts.image_question_query(a, "a question"), prompts.document_page(b),
                                prompts.image_question_query(a, "what?")])
    np.testing.assert_allclose(documents, expected, atol=1e-6)
    other = encoder.encode([{"image": [b]}], task_metadata=SimpleNamespace(name="Any", type="Any2AnyRetrieval"),
                           hf_split="test", hf_subset="default")
    np.testing.assert_allclose(other, embedder.encode([prompts.image_target(b)]), atol=1e-6)
    texts = encoder.encode([{"text": ["plain query", "another"]}], task_metadata=SimpleNamespace(type="Retrieval"),
                           hf_split="test", hf_subset="default")
    np.testing.assert_allclose(texts, embedder.encode(["plain query", "another"]), atol=1e-6)


def test_similarities_are_cosines():
    encoder = MtebEncoder(embedder=None)
    x, y = np.array([[3.0, 4.0], [1.0, 0.0]]), np.array([[0.0, 2.0], [1.0, 1.0]])
    np.testing.assert_allclose(encoder.similarity(x, y), [[0.8, 0.7 * 2**0.5], [0.0, 2**-0.5]], atol=1e-6)
    np.testing.assert_allclose(encoder.similarity_pairwise(x, y), [0.8, 2**-0.5], atol=1e-6)
