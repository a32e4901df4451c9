"""A tiny random Qwen2.5-VL checkpoint on disk, saved by transformers (4.x flat key layout) with its tokenizer."""

import torch

SMALL_PIXELS = dict(min_pixels=4 * 28 * 28, max_pixels=16 * 28 * 28)  # the 112 px synthetic images: 16 tokens
PIXELS = ["--min-pixels", str(SMALL_PIXELS["min_pixels"]), "--max-pixels", str(SMALL_PIXELS["max_pixels"])]  # CLIs


def write_tiny_checkpoint(path, tokenizer, seed: int = 11):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from moca_fast.model.tiny import tiny_hf_config

    torch.manual_seed(seed)
    Qwen2_5_VLForConditionalGeneration(tiny_hf_config(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_tiny_multi_vector_checkpoint(path, tokenizer, seed: int = 13):
    """The tiny checkpoint with a random 16-dimensional multi-vector head, declared trained for Matryoshka 32 and 16,
    saved by moca_fast."""
    from moca_fast.model.loading import load_pretrained, save_pretrained

    write_tiny_checkpoint(path / "base", tokenizer, seed)
    torch.manual_seed(seed)
    model = load_pretrained(path / "base").set_heads(16, (32, 16))
    torch.nn.init.normal_(model.custom_text_proj.weight, std=0.3)  # well spread token vectors
    save_pretrained(model, path / "headed")
    tokenizer.save_pretrained(path / "headed")
    return path / "headed"
