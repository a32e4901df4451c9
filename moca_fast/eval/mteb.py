"""An mteb (>= 2) encoder over a MocaEmbedder, so MoCa checkpoints run through mteb's image and text tasks on any
current transformers (mteb's own MoCa entry needs transformers < 4.53):

    import mteb
    from moca_fast.eval.mteb import model_meta

    meta = model_meta("path/to/checkpoint", processor_path="path/to/Qwen2.5-VL-3B-Instruct")
    results = mteb.evaluate(meta.load_model(), mteb.get_tasks(tasks=["Vidore2ESGReportsRetrieval"]))

`model_meta` declares what mteb checks before it runs a task (image and text modalities, the embedding size,
cosine similarity); `MtebEncoder(name, revision, device=...)` is the loader mteb calls with it, and built directly
(on a path or a MocaEmbedder) it carries the same meta. mteb is imported only where a meta is built. Batches are
embedded as mteb's loader yields them, so at most one of them (with its decoded images) is held at a time.
Instructions follow the reference by input kind and role (moca_fast.prompts): `prompt_type` document or query,
and document pages in mteb's document-understanding tasks (ViDoRe).

A checkpoint with a multi-vector head (its config.json declares one) is a late-interaction model, as mteb models
ColPali: `model_meta` says so (model_type "late-interaction", similarity "MaxSim", embed_dim the head's size),
`encode` returns its token vectors zero-padded to [N, longest, dim] (mteb's form for multi-vectors) and
`similarity` scores by MaxSim, padding left out.
"""

from __future__ import annotations

import os

import numpy as np

from ..config import HEADS_KEY, declared_heads
from ..data.tokens import IMAGE_PLACEHOLDER
from ..embed import MocaEmbedder
from ..inputs import EmbedInput, with_instructions
from .late_interaction import maxsim_scores, unpadded

DOCUMENT_TASK_TYPES = ("DocumentUnderstanding",)  # mteb's task type of ViDoRe's page retrieval


class MtebEncoder:
    """mteb's encoder protocol: `encode` over mteb's batches ({"text": [...], "image": [...]}) with the task's
    metadata; `similarity` / `similarity_pairwise` as cosines, or MaxSim for a checkpoint with a multi-vector head."""

    mteb_model_meta = None  # mteb's record of the model; checked before it runs a task
    late_interaction = False  # True for a checkpoint with a multi-vector head (set from the embedder)

    def __init__(
        self,
        model_name: str | os.PathLike | MocaEmbedder,
        revision: str | None = None,
        *,
        device: str | None = None,
        checkpoint: str | None = None,
        **embedder_options,
    ):
        """`model_name`: a checkpoint directory or hub id, or a MocaEmbedder already loaded; `checkpoint` replaces
        it where mteb passes the model's display name (`model_meta` sets it). `revision` is mteb's record only.
        `embedder_options` go to MocaEmbedder.from_pretrained."""
        if isinstance(model_name, MocaEmbedder):
            self.embedder = model_name
            name, loader_kwargs = f"moca-fast/{type(model_name).__name__}", None  # no path to load it again from
        else:
            self.embedder = MocaEmbedder.from_pretrained(checkpoint or model_name, device=device, **embedder_options)
            name, loader_kwargs = str(model_name), {"checkpoint": str(checkpoint or model_name), **embedder_options}
        self.late_interaction = self.embedder.multi_vector_dim is not None  # the checkpoint decides
        # Built directly, the wrapper describes itself (mteb refuses image tasks to a model without a meta);
        # `meta.load_model()` replaces this with the meta it was loaded from.
        self.mteb_model_meta = _meta(name, revision, self.embedder.dim, self.embedder.multi_vector_dim, loader_kwargs)

    @staticmethod
    def padded(vectors: list[np.ndarray]) -> np.ndarray:
        """Token vectors [n_i, dim] -> one zero-padded float32 array [N, longest, dim]."""
        out = np.zeros(
            (len(vectors), max((len(v) for v in vectors), default=0), vectors[0].shape[1] if vectors else 0),
            dtype=np.float32,
        )
        for i, v in enumerate(vectors):
            out[i, : len(v)] = v
        return out

    def encode(
        self, inputs, *, task_metadata, hf_split: str = "", hf_subset: str = "", prompt_type=None, **kwargs
    ) -> np.ndarray:
        pages = getattr(task_metadata, "type", None) in DOCUMENT_TASK_TYPES
        role = "document" if str(getattr(prompt_type, "value", prompt_type)) == "document" else "query"
        output = "multi_vector" if self.late_interaction else "pooled"
        embeddings = [
            self.embedder.encode(
                with_instructions(
                    batch_inputs(batch), role=role, document_pages=pages, role_prompt=self.embedder.role_prompt
                ),
                output=output,
            )
            for batch in inputs
        ]
        if self.late_interaction:
            return self.padded([v for batch in embeddings for v in batch])
        return np.concatenate(embeddings) if embeddings else np.zeros((0, self.embedder.dim), dtype=np.float32)

    def similarity(self, embeddings1, embeddings2) -> np.ndarray:
        if self.late_interaction:
            return maxsim_scores(embeddings1, embeddings2)
        return _unit(embeddings1) @ _unit(embeddings2).T

    def similarity_pairwise(self, embeddings1, embeddings2) -> np.ndarray:
        if self.late_interaction:
            return np.array(
                [maxsim_scores([q], [d])[0, 0] for q, d in zip(unpadded(embeddings1), unpadded(embeddings2))],
                dtype=np.float32,
            )
        return (_unit(embeddings1) * _unit(embeddings2)).sum(axis=-1)


