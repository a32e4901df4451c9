"""MocaEmbedder: drop-in parity with the reference computation in transformers, batch invariance, inputs, errors."""

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bench.reference_path import ReferencePath, processor_batch
from moca_fast import prompts
from moca_fast.embed import MocaEmbedder, local_checkpoint, plan_batches
from moca_fast.inputs import EmbedInput, as_input
from moca_fast.integrations.transformers import make_bidirectional

from .conftest import SMALL_MAX_PIXELS, SMALL_MIN_PIXELS

V = "<|vision_start|><|image_pad|><|vision_end|>"


@pytest.fixture(scope="module")
def embedder(checkpoint):
    return MocaEmbedder.from_pretrained(checkpoint, min_pixels=SMALL_MIN_PIXELS, max_pixels=SMALL_MAX_PIXELS)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(5)
    from PIL import Image

    return [
        Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8"))
        for h, w in [(100, 150), (64, 90), (200, 120), (56, 56), (140, 230), (80, 60)]
    ]


def reference_embeddings(checkpoint, tokenizer, cases):
    """The reference's computation (bench/reference_path.py): transformers' bidirectional Qwen2.5-VL loaded from
    the checkpoint, transformers' image processor, one right-padded batch, mean over attended tokens, L2."""
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

    model = make_bidirectional(Qwen2_5_VLForConditionalGeneration.from_pretrained(checkpoint).eval())
    batch = processor_batch(
        tokenizer, Qwen2VLImageProcessorPil(), cases, min_pixels=SMALL_MIN_PIXELS, max_pixels=SMALL_MAX_PIXELS
    )
    assert (batch.attention_mask == 0).any(), "the reference batch must really be padded"
    with torch.no_grad():
        return ReferencePath(model).embed(batch)


def test_drop_in_parity_with_transformers(checkpoint, tokenizer, embedder, images):
    a, b, c, d, e, _ = images
    ours_inputs = [
        prompts.text_to_image_query("two red circles in the top left"),
        "a plain text target carries no instruction",
        prompts.image_target(a),
        prompts.image_question_query(b, "How many shapes are there?"),
        prompts.document_page(c),
        ["first words ", d, " then more words ", e, " and the end"],
        a,
    ]
    reference_cases = [  # the reference's prompts spelled out (the public MoCa code's), not built by our helpers
        ("Find me an everyday image that matches the given caption: two red circles in the top left\n", []),
        ("a plain text target carries no instruction", []),
        (f"{V}Represent the given image.\n", [a]),
        (f"{V}Represent the given image with the following question: How many shapes are there?\n", [b]),
        (f"{V}\nRepresent the given document image.", [c]),
        (f"first words {V} then more words {V} and the end", [d, e]),
        (V, [a]),
    ]
    ours = embedder.encode(ours_inputs, convert_to_tensor=True)
    reference = reference_embeddings(checkpoint, tokenizer, reference_cases)
    cosine = F.cosine_similarity(ours, reference, dim=-1)
    assert cosine.min().item() >= 0.99999, cosine


def test_batch_invariance(embedder, images):
    mixed = [
        "a short text",
        prompts.image_target(images[0]),
        prompts.document_page(images[2]),
        ["interleaved ", images[3], " words ", images[4]],
        prompts.image_question_query(images[5], "Where?"),
        "another text, a little longer than the first one",
    ]
    alone = np.concatenate([embedder.encode([x]) for x in mixed])
    one_batch = embedder.encode(mixed, batch_tokens=100_000)
    many_batches = embedder.encode(mixed, batch_tokens=64)
    np.testing.assert_allclose(one_batch, alone, atol=1e-5, rtol=0)
    np.testing.assert_allclose(many_batches, alone, atol=1e-5, rtol=0)
    embedder.num_workers = 2
    try:
        in_workers = embedder.encode(mixed, batch_tokens=64)
    finally:
        embedder.num_workers = 0
    np.testing.assert_allclose(in_workers, alone, atol=1e-5, rtol=0)


def test_outputs_order_types_and_normalisation(embedder, images):
    texts = ["one", "two words", "three words here"]
    out = embedder.encode(texts)
    assert isinstance(out, np.ndarray) and out.shape == (3, embedder.dim) and out.dtype == np.float32
    np.testing.assert_allclose(out[::-1], embedder.encode(texts[::-1]), atol=1e-6)
    single = embedder.encode("two words", convert_to_tensor=True)
    assert isinstance(single, torch.Tensor) and single.shape == (embedder.dim,)
    raw = embedder.encode(texts, normalize_embeddings=False, convert_to_tensor=True)
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(F.normalize(raw, dim=-1), torch.from_numpy(out), atol=1e-6, rtol=0)
    assert embedder.encode([]).shape == (0, embedder.dim)


