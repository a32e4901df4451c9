"""moca_fast: a fast, exact engine for MoCa bidirectional multimodal embedders (Qwen2.5-VL)."""

__version__ = "0.1.0"
