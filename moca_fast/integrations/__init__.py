"""Integrations with other libraries, each in its own module and imported only when used: their packages are
optional. What a checkpoint needs to name them (the sentence-transformers config files) is written from here
without importing them."""

from __future__ import annotations

import json
import os
from pathlib import Path

SENTENCE_TRANSFORMERS_MODULE = "moca_fast.integrations.sentence_transformers.MocaModule"


def write_sentence_transformers_config(path: str | os.PathLike) -> None:
    """modules.json and config_sentence_transformers.json, so that `SentenceTransformer(path,
    trust_remote_code=True)` loads the checkpoint through moca_fast's module, with the reference's prompts by name
    (empty query/document prompts: `encode_query` / `encode_document` then pick the instruction by input kind)."""
    from ..prompts import PROMPTS

    path = Path(path)
    modules = [{"idx": 0, "name": "0", "path": "", "type": SENTENCE_TRANSFORMERS_MODULE}]
    (path / "modules.json").write_text(json.dumps(modules, indent=2))
    config = {
        "model_type": "SentenceTransformer",
        "prompts": {"query": "", "document": "", **PROMPTS},
        "default_prompt_name": None,
        "similarity_fn_name": "cosine",
    }
    (path / "config_sentence_transformers.json").write_text(json.dumps(config, indent=2))
