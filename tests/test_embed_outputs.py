"""encode's output kinds on a checkpoint with a multi-vector head: token vectors in input order, the same alone or
batched, equal to transformers' hidden states through the saved projection; "both"; embed_packed's order; the
declared heads; a ValueError on a checkpoint without the head."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from moca_fast import prompts
from moca_fast.inputs import as_input, encode_input
from moca_fast.integrations.transformers import make_bidirectional


@pytest.fixture(scope="module")
def inputs(make_image_module):
    # Not in cost order ("x" is the cheapest): packing reorders them, and the outputs must come back in this order.
    return [
        "x",
        prompts.text_to_image_query("two red circles"),
        make_image_module(100, 150),
        {"text": "What is shown?", "image": make_image_module(64, 90)},
        "a plain text document",
    ]


@pytest.fixture(scope="module")
def make_image_module():
    rng = np.random.default_rng(3)
    from PIL import Image

    return lambda h, w: Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8"))


def test_the_embedder_says_what_the_checkpoint_was_trained_for(multi_vector_embedder, embedder):
    assert multi_vector_embedder.multi_vector_dim == 16 and multi_vector_embedder.matryoshka_dims == (32, 16)
    assert embedder.multi_vector_dim is None and embedder.matryoshka_dims == ()


def test_multi_vectors_are_transformers_hidden_states_through_the_saved_projection(
    multi_vector_checkpoint, multi_vector_embedder, inputs
):
    from transformers import Qwen2_5_VLModel

    vectors = multi_vector_embedder.encode(inputs, output="multi_vector")
    assert isinstance(vectors, list) and len(vectors) == len(inputs)
    hf = make_bidirectional(Qwen2_5_VLModel.from_pretrained(multi_vector_checkpoint).eval())
    weights = load_file(multi_vector_checkpoint / "model.safetensors")
    weight, bias = weights["custom_text_proj.weight"].double(), weights["custom_text_proj.bias"].double()
    processor = multi_vector_embedder.processor
    for i, item in enumerate(inputs):
        seq = encode_input(processor, as_input(item, f"input {i}"))
        kwargs = dict(
            input_ids=seq.input_ids[None], mm_token_type_ids=(seq.input_ids == processor.image_token_id).long()[None]
        )
        if seq.pixel_values.shape[0]:
            kwargs.update(pixel_values=seq.pixel_values, image_grid_thw=seq.image_grid_thw)
        with torch.no_grad():
            hidden = hf(**kwargs).last_hidden_state[0].double()
        expected = F.normalize(hidden @ weight.T + bias, dim=-1)
        assert vectors[i].shape == (len(seq), 16) and vectors[i].dtype == np.float32
        assert np.abs(vectors[i] - expected.numpy()).max() <= 1e-4, i


def test_multi_vectors_are_the_same_alone_or_batched_and_both_holds_both(multi_vector_embedder, inputs):
    batched = multi_vector_embedder.encode(inputs, output="multi_vector", batch_tokens=64)
    for i, item in enumerate(inputs):
        alone = multi_vector_embedder.encode(item, output="multi_vector")
        assert alone.shape == batched[i].shape and np.abs(alone - batched[i]).max() <= 1e-5, i
        assert np.allclose(np.linalg.norm(alone, axis=-1), 1.0, atol=1e-5)
    both = multi_vector_embedder.encode(inputs, output="both", convert_to_tensor=True)
    pooled = multi_vector_embedder.encode(inputs, convert_to_tensor=True)
    assert torch.allclose(both["pooled"], pooled, atol=1e-6)
    assert all(torch.allclose(a, torch.from_numpy(b), atol=1e-5) for a, b in zip(both["multi_vector"], batched))


def test_embed_packed_returns_multi_vectors_in_the_batchs_sequence_order(multi_vector_embedder, inputs):
    processor = multi_vector_embedder.processor
    sequences = [encode_input(processor, as_input(item, f"input {i}")) for i, item in enumerate(inputs)]
    order = [3, 0, 4, 1, 2]
    batch = multi_vector_embedder.collator()([sequences[i] for i in order])
    packed = multi_vector_embedder.embed_packed(batch, output="multi_vector")
    alone = multi_vector_embedder.encode(inputs, output="multi_vector")
    for position, i in enumerate(order):
        assert np.abs(packed[position].numpy() - alone[i]).max() <= 1e-5
    assert torch.is_tensor(multi_vector_embedder.embed_packed(batch))  # pooled by default, unchanged


def test_asking_a_checkpoint_without_the_head_for_multi_vectors_is_an_error(embedder):
    for output in ("multi_vector", "both"):
        with pytest.raises(ValueError, match="no multi-vector head"):
            embedder.encode(["a"], output=output)
    with pytest.raises(ValueError, match="choose one of"):
        embedder.encode(["a"], output="dense")
