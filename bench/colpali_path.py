"""colpali-engine's ColQwen2.5 as it runs itself: the oracle of the ColQwen2.5 drop-in test and its CPU benchmark.

`write_tiny_colqwen` saves a tiny random ColQwen2.5 as colpali-engine trains one: the base model saved
by transformers, a peft LoRA adapter (colpali-engine's published target modules, random non-zero A and B) and the
processor, and returns colpali-engine's model (LoRA unmerged) and processor for the same checkpoint.
"""

from __future__ import annotations

import copy
import importlib
from pathlib import Path

import torch

# The target modules of colpali-engine's published ColQwen2.5 adapters: the decoder's linear layers and the head.
TARGET_MODULES = (
    "(.*(model)(?!.*visual).*(down_proj|gate_proj|up_proj|k_proj|q_proj|v_proj|o_proj).*$|.*(custom_text_proj).*$)"
)


def colpali():
    """The colpali_engine.models module (ColQwen2_5, ColQwen2_5_Processor)."""
    return importlib.import_module("colpali_engine.models")


def processor(tokenizer, min_pixels: int, max_pixels: int):
    """A ColQwen2_5_Processor over `tokenizer` (a copy: it sets left padding) and transformers' PIL image processor
    with that pixel budget; image-only (Qwen2-VL's processor otherwise wants a video processor, i.e. torchvision)."""
    from transformers import Qwen2VLImageProcessorPil

    class ImageOnlyProcessor(colpali().ColQwen2_5_Processor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(
                image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template, **kwargs
            )

    images = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
    return ImageOnlyProcessor(image_processor=images, tokenizer=copy.deepcopy(tokenizer))


def write_tiny_colqwen(
    path: Path,
    tokenizer,
    *,
    min_pixels: int,
    max_pixels: int,
    rank: int = 4,
    alpha: float = 8.0,
    seed: int = 0,
    **config,
):
    """A tiny random ColQwen2.5 checkpoint: `path`/base (transformers' save of ColQwen2_5) and `path`/adapter (peft's
    adapter naming the base, the tokenizer and the processor's settings). Returns (colpali-engine's model with the
    adapter applied, unmerged, in eval mode; its processor; the adapter folder). `config`: tiny_hf_config's sizes."""
    from peft import LoraConfig, get_peft_model

    from moca_fast.model.tiny import tiny_hf_config

    models = colpali()
    torch.manual_seed(seed)
    models.ColQwen2_5(tiny_hf_config(tokenizer, **config)).save_pretrained(path / "base")
    base = models.ColQwen2_5.from_pretrained(path / "base", dtype=torch.float32)
    model = get_peft_model(
        base,
        LoraConfig(
            r=rank,
            lora_alpha=alpha,
            lora_dropout=0.1,
            target_modules=TARGET_MODULES,
            init_lora_weights="gaussian",
            task_type="FEATURE_EXTRACTION",
        ),
    )
    with torch.no_grad():  # B starts at zero: random values make the adapter change every adapted weight
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.05)
    model.save_pretrained(path / "adapter")
    colqwen_processor = processor(tokenizer, min_pixels, max_pixels)
    colqwen_processor.save_pretrained(path / "adapter")
    return model.eval(), colqwen_processor, path / "adapter"


def unpadded_vectors(embeddings: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
    """colpali-engine's [B, L, dim] output (padding rows zeroed) as each input's [n_i, dim] vectors."""
    return [e[m.bool()] for e, m in zip(embeddings, attention_mask)]