def batch_inputs(batch: dict) -> list[EmbedInput]:
    """One mteb batch as embedder inputs: text, an image (at the start, as the reference puts it), or both."""
    texts, images = batch.get("text"), batch.get("image")
    items = []
    for i in range(len(texts if texts is not None else images)):
        text = (texts[i] if texts is not None else None) or ""
        image = images[i] if images is not None else None
        where = f"mteb input {i} of its batch"
        items.append(
            EmbedInput(IMAGE_PLACEHOLDER + text, (image,), where) if image is not None else EmbedInput(text, (), where)
        )
    return items


def model_meta(
    path_or_hub_id: str | os.PathLike, *, name: str | None = None, revision: str | None = None, **embedder_options
):
    """An mteb ModelMeta whose loader is MtebEncoder on this checkpoint, shown as `name` (default: the path);
    `embedder_options` go to MocaEmbedder.from_pretrained, e.g. processor_path for the published checkpoints.
    mteb's `meta.load_model()` also wants its "image" extra (torchvision) for any image model. A checkpoint whose
    config declares a multi-vector head is declared a late-interaction model scored by MaxSim."""
    import json
    from pathlib import Path

    config = Path(path_or_hub_id) / "config.json"
    hidden, multi_vector_dim = None, None
    if config.is_file():
        text = json.loads(config.read_text())
        hidden = (text.get("text_config") or {}).get("hidden_size") or text.get("hidden_size")
        multi_vector_dim = declared_heads(text.get(HEADS_KEY))["multi_vector_dim"]
    return _meta(
        name or str(path_or_hub_id),
        revision,
        hidden,
        multi_vector_dim,
        {"checkpoint": str(path_or_hub_id), **embedder_options},
    )


def _meta(
    name: str, revision: str | None, hidden: int | None, multi_vector_dim: int | None, loader_kwargs: dict | None
):
    """The mteb ModelMeta of a MoCa encoder: image and text, instructions, cosine over the pooled vector or MaxSim over
    the multi-vector head's token vectors; loaded by MtebEncoder with `loader_kwargs` (None: the encoder cannot be
    loaded again, e.g. one built on an embedder in memory)."""
    from mteb.models import ModelMeta

    late = multi_vector_dim is not None
    return ModelMeta(
        loader=MtebEncoder if loader_kwargs is not None else None,
        loader_kwargs=loader_kwargs or {},
        name=name,
        revision=revision,
        release_date=None,
        languages=None,
        n_parameters=None,
        memory_usage_mb=None,
        max_tokens=None,
        embed_dim=multi_vector_dim if late else hidden,
        license=None,
        open_weights=True,
        public_training_code=None,
        public_training_data=None,
        framework=["PyTorch"],
        similarity_fn_name="MaxSim" if late else "cosine",
        model_type=["late-interaction"] if late else ["dense"],
        use_instructions=True,
        training_datasets=None,
        modalities=["image", "text"],
    )


def _unit(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
