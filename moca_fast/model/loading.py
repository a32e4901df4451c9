"""Checkpoint I/O in the Hugging Face layouts: a key table for both transformers layouts, load and save (the
bridges to transformers' model objects are in moca_fast.integrations.transformers).

Our module names equal transformers' below the top-level prefix, so the table maps prefixes, one line per
sub-model and layout, and works in both directions. Saving writes the transformers 4.x flat layout that the
published MoCa checkpoints use; transformers 5.x reads it too.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

import torch
from huggingface_hub import save_torch_state_dict
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from ..config import HEADS_KEY, ModelSpec
from .moca import MocaModel

# The multi-vector head sits beside the backbone under colpali-engine's name in every layout.
MULTI_VECTOR_HEAD = ("custom_text_proj.", "custom_text_proj.")
# (checkpoint prefix, our prefix), first match wins.
KEY_LAYOUTS: dict[str, tuple[tuple[str, str], ...]] = {
    # transformers 4.x Qwen2_5_VLForConditionalGeneration: the published MoCa checkpoints.
    "flat": (MULTI_VECTOR_HEAD, ("visual.", "visual."), ("model.", "language_model."), ("lm_head.", "lm_head.")),
    # transformers >= 4.52 / 5.x Qwen2_5_VLForConditionalGeneration.
    "nested": (
        MULTI_VECTOR_HEAD,
        ("model.visual.", "visual."),
        ("model.language_model.", "language_model."),
        ("lm_head.", "lm_head."),
    ),
    # a bare Qwen2_5_VLModel (no LM head).
    "base": (MULTI_VECTOR_HEAD, ("visual.", "visual."), ("language_model.", "language_model.")),
}

SHARD_BYTES = 5 * 1024**3
# A reference stage-1 checkpoint also holds its MAE head (model/heads.py reads it): not part of the backbone.
MAE_HEAD_PREFIXES = ("mae_decoder.", "mae_proj.")

log = logging.getLogger(__name__)


def detect_layout(keys) -> str:
    keys = list(keys)
    if any(k.startswith("model.language_model.") for k in keys):
        return "nested"
    if any(k.startswith("language_model.") for k in keys):
        return "base"
    if any(k.startswith("model.layers.") or k == "model.embed_tokens.weight" for k in keys):
        return "flat"
    raise ValueError(f"not a Qwen2.5-VL state dict: keys begin {sorted(keys)[:3]}")


def convert_key(key: str, layout: str, to_ours: bool = True) -> str | None:
    """Rename one key between a checkpoint layout and ours; None when the key has no counterpart."""
    for theirs, ours in KEY_LAYOUTS[layout]:
        src, dst = (theirs, ours) if to_ours else (ours, theirs)
        if key.startswith(src):
            return dst + key[len(src) :]
    return None


def load_state_dict_into(model: MocaModel, state_dict: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Copy a Hugging Face state dict (any layout) into `model`; missing, unexpected or misshapen keys raise.
    A stage-1 MAE head stored with the weights (the reference's `mae_decoder.*`, `mae_proj.*`) is left out."""
    mae = [key for key in state_dict if key.startswith(MAE_HEAD_PREFIXES)]
    if mae:
        log.info(
            "%s: its stage-1 MAE head (%d tensors mae_decoder.*, mae_proj.*) is not part of the backbone: left "
            "out (stage 1 continues from it)",
            source,
            len(mae),
        )
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(MAE_HEAD_PREFIXES)}
    layout = detect_layout(state_dict)
    tied = model.spec.tie_word_embeddings
    ours = {}
    for key, tensor in state_dict.items():
        name = convert_key(key, layout)
        if name is None:
            raise ValueError(f"{source}: unexpected key {key!r} for the {layout} layout")
        if tied and name == "lm_head.weight":
            continue  # tied to the embeddings; some exporters write it anyway
        ours[name] = tensor
    expected = {k: v for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    missing = sorted(set(expected) - set(ours))
    unexpected = sorted(set(ours) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{source}: missing keys {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected keys {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    for name, tensor in ours.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ValueError(
                f"{source}: {name} has shape {tuple(tensor.shape)}, the config needs {tuple(expected[name].shape)}"
            )
    dtype = next(iter(expected.values())).dtype
    model.load_state_dict({k: v.to(dtype) for k, v in ours.items()}, strict=False, assign=True)
    model.tie_weights()


def load_pretrained(
    path: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attention_backend: str = "auto",
) -> MocaModel:
    """A MocaModel from a local Hugging Face checkpoint directory (config.json + safetensors), either layout."""
    from transformers import Qwen2_5_VLConfig

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json (expected a Qwen2.5-VL checkpoint directory)")
    check_hf_config(path / "config.json")
    spec = ModelSpec.from_hf_config(Qwen2_5_VLConfig.from_pretrained(path, local_files_only=True))
    with torch.device("meta"):
        model = MocaModel(spec, attention_backend=attention_backend)
    model.to(dtype=dtype)
    load_state_dict_into(model, read_safetensors(path, device), source=str(path))
    return model.to(device)


def check_hf_config(file: Path) -> None:
    """A ValueError naming `file` when it is not JSON, or not the config of a vision-language model."""
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as error:  # UnicodeDecodeError too
        raise ValueError(f"{file}: not a valid JSON config: {error}") from None
    if not isinstance(raw, dict) or "vision_config" not in raw:
        kind = f"model_type {raw.get('model_type')!r}" if isinstance(raw, dict) else "it"
        raise ValueError(f"{file}: {kind} has no vision_config: not a Qwen2.5-VL checkpoint (a text-only model?)")


def save_pretrained(
    model: MocaModel, path: str | os.PathLike, state_dict: dict | None = None, dtype: torch.dtype | None = None
) -> torch.dtype:
    """Write config.json and safetensors shards in the transformers 4.x flat layout (readable by 4.x and 5.x), in
    `dtype` (default: the dtype the model's config declares, e.g. Qwen's bfloat16; else the weights' own), which
    config.json then states. The text config says `is_causal: false`, so transformers loads it bidirectional.
    The embedding heads the model was trained for (its multi-vector head's size, its Matryoshka dimensions) are
    declared under `moca_fast_heads`, the head's weights saved as `custom_text_proj.*`. Returns the dtype written.
    (The files that let sentence-transformers load the folder: moca_fast.integrations.)

    `state_dict`: the full state dict to write instead of `model.state_dict()` (a sharded model gathers it)."""
    from transformers import Qwen2_5_VLConfig

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    weights = model.state_dict() if state_dict is None else state_dict
    config = Qwen2_5_VLConfig.from_dict(model.spec.hf_config)
    dtype = dtype or declared_dtype(model.spec.hf_config) or next(iter(weights.values())).dtype
    config.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    config.dtype = dtype
    config.text_config.is_causal = False
    if model.spec.multi_vector_dim is not None or model.spec.matryoshka_dims:
        setattr(
            config,
            HEADS_KEY,
            {"multi_vector_dim": model.spec.multi_vector_dim, "matryoshka_dims": list(model.spec.matryoshka_dims)},
        )
    elif hasattr(config, HEADS_KEY):
        delattr(config, HEADS_KEY)
    config.save_pretrained(path)
    state = {}
    for name in sorted(weights):
        if model.spec.tie_word_embeddings and name == "lm_head.weight":
            continue
        state[convert_key(name, "flat", to_ours=False)] = weights[name].detach().to(dtype).contiguous().cpu()
    # model.safetensors, or shards of at most SHARD_BYTES and model.safetensors.index.json
    save_torch_state_dict(state, path, max_shard_size=SHARD_BYTES)
    return dtype


def declared_dtype(hf_config: dict) -> torch.dtype | None:
    """The dtype a Hugging Face config declares (`dtype`; `torch_dtype` in older files), or None."""
    declared = hf_config.get("dtype") or hf_config.get("torch_dtype")
    return getattr(torch, declared) if isinstance(declared, str) else None


def read_safetensors(path: Path, device) -> dict[str, torch.Tensor]:
    state = {}
    for name in safetensors_files(path):
        with unreadable_as_value_error(path / name):
            state.update(load_file(path / name, device=str(device)))
    return state


def read_mae_head(path: str | os.PathLike) -> dict[str, torch.Tensor] | None:
    """The stage-1 MAE head a checkpoint directory stores with its weights (the reference's `mae_decoder.*` and
    `mae_proj.*` tensors), or None when it has none."""
    path = Path(path)
    tensors = {}
    for name in safetensors_files(path):
        with unreadable_as_value_error(path / name), safe_open(path / name, framework="pt") as stream:
            for key in stream.keys():
                if key.startswith(MAE_HEAD_PREFIXES):
                    tensors[key] = stream.get_tensor(key)
    return tensors or None


@contextlib.contextmanager
def unreadable_as_value_error(file: Path):
    """A truncated or corrupt safetensors file is a ValueError naming it (safetensors' own error does not)."""
    try:
        yield
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{file}: not a readable safetensors file (truncated or corrupt?): {error}") from None


def safetensors_files(path: Path) -> list[str]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    if (path / "model.safetensors").is_file():
        return ["model.safetensors"]
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
