"""A tiny Qwen2.5-VL configuration (same structure, toy sizes) for tests, the demo and CPU benchmarks."""

from __future__ import annotations

from ..data.tokens import IMAGE_PAD_TOKEN, PAD_TOKEN, VISION_END_TOKEN, VISION_START_TOKEN


def tiny_hf_config(tokenizer, *, vocab_size: int = 1024, hidden_size: int = 64, num_layers: int = 2,
                   num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int = 128,
                   vision_depth: int = 2, vision_hidden: int = 32, vision_heads: int = 2,
                   tie_word_embeddings: bool = True):
    """A transformers Qwen2_5_VLConfig whose special token ids are the tokenizer's."""
    from transformers import Qwen2_5_VLConfig

    head_dim = hidden_size // num_heads
    half = head_dim // 2  # mrope t/h/w sections in Qwen's 16:24:24 proportion, summing to head_dim/2
    mrope = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]
    ids = {tok: tokenizer.convert_tokens_to_ids(tok)
           for tok in (PAD_TOKEN, VISION_START_TOKEN, VISION_END_TOKEN, IMAGE_PAD_TOKEN)}
    if max(ids.values()) >= vocab_size:
        raise ValueError(f"tokenizer ids {ids} do not fit vocab_size={vocab_size}")
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
            num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, intermediate_size=intermediate_size,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": mrope},
            rms_norm_eps=1e-6, max_position_embeddings=4096,
            bos_token_id=ids[PAD_TOKEN], eos_token_id=ids[PAD_TOKEN], pad_token_id=ids[PAD_TOKEN],
        ),
        vision_config=dict(
            depth=vision_depth, hidden_size=vision_hidden, num_heads=vision_heads,
            intermediate_size=2 * vision_hidden, out_hidden_size=hidden_size,
            fullatt_block_indexes=[vision_depth - 1], window_size=112, patch_size=14, spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        image_token_id=ids[IMAGE_PAD_TOKEN], video_token_id=vocab_size - 1,
        vision_start_token_id=ids[VISION_START_TOKEN], vision_end_token_id=ids[VISION_END_TOKEN],
        tie_word_embeddings=tie_word_embeddings,
    )
    return config
