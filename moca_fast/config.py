"""Dataclass configs: the model spec read from a Hugging Face Qwen2.5-VL config, and the stage configs."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class VisionSpec:
    depth: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    out_hidden_size: int
    fullatt_block_indexes: tuple[int, ...]
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    in_channels: int = 3
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Values in one patch row of pixel_values (3 * 2 * 14 * 14 = 1176 for Qwen2.5-VL)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_unit(self) -> int:
        """Patches merged into one LLM token (2 x 2 = 4)."""
        return self.spatial_merge_size**2


@dataclass(frozen=True)
class TextSpec:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    mrope_section: tuple[int, int, int]
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class ModelSpec:
    """Everything our Qwen2.5-VL needs to build itself; `hf_config` is kept to save checkpoints in HF form."""

    text: TextSpec
    vision: VisionSpec
    tie_word_embeddings: bool
    image_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    hf_config: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_hf_config(cls, config) -> "ModelSpec":
        """From a transformers `Qwen2_5_VLConfig` (either the 4.x flat or the 5.x nested form)."""
        t, v = config.text_config, config.vision_config
        if t.hidden_act != "silu" or v.hidden_act != "silu":
            raise ValueError(f"only silu MLPs are supported, got text {t.hidden_act!r}, vision {v.hidden_act!r}")
        rope = t.rope_parameters or {}
        mrope = tuple(rope.get("mrope_section", (16, 24, 24)))
        head_dim = t.hidden_size // t.num_attention_heads
        if sum(mrope) * 2 != head_dim:
            raise ValueError(f"mrope_section {mrope} must sum to head_dim/2 = {head_dim // 2}")
        vrope = getattr(v, "rope_parameters", None) or {}
        text = TextSpec(
            vocab_size=t.vocab_size,
            hidden_size=t.hidden_size,
            num_layers=t.num_hidden_layers,
            num_heads=t.num_attention_heads,
            num_kv_heads=t.num_key_value_heads,
            intermediate_size=t.intermediate_size,
            mrope_section=mrope,
            rope_theta=float(rope.get("rope_theta", 1_000_000.0)),
            rms_norm_eps=t.rms_norm_eps,
        )
        vision = VisionSpec(
            depth=v.depth,
            hidden_size=v.hidden_size,
            num_heads=v.num_heads,
            intermediate_size=v.intermediate_size,
            out_hidden_size=v.out_hidden_size,
            fullatt_block_indexes=tuple(v.fullatt_block_indexes),
            patch_size=v.patch_size,
            temporal_patch_size=v.temporal_patch_size,
            spatial_merge_size=v.spatial_merge_size,
            window_size=v.window_size,
            in_channels=v.in_channels,
            rope_theta=float(vrope.get("rope_theta", 10000.0)),
        )
        if vision.out_hidden_size != text.hidden_size:
            raise ValueError(
                f"vision out_hidden_size {vision.out_hidden_size} must equal the text hidden size {text.hidden_size}"
            )
        return cls(
            text=text,
            vision=vision,
            tie_word_embeddings=bool(config.tie_word_embeddings),
            image_token_id=config.image_token_id,
            vision_start_token_id=config.vision_start_token_id,
            vision_end_token_id=config.vision_end_token_id,
            hf_config=config.to_dict(),
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("hf_config")
        return d
