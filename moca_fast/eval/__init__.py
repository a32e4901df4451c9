"""Evaluation harnesses: MMEB (precision@1) and ViDoRe-v2 (NDCG@5), their metrics, an mteb encoder wrapper."""
