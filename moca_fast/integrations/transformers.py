"""Bridges to transformers' Qwen2.5-VL: a MocaModel from a transformers model and back, and a transformers model
made bidirectional as the reference runs it. The parity tests and bench's reference path use them; loading and
saving checkpoints (moca_fast.model.loading) does not need them."""

from __future__ import annotations

import torch

from ..config import ModelSpec
from ..model.loading import MULTI_VECTOR_HEAD, convert_key, load_state_dict_into
from ..model.moca import MocaModel


def from_transformers(hf_model, attention_backend: str = "auto") -> MocaModel:
    """A MocaModel holding copies of a transformers Qwen2_5_VLModel / ForConditionalGeneration's weights."""
    spec = ModelSpec.from_hf_config(hf_model.config)
    state = hf_model.state_dict()
    param = next(iter(state.values()))
    with torch.device("meta"):
        model = MocaModel(spec, attention_backend=attention_backend)
    model.to(dtype=param.dtype)
    load_state_dict_into(model, {k: v.detach().clone() for k, v in state.items()}, source=type(hf_model).__name__)
    return model.to(param.device)


def make_bidirectional(hf_model):
    """Make a transformers Qwen2.5-VL's decoder non-causal, as the reference runs it: the config flag (or a padding
    mask brings the causal mask back) and each attention layer's flag. Returns the model."""
    hf_model.config.text_config.is_causal = False
    for name, module in hf_model.named_modules():
        if name.endswith("language_model.layers"):
            for layer in module:
                layer.self_attn.is_causal = False
    return hf_model


def to_transformers(model: MocaModel):
    """A bidirectional transformers Qwen2_5_VLForConditionalGeneration holding copies of `model`'s weights, on
    its device and in its dtype (the inverse of `from_transformers`)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    param = next(model.parameters())
    config = Qwen2_5_VLConfig.from_dict(model.spec.hf_config)
    with torch.device(param.device):
        hf_model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=param.dtype)
    state = {}
    for name, tensor in model.state_dict().items():
        if not name.startswith(MULTI_VECTOR_HEAD[1]):  # not part of transformers' model
            state[convert_key(name, "nested", to_ours=False)] = tensor.detach().clone()
    missing, unexpected = hf_model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (model.spec.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"to_transformers: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return make_bidirectional(hf_model.train(model.training))