def test_image_sources_are_equivalent(embedder, images, tmp_path):
    import io

    path = tmp_path / "a.png"
    images[1].save(path)
    data = io.BytesIO()
    images[1].save(data, format="PNG")
    out = embedder.encode(
        [images[1], path, data.getvalue(), {"image": str(path)}, {"text": V, "image": images[1]}, [images[1]]]
    )
    np.testing.assert_allclose(out, np.broadcast_to(out[0], out.shape), atol=1e-6)


def test_as_input_forms(images):
    assert as_input("text", "n") == EmbedInput("text", (), "n")
    assert as_input({"text": "caption", "image": "x.png"}, "n") == EmbedInput(V + "caption", ("x.png",), "n")
    assert as_input({"text": f"before {V} after", "image": "x.png"}, "n").text == f"before {V} after"
    assert as_input({"text": "only text", "image": ""}, "n") == EmbedInput("only text", (), "n")
    mixed = as_input(["a ", images[0], " b"], "n")
    assert mixed.text == f"a {V} b" and mixed.images == (images[0],)
    with pytest.raises(ValueError, match="input 4: unknown keys"):
        as_input({"txt": "typo"}, "input 4")
    with pytest.raises(ValueError, match="input 5: an interleaved input holds strings and images, not int"):
        as_input(["a", 3], "input 5")


def test_plan_batches():
    costs = [5, 40, 7, 30, 12, 3, 100]
    batches = plan_batches(costs, budget=50)
    assert sorted(i for b in batches for i in b) == list(range(len(costs)))
    assert [6] in batches  # over the budget: alone
    assert all(sum(costs[i] for i in b) <= 50 for b in batches if len(b) > 1)
    flat = [costs[i] for b in batches for i in b]
    assert flat == sorted(costs, reverse=True)


def test_missing_and_corrupt_images_name_the_input(embedder, tmp_path):
    with pytest.raises(ValueError, match=r"input 1: image file not found: .*nowhere\.png"):
        embedder.encode(["fine", {"text": "x", "image": str(tmp_path / "nowhere.png")}])
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(ValueError, match="input 0: cannot decode image file"):
        embedder.encode([corrupt, "fine"])


def test_a_non_finite_embedding_is_an_error_naming_its_input(checkpoint):
    """Weights that pass the load-time check but overflow in the forward (an inf scale here): encode, and the
    server through embed_packed, stop naming the input instead of returning NaN."""
    embedder = MocaEmbedder.from_pretrained(checkpoint, min_pixels=SMALL_MIN_PIXELS, max_pixels=SMALL_MAX_PIXELS)
    with torch.no_grad():
        embedder.model.language_model.norm.weight[0] = float("inf")
    with pytest.raises(ValueError, match=r"^input 0: its embedding is not finite \(NaN or inf\)"):
        embedder.encode("a few words")


def test_truncated_image_names_the_input_from_a_worker(embedder, images, tmp_path):
    path = tmp_path / "truncated.png"
    images[4].save(path)
    path.write_bytes(path.read_bytes()[:-200])  # the header reads, the pixels do not decode
    embedder.num_workers = 2
    try:
        with pytest.raises(ValueError, match="input 2: cannot decode image file"):
            embedder.encode(["a", "b", path, "c"], batch_tokens=8)
    finally:
        embedder.num_workers = 0


