"""Qwen2.5-VL configurations built without downloads: the tiny model of tests and the demo, and the real 3B / 7B
shapes (Qwen2.5-VL-3B/7B's published configs) for random-weight benchmarks. Special-token ids are always the given
tokenizer's."""

from __future__ import annotations

from ..data.tokens import IMAGE_PAD_TOKEN, PAD_TOKEN, VISION_END_TOKEN, VISION_START_TOKEN

REFERENCE_SHAPES = {
    "3b": dict(
        vocab_size=151936,
        hidden_size=2048,
        num_layers=36,
        num_heads=16,
        num_kv_heads=2,
        intermediate_size=11008,
        tie_word_embeddings=True,
    ),
    "7b": dict(
        vocab_size=152064,
        hidden_size=3584,
        num_layers=28,
        num_heads=28,
        num_kv_heads=4,
        intermediate_size=18944,
        tie_word_embeddings=False,
    ),
}
REFERENCE_VISION = dict(
    vision_depth=32,
    vision_hidden=1280,
    vision_heads=16,
    vision_intermediate=3420,
    fullatt_block_indexes=(7, 15, 23, 31),
)


def tiny_hf_config(
    tokenizer,
    *,
    vocab_size: int = 1024,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    vision_depth: int = 2,
    vision_hidden: int = 32,
    vision_heads: int = 2,
    tie_word_embeddings: bool = True,
):
    """A tiny transformers Qwen2_5_VLConfig (same structure, toy sizes)."""
    return qwen25vl_hf_config(
        tokenizer,
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        vision_depth=vision_depth,
        vision_hidden=vision_hidden,
        vision_heads=vision_heads,
        vision_intermediate=2 * vision_hidden,
        fullatt_block_indexes=(vision_depth - 1,),
        tie_word_embeddings=tie_word_embeddings,
    )


def reference_hf_config(size: str, tokenizer):
    """The Qwen2.5-VL-3B or -7B shapes ("3b" / "7b") for random weights."""
    if size not in REFERENCE_SHAPES:
        raise ValueError(f"unknown reference size {size!r}; choose one of {sorted(REFERENCE_SHAPES)}")
    return qwen25vl_hf_config(tokenizer, **REFERENCE_SHAPES[size], **REFERENCE_VISION)


def qwen25vl_hf_config(
    tokenizer,
    *,
    vocab_size: int,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    intermediate_size: int,
    vision_depth: int,
    vision_hidden: int,
    vision_heads: int,
    vision_intermediate: int,
    fullatt_block_indexes: tuple[int, ...],
    tie_word_embeddings: bool,
):
    """A transformers Qwen2_5_VLConfig of the given sizes whose special token ids are the tokenizer's."""
    from transformers import Qwen2_5_VLConfig

    head_dim = hidden_size // num_heads
    half = head_dim // 2  # mrope t/h/w sections in Qwen's 16:24:24 proportion, summing to head_dim/2
    mrope = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]
    ids = {
        tok: tokenizer.convert_tokens_to_ids(tok)
        for tok in (PAD_TOKEN, VISION_START_TOKEN, VISION_END_TOKEN, IMAGE_PAD_TOKEN)
    }
    if max(ids.values()) >= vocab_size:
        raise ValueError(f"tokenizer ids {ids} do not fit vocab_size={vocab_size}")
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            intermediate_size=intermediate_size,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": mrope},
            rms_norm_eps=1e-6,
            max_position_embeddings=32768,
            bos_token_id=ids[PAD_TOKEN],
            eos_token_id=ids[PAD_TOKEN],
            pad_token_id=ids[PAD_TOKEN],
        ),
        vision_config=dict(
            depth=vision_depth,
            hidden_size=vision_hidden,
            num_heads=vision_heads,
            intermediate_size=vision_intermediate,
            out_hidden_size=hidden_size,
            fullatt_block_indexes=list(fullatt_block_indexes),
            window_size=112,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        image_token_id=ids[IMAGE_PAD_TOKEN],
        video_token_id=vocab_size - 1,
        vision_start_token_id=ids[VISION_START_TOKEN],
        vision_end_token_id=ids[VISION_END_TOKEN],
        tie_word_embeddings=tie_word_embeddings,
    )
