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
