"""Training transforms: FP8 only on decoder linears (skipped with a reason where unsupported); compile per
block keeps the numbers and the checkpoint keys."""

import logging

import pytest
import torch
from torch import nn

import moca_fast.parallel.parallelize as parallelize_module
from moca_fast.config import ModelSpec
from moca_fast.model.moca import MocaModel
from moca_fast.model.tiny import tiny_hf_config
from moca_fast.parallel.parallelize import convert_decoder_to_fp8, parallelize


@pytest.fixture
def model(tokenizer):
    torch.manual_seed(0)
    return MocaModel(ModelSpec.from_hf_config(tiny_hf_config(tokenizer))).init_weights()


def test_fp8_is_skipped_with_a_logged_reason_on_cpu(model, caplog):
    with caplog.at_level(logging.WARNING):
        assert convert_decoder_to_fp8(model.language_model.layers, torch.device("cpu")) is False
    assert "fp8: off (float8 needs CUDA, the device is cpu)" in caplog.text
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))


def test_fp8_converts_only_decoder_linears(tokenizer, monkeypatch):
    pytest.importorskip("torchao.float8")
    # intermediate 1040: the decoder's gate/up projections are wide enough for float8 to pay
    model = MocaModel(ModelSpec.from_hf_config(tiny_hf_config(tokenizer, intermediate_size=1040))).init_weights()
    monkeypatch.setattr(parallelize_module, "fp8_supported", lambda device: (True, "forced for the test"))
    assert convert_decoder_to_fp8(model.language_model.layers, torch.device("cpu")) is True
    converted = {name for name, m in model.named_modules() if isinstance(m, nn.Linear) and type(m) is not nn.Linear}
    decoder = {
        name
        for name, m in model.language_model.layers.named_modules(prefix="language_model.layers")
        if isinstance(m, nn.Linear) and m.out_features == 1040
    }
    assert converted == decoder and converted
    untouched = [model.lm_head, *[m for m in model.visual.modules() if isinstance(m, nn.Linear)]]
    assert all(type(m) is nn.Linear for m in untouched)
    assert type(model.language_model.embed_tokens) is nn.Embedding


@pytest.mark.slow
def test_compiled_blocks_match_eager_and_keep_keys(model, processor, make_image):
    from moca_fast.data.batch import pack_sequences
    from moca_fast.data.tokens import IMAGE_PLACEHOLDER

    batch = pack_sequences(
        [
            processor.encode(f"{IMAGE_PLACEHOLDER}a red circle", [make_image(56, 56)], "a"),
            processor.encode("two blue squares", [], "b"),
        ],
        processor.image_token_id,
    )
    eager = model(batch)
    keys = list(model.state_dict())
    state = parallelize(
        model,
        [*model.language_model.layers, *model.visual.blocks],
        device=torch.device("cpu"),
        fp8_layers=None,
        activation_checkpointing=True,
        compile=True,
        world_size=1,
    )
    assert state == {"fp8": False, "activation_checkpointing": True, "compile": True, "fsdp": False}
    compiled = model(batch)
    compiled.float().pow(2).mean().backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    assert list(model.state_dict()) == keys
    assert model.language_model.layers[0].mlp.up_proj.weight.grad is not None
