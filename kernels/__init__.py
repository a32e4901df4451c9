"""Fused Triton kernels (masked-LM CE, patch reconstruction, InfoNCE) with torch references; installed as moca_fast.kernels."""