def test_from_pretrained_errors_and_hub_ids(checkpoint, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no such checkpoint directory"):
        MocaEmbedder.from_pretrained(tmp_path / "missing" / "deeper")
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((checkpoint / name).read_bytes())
    with pytest.raises(FileNotFoundError, match="no tokenizer; pass processor_path"):
        MocaEmbedder.from_pretrained(bare)
    assert MocaEmbedder.from_pretrained(bare, processor_path=checkpoint).dim == 64

    import huggingface_hub

    calls = []
    monkeypatch.setattr(
        huggingface_hub, "snapshot_download", lambda name, allow_patterns: calls.append(name) or str(checkpoint)
    )
    assert local_checkpoint("some-owner/some-model") == checkpoint and calls == ["some-owner/some-model"]


def test_fp8_is_skipped_with_a_reason_on_cpu(checkpoint, caplog, embedder):
    with caplog.at_level(logging.WARNING):
        fp8 = MocaEmbedder.from_pretrained(
            checkpoint, fp8=True, min_pixels=SMALL_MIN_PIXELS, max_pixels=SMALL_MAX_PIXELS
        )
    assert "fp8: off (float8 needs CUDA" in caplog.text
    np.testing.assert_array_equal(fp8.encode("same weights"), embedder.encode("same weights"))


@pytest.mark.slow
def test_compiled_decoder_layers_give_the_same_embeddings(checkpoint, embedder):
    compiled = MocaEmbedder.from_pretrained(
        checkpoint, compile=True, min_pixels=SMALL_MIN_PIXELS, max_pixels=SMALL_MAX_PIXELS
    )
    texts = ["compiled once", "and run again on other lengths too"]
    np.testing.assert_allclose(compiled.encode(texts), embedder.encode(texts), atol=1e-5, rtol=0)


def test_sentence_transformers_keywords(embedder, images):
    from sentence_transformers import quantize_embeddings

    a, b = images[0], images[1]
    texts = ["one short text", "a second, longer text with a few more words"]
    assert embedder.get_sentence_embedding_dimension() == embedder.dim
    base = embedder.encode(texts)
    np.testing.assert_allclose(embedder.encode(texts, batch_size=1), base, atol=1e-6)
    np.testing.assert_allclose(embedder.encode(texts, device="cpu"), base, atol=1e-6)
    raw = embedder.encode(texts, normalize_embeddings=False)
    cut = embedder.encode(texts, truncate_dim=16)
    assert cut.shape == (2, 16)
    np.testing.assert_allclose(cut, raw[:, :16] / np.linalg.norm(raw[:, :16], axis=-1, keepdims=True), atol=1e-6)
    as_list = embedder.encode(texts, convert_to_numpy=False)
    assert isinstance(as_list, list) and all(isinstance(x, torch.Tensor) for x in as_list)
    np.testing.assert_array_equal(embedder.encode(texts, precision="binary"), quantize_embeddings(base, "binary"))
    assert embedder.encode(texts, precision="int8").dtype == np.int8
    # prompts: a template ("{}" takes the text), a plain prefix, or a name of the reference's instructions
    np.testing.assert_allclose(
        embedder.encode(["a cat"], prompt=prompts.TEXT_TO_IMAGE_INSTRUCTION),
        embedder.encode([prompts.text_to_image_query("a cat")]),
        atol=1e-6,
    )
    np.testing.assert_allclose(
        embedder.encode(texts, prompt="query: "), embedder.encode(["query: " + t for t in texts]), atol=1e-6
    )
    np.testing.assert_allclose(
        embedder.encode([a, {"text": "what?", "image": b}], prompt_name="image_question"),
        embedder.encode([prompts.image_question_query(a, ""), prompts.image_question_query(b, "what?")]),
        atol=1e-6,
    )
    with pytest.raises(ValueError, match="unknown prompt_name 'nope'"):
        embedder.encode(texts, prompt_name="nope")
    scores = embedder.similarity(base, base[::-1])
    assert isinstance(scores, torch.Tensor) and scores.shape == (2, 2)
    torch.testing.assert_close(scores, torch.from_numpy(base @ base[::-1].T), atol=1e-6, rtol=0)


def test_query_and_document_instructions_follow_the_reference(embedder, images):
    a, b = images[0], images[1]
    queries = embedder.encode_query(["a plain query", {"text": "How many?", "image": a}, b])
    np.testing.assert_allclose(
        queries,
        embedder.encode(["a plain query", prompts.image_question_query(a, "How many?"), prompts.image_target(b)]),
        atol=1e-6,
    )
    documents = embedder.encode_document([a, "a text target", {"text": f"{V}a captioned image", "image": b}])
    np.testing.assert_allclose(
        documents,
        embedder.encode([prompts.image_target(a), "a text target", {"text": f"{V}a captioned image", "image": b}]),
        atol=1e-6,
    )
    pages = embedder.encode_document([a], prompt_name="document_page")
    np.testing.assert_allclose(pages, embedder.encode([prompts.document_page(a)]), atol=1e-6)


def test_processor_defaults_come_from_the_checkpoint(tmp_path, checkpoint, tokenizer):
    """A checkpoint saved with its processor settings embeds with them; flags still override; a checkpoint without
    them (the published ones) gets the reference's pixel budget."""
    from moca_fast.data.image_patches import MAX_PIXELS, MIN_PIXELS
    from moca_fast.data.processor import Processor

    saved = tmp_path / "saved"
    saved.mkdir()
    for name in ("config.json", "model.safetensors"):
        (saved / name).write_bytes((checkpoint / name).read_bytes())
    Processor(tokenizer, min_pixels=SMALL_MIN_PIXELS, max_pixels=SMALL_MAX_PIXELS, max_length=77).save_pretrained(saved)
    processor = MocaEmbedder.from_pretrained(saved).processor
    settings = (processor.min_pixels, processor.max_pixels, processor.max_length)
    assert settings == (SMALL_MIN_PIXELS, SMALL_MAX_PIXELS, 77)
    assert MocaEmbedder.from_pretrained(saved, max_pixels=8 * 784).processor.max_pixels == 8 * 784
    reference = MocaEmbedder.from_pretrained(checkpoint).processor
    assert (reference.min_pixels, reference.max_pixels, reference.max_length) == (MIN_PIXELS, MAX_PIXELS, None)
