"""colpali-engine ColQwen2.5 checkpoints loaded as MocaModels: LoRA merged at load, causal decoder, the processor's
prompts and pixel budget.

A ColQwen2.5 checkpoint (colpali-engine 0.3, peft) is a folder holding peft's adapter_config.json and
adapter_model.safetensors (a LoRA adapter; tensors it stores whole, such as modules_to_save, replace the base's), the
tokenizer and the image processor's settings; adapter_config.json's base_model_name_or_path names the base, a
Qwen2.5-VL saved by transformers from colpali-engine's ColQwen2_5: the Qwen2_5_VLModel plus `custom_text_proj`,
Linear(hidden, 128) with a bias, the multi-vector head (a base without it is refused). A folder whose own config.json
names ColQwen2_5 in its architectures (a merged model, or the base itself) loads without an adapter.

What loading does: each LoRA pair (A [r, in], B [out, r]) is merged into its weight in fp32, W + (alpha / r) B @ A
(alpha / sqrt(r) with rsLoRA, r being A's rank, so peft's rank_pattern needs nothing more); the decoder runs causally,
as ColQwen2_5 (a causal Qwen2_5_VLModel) was trained; every token's vector is kept, as colpali-engine keeps every token
of its attention mask (it zeroes only padding, which packed sequences do not have).

Prompts (ColQwen2_5_Processor): a text query is its text after an empty prefix, followed by ten `<|endoftext|>`
(query augmentation); an image alone (a document page) becomes "<|im_start|>user\\n<image>Describe the
image.<|im_end|><|endoftext|>"; everything else goes as it is. The pixel budget is the processor's saved
min/max pixels (preprocessor_config.json, or the image_processor entry of processor_config.json).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..config import ModelSpec
from ..data.tokens import IMAGE_PLACEHOLDER
from .loading import check_hf_config, convert_key, detect_layout, load_state_dict_into, read_safetensors
from .moca import MocaModel

log = logging.getLogger(__name__)

ARCHITECTURE = "ColQwen2_5"
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # peft's prefix of every adapter tensor
HEAD = "custom_text_proj.weight"

# ColQwen2_5_Processor's prompts (colpali-engine 0.3).
QUERY_PREFIX = ""
QUERY_AUGMENTATION = "<|endoftext|>" * 10
VISUAL_PROMPT = f"<|im_start|>user\n{IMAGE_PLACEHOLDER}Describe the image.<|im_end|><|endoftext|>"
# transformers' Qwen2-VL image processor defaults, for a checkpoint that saved no pixel budget.
DEFAULT_PIXELS = {"min_pixels": 56 * 56, "max_pixels": 28 * 28 * 1280}


def is_colqwen_checkpoint(path: Path) -> bool:
    """Whether `path` holds a peft adapter (ColQwen2.5's form; `load_colqwen` checks that its base has the head) or a
    config.json naming ColQwen2_5."""
    return (path / ADAPTER_CONFIG).is_file() or _names_colqwen(path)


def _names_colqwen(path: Path) -> bool:
    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        return ARCHITECTURE in (json.loads(config.read_text(encoding="utf-8")).get("architectures") or [])
    except (ValueError, AttributeError):
        return False  # the ordinary loader names a broken config.json


def role_prompt(role: str, text: str, images: int, document_pages: bool = False) -> str | None:
    """ColQwen2.5's instruction for an input as a query or a document (moca_fast.prompts.role_prompt's signature): a
    text query gets the query prefix and augmentation, an image alone the visual prompt; None: as it is."""
    if role not in ("query", "document"):
        raise ValueError(f"role must be 'query' or 'document', got {role!r}")
    if images == 0:
        return QUERY_PREFIX + "{}" + QUERY_AUGMENTATION if role == "query" else None
    alone = images == 1 and not text.replace(IMAGE_PLACEHOLDER, "").strip()
    return VISUAL_PROMPT if alone else None


def processor_settings(path: Path) -> dict:
    """min_pixels and max_pixels of the image processor saved with the checkpoint (transformers' files, any version;
    transformers' Qwen2-VL defaults where it saved none)."""
    image = None
    if (path / "preprocessor_config.json").is_file():
        image = json.loads((path / "preprocessor_config.json").read_text(encoding="utf-8"))
    elif (path / "processor_config.json").is_file():
        image = json.loads((path / "processor_config.json").read_text(encoding="utf-8")).get("image_processor")
    if not image:
        log.info("%s: no saved image processor settings; transformers' Qwen2-VL defaults %s", path, DEFAULT_PIXELS)
        return dict(DEFAULT_PIXELS)
    size = image.get("size") or {}  # {"shortest_edge", "longest_edge"}; {"min_pixels", "max_pixels"} before 4.50

    def pixels(edge: str, key: str) -> int:
        return int(size.get(edge) or size.get(key) or image.get(key) or DEFAULT_PIXELS[key])

    return {"min_pixels": pixels("shortest_edge", "min_pixels"), "max_pixels": pixels("longest_edge", "max_pixels")}


def load_colqwen(
    path: Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attention_backend: str = "auto",
    locate: Callable[[str], Path] = Path,
) -> MocaModel:
    """A causal MocaModel with a multi-vector head from a ColQwen2.5 checkpoint folder (adapter or merged);
    `locate` turns the adapter's base_model_name_or_path that is not a local folder into one (a hub download)."""
    from transformers import Qwen2_5_VLConfig

    adapter = (path / ADAPTER_CONFIG).is_file()
    base = base_checkpoint(path, locate) if adapter else path
    check_hf_config(base / "config.json")
    state = ours(read_safetensors(base, "cpu"), str(base))
    if HEAD not in state:
        raise ValueError(
            f"{base}: no {HEAD} in its weights: not a ColQwen2.5 (colpali-engine's ColQwen2_5 carries "
            "its multi-vector head; a peft adapter on another model does not load as one)"
        )
    if adapter:
        state = merge_adapter(state, path)
    spec = ModelSpec.from_hf_config(Qwen2_5_VLConfig.from_pretrained(base, local_files_only=True))
    spec = dataclasses.replace(spec, multi_vector_dim=state[HEAD].shape[0])
    if not spec.tie_word_embeddings and "lm_head.weight" not in state:
        # ColQwen2_5 is a Qwen2_5_VLModel: no LM head, which embedding never uses; the embeddings stand in for it.
        state["lm_head.weight"] = state["language_model.embed_tokens.weight"]
    with torch.device("meta"):
        model = MocaModel(spec, attention_backend=attention_backend, causal=True)
    model.to(dtype=dtype)
    nested = {convert_key(name, "nested", to_ours=False): tensor for name, tensor in state.items()}
    load_state_dict_into(model, nested, source=str(path))
    log.info(
        "%s: ColQwen2.5 (%s), causal decoder, %d-dimensional multi-vectors",
        path,
        f"base {base} + LoRA merged" if adapter else "merged",
        spec.multi_vector_dim,
    )
    return model.to(device)


def base_checkpoint(path: Path, locate: Callable[[str], Path]) -> Path:
    """The base model folder an adapter names: a local folder (as given, or relative to the adapter), else `locate`."""
    config = read_adapter_config(path)
    name = config.get("base_model_name_or_path")
    if not name:
        raise ValueError(f"{path / ADAPTER_CONFIG}: no base_model_name_or_path: which model does the adapter adapt?")
    for candidate in (Path(name), path / name):
        if (candidate / "config.json").is_file():
            return candidate
    return Path(locate(name))


def read_adapter_config(path: Path) -> dict:
    """adapter_config.json, checked: a LoRA adapter of Linear layers that merges by the plain formula."""
    file = path / ADAPTER_CONFIG
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as error:
        raise ValueError(f"{file}: not valid JSON: {error}") from None
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{file}: peft_type {config.get('peft_type')!r}: only LoRA adapters merge at load")
    unsupported = [key for key in ("use_dora", "fan_in_fan_out", "lora_bias", "alpha_pattern") if config.get(key)]
    if unsupported:
        raise ValueError(f"{file}: {', '.join(unsupported)} set: only plain LoRA (W + alpha/r B A) merges at load")
    return config


def ours(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """A Hugging Face state dict (any layout) under our module names."""
    layout = detect_layout(state)
    renamed = {}
    for key, tensor in state.items():
        name = convert_key(key, layout)
        if name is None:
            raise ValueError(f"{source}: unexpected key {key!r} for the {layout} layout")
        renamed[name] = tensor
    return renamed


def merge_adapter(state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """`state` (our names) with the adapter in `path` merged: LoRA pairs added in fp32, whole tensors replaced."""
    config = read_adapter_config(path)
    file = path / ADAPTER_WEIGHTS
    if not file.is_file():
        raise FileNotFoundError(f"{path}: {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}")
    tensors = load_file(file)
    stray = [key for key in tensors if not key.startswith(PEFT_PREFIX)]
    if stray:
        raise ValueError(f"{file}: key {stray[0]!r} lacks peft's prefix {PEFT_PREFIX!r}")
    tensors = {key[len(PEFT_PREFIX) :]: tensor for key, tensor in tensors.items()}
    # Adapter names -> our names: a LoRA pair by its weight's name, so the layout is that of the weights' names.
    weight_names = {key: _lora_weight(key) or key for key in tensors}
    try:
        layout = detect_layout(weight_names.values())
    except ValueError:
        layout = "base"  # only the head (custom_text_proj.*, the same in every layout) or the vision tower
    alpha, rslora = float(config.get("lora_alpha", 8)), bool(config.get("use_rslora"))
    merged, pairs = dict(state), 0
    for key, tensor in tensors.items():
        if ".lora_" in key and _lora_weight(key) is None:
            raise ValueError(f"{file}: {key!r}: only LoRA on Linear layers (lora_A / lora_B) merges at load")
        name = convert_key(weight_names[key], layout)
        if name is None or name not in state:
            raise ValueError(f"{file}: {key!r} adapts {weight_names[key]!r}, which the base model does not have")
        if ".lora_" not in key:  # a tensor stored whole (modules_to_save, trained biases)
            if tensor.shape != state[name].shape:
                raise ValueError(
                    f"{file}: {key!r} has shape {tuple(tensor.shape)}, the base's {name} {tuple(state[name].shape)}"
                )
            merged[name] = tensor
        elif key.endswith(".lora_A.weight"):
            b = tensors.get(key.replace(".lora_A.weight", ".lora_B.weight"))
            if b is None:
                raise ValueError(f"{file}: {key!r} has no lora_B")
            rank = tensor.shape[0]
            scale = alpha / (math.sqrt(rank) if rslora else rank)
            merged[name] = merged[name].float() + scale * (b.float() @ tensor.float())
            pairs += 1
    log.info(
        "%s: %d LoRA pairs merged (alpha %g%s), %d tensors replaced",
        path,
        pairs,
        alpha,
        ", rsLoRA" if rslora else "",
        sum(".lora_" not in key for key in tensors),
    )
    return merged


def _lora_weight(key: str) -> str | None:
    """The weight a LoRA tensor adapts ('x.q_proj.lora_A.weight' -> 'x.q_proj.weight'), or None for other keys."""
    for part in (".lora_A.weight", ".lora_B.weight"):
        if key.endswith(part):
            return key[: -len(part)] + ".weight"
    return None
