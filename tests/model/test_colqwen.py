"""ColQwen2.5 drop-in: a tiny random colpali-engine ColQwen2.5 with a random LoRA adapter, saved as colpali-engine and
peft save it, loads through MocaEmbedder and gives colpali-engine's own multi-vectors (LoRA merged, causal decoder,
the processor's query augmentation and visual prompt, its pixel budget) and MaxSim scores.

colpali-engine is a test dependency: without it these tests fail (they do not skip)."""

import numpy as np
import pytest
import torch

from bench.colpali_path import colpali, unpadded_vectors, write_tiny_colqwen
from moca_fast.embed import MocaEmbedder
from moca_fast.eval.late_interaction import maxsim_scores
from moca_fast.model import colqwen

PIXELS = dict(min_pixels=4 * 28 * 28, max_pixels=24 * 28 * 28)
QUERIES = ["a red circle on the left", "how many shapes are there?", "two blue squares at the top right of the page"]


@pytest.fixture(scope="module")
def colqwen_checkpoint(tmp_path_factory, tokenizer):
    colpali()  # fails, not skips, without colpali-engine
    return write_tiny_colqwen(tmp_path_factory.mktemp("colqwen"), tokenizer, **PIXELS)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(5)
    from PIL import Image

    sizes = [(100, 150), (60, 84), (140, 90)]
    return [Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")) for h, w in sizes]


@pytest.fixture(scope="module")
def theirs(colqwen_checkpoint, images):
    """colpali-engine's multi-vectors of the queries and the images, unpadded."""
    model, processor, _ = colqwen_checkpoint
    out = {}
    with torch.no_grad():
        for name, batch in (
            ("queries", processor.process_queries(QUERIES)),
            ("images", processor.process_images(images)),
        ):
            out[name] = unpadded_vectors(model(**batch), batch["attention_mask"])
    return out


def test_multi_vectors_equal_colpali_engines(colqwen_checkpoint, theirs, images, attention_backend):
    _, processor, adapter = colqwen_checkpoint
    embedder = MocaEmbedder.from_pretrained(adapter, attention_backend=attention_backend)
    assert embedder.model.causal and embedder.multi_vector_dim == 128
    assert (embedder.processor.min_pixels, embedder.processor.max_pixels) == (
        PIXELS["min_pixels"],
        PIXELS["max_pixels"],
    )
    queries = embedder.encode_query(QUERIES, output="multi_vector", convert_to_tensor=True)
    pages = embedder.encode_document(images, output="multi_vector", convert_to_tensor=True)
    for kind, mine in (("queries", queries), ("images", pages)):
        for i, (ours, wanted) in enumerate(zip(mine, theirs[kind])):
            assert ours.shape == wanted.shape, f"{kind}[{i}]: {tuple(ours.shape)} tokens vs {tuple(wanted.shape)}"
            error = (ours - wanted).abs().max().item()
            assert error <= 1e-5, f"{kind}[{i}]: max abs difference {error:.2e}"
    scores = maxsim_scores(queries, pages)
    expected = processor.score_multi_vector(theirs["queries"], theirs["images"], device="cpu")
    np.testing.assert_allclose(scores, expected.numpy(), rtol=1e-5, atol=1e-4)
    assert scores.std() > 0.01  # the scores tell the pairs apart, so a wrong vector would show


def test_the_adapter_and_causal_attention_matter(colqwen_checkpoint, theirs):
    """Without its merged LoRA, or run bidirectionally, the model's vectors are far from colpali-engine's: the parity
    above checks both."""
    _, _, adapter = colqwen_checkpoint
    embedder = MocaEmbedder.from_pretrained(adapter)
    embedder.model.causal = False
    bidirectional = embedder.encode_query(QUERIES[:1], output="multi_vector", convert_to_tensor=True)[0]
    base = MocaEmbedder.from_pretrained(adapter.parent / "base", processor_path=adapter)  # config names ColQwen2_5
    assert base.model.causal
    unadapted = base.encode(QUERIES[0] + colqwen.QUERY_AUGMENTATION, output="multi_vector", convert_to_tensor=True)
    wanted = theirs["queries"][0]
    assert (bidirectional - wanted).abs().max() > 1e-2 and (unadapted - wanted).abs().max() > 1e-2


def test_the_server_serves_colpali_engines_multi_vectors(colqwen_checkpoint, theirs, images):
    """/v1/embeddings (in process) with input_type query / document: the processor's prompts, colpali's vectors."""
    import base64
    import io

    from fastapi.testclient import TestClient

    from moca_fast.serve.app import EmbeddingService, create_app
    from moca_fast.serve.settings import ServeSettings

    def data_url(image) -> str:
        png = io.BytesIO()
        image.save(png, format="PNG")
        return "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()

    embedder = MocaEmbedder.from_pretrained(colqwen_checkpoint[2])
    service = EmbeddingService(embedder, ServeSettings(model_name="colqwen", max_input_tokens=4096))
    with TestClient(create_app(service)) as client:
        for kind, role, wire in (
            ("queries", "query", QUERIES),
            ("images", "document", [{"image": data_url(im)} for im in images]),
        ):
            response = client.post(
                "/v1/embeddings", json={"model": "colqwen", "input": wire, "input_type": role, "output": "multi_vector"}
            )
            assert response.status_code == 200, response.text
            for got, wanted in zip(response.json()["data"], theirs[kind]):
                assert got["shape"] == list(wanted.shape), f"{kind}: {got['shape']} vs {list(wanted.shape)}"
                np.testing.assert_allclose(np.array(got["embedding"]), wanted.numpy(), atol=1e-5, rtol=0)


def test_prompts_are_the_processors(colqwen_checkpoint, images):
    _, processor, adapter = colqwen_checkpoint
    embedder = MocaEmbedder.from_pretrained(adapter)
    from moca_fast.embed import as_input, with_instructions

    query, page = with_instructions(
        [as_input(QUERIES[0], "q"), as_input(images[0], "p")], role="query", role_prompt=embedder.role_prompt
    )
    assert query.text == processor.query_prefix + QUERIES[0] + processor.query_augmentation_token * 10
    assert page.text == processor.visual_prompt_prefix


def test_an_untied_colqwen_without_lm_head_loads(tmp_path, tokenizer):
    """ColQwen2_5 is a Qwen2_5_VLModel: an untied checkpoint has no LM head, which embedding does not need."""
    model, processor, adapter = write_tiny_colqwen(tmp_path, tokenizer, tie_word_embeddings=False, seed=3, **PIXELS)
    batch = processor.process_queries(QUERIES[:2])
    with torch.no_grad():
        wanted = unpadded_vectors(model(**batch), batch["attention_mask"])
    mine = MocaEmbedder.from_pretrained(adapter).encode_query(
        QUERIES[:2], output="multi_vector", convert_to_tensor=True
    )
    for ours, theirs in zip(mine, wanted):
        assert ours.shape == theirs.shape and (ours - theirs).abs().max() <= 1e-5


def test_unsupported_adapters_are_refused(colqwen_checkpoint, tmp_path, checkpoint):
    import json
    import shutil

    _, _, adapter = colqwen_checkpoint
    copy = shutil.copytree(adapter, tmp_path / "dora")
    config = json.loads((copy / "adapter_config.json").read_text())
    (copy / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match="use_dora set: only plain LoRA"):
        MocaEmbedder.from_pretrained(copy)
    # an adapter whose base has no multi-vector head (a plain Qwen2.5-VL) is not a ColQwen2.5
    (copy / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(checkpoint)}))
    with pytest.raises(ValueError, match="no custom_text_proj.weight in its weights: not a ColQwen2.5"):
        MocaEmbedder.from_pretrained(copy)


@pytest.mark.parametrize(
    "saved",
    [
        {"size": {"shortest_edge": 3136, "longest_edge": 802816}},  # transformers >= 4.50
        {"size": {"min_pixels": 3136, "max_pixels": 802816}, "min_pixels": 3136, "max_pixels": 802816},  # older
    ],
    ids=["edges", "pixels"],
)
def test_the_pixel_budget_of_an_older_preprocessor_config(tmp_path, saved):
    import json

    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"image_processor_type": "Qwen2VLImageProcessor", **saved})
    )
    assert colqwen.processor_settings(tmp_path) == {"min_pixels": 3136, "max_pixels": 802816}
