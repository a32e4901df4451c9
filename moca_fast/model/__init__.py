"""Lean Qwen2.5-VL on packed tokens: vision tower, bidirectional text decoder, heads, loading."""
