"""An mteb encoder over a MocaEmbedder, so MoCa checkpoints run through mteb (>= 2) on any current transformers.

mteb is never imported here: the class follows mteb's encoder protocol by shape (`encode` over batches of
{"text": [...], "image": [...]} with task metadata; `similarity`, `similarity_pairwise` as cosines), so using it
needs mteb only on the caller's side:

    import mteb
    from moca_fast.eval.mteb import MtebEncoder
    results = mteb.evaluate(MtebEncoder.from_pretrained("moca-embed/MoCa-Qwen25VL-3B",
                                                         processor_path="Qwen/Qwen2.5-VL-3B-Instruct"), tasks)

Prompts follow the reference: an image with text is an image-question query; an image alone is a document page
in document-retrieval tasks (mteb type "DocumentUnderstanding") and an image target elsewhere; text carries no
instruction (ViDoRe queries, plain text targets).
"""

from __future__ import annotations

import numpy as np

from .. import prompts
from ..embed import MocaEmbedder


class MtebEncoder:
    mteb_model_meta = None

    def __init__(self, embedder: MocaEmbedder):
        self.embedder = embedder

    @classmethod
    def from_pretrained(cls, path_or_hub_id, **kwargs) -> "MtebEncoder":
        return cls(MocaEmbedder.from_pretrained(path_or_hub_id, **kwargs))

    def encode(self, inputs, *, task_metadata, hf_split: str = "", hf_subset: str = "", prompt_type=None,
               **kwargs) -> np.ndarray:
        document = getattr(task_metadata, "type", None) == "DocumentUnderstanding"
        items = []
        for batch in inputs:
            texts, images = batch.get("text"), batch.get("image")
            for i in range(len(texts if texts is not None else images)):
                text = texts[i] if texts is not None else None
                image = images[i] if images is not None else None
                if image is None:
                    items.append(text)
                elif text:
                    items.append(prompts.image_question_query(image, text))
                else:
                    items.append(prompts.document_page(image) if document else prompts.image_target(image))
        return self.embedder.encode(items, show_progress_bar=bool(kwargs.get("show_progress_bar", False)))

    def similarity(self, embeddings1, embeddings2) -> np.ndarray:
        return _unit(embeddings1) @ _unit(embeddings2).T

    def similarity_pairwise(self, embeddings1, embeddings2) -> np.ndarray:
        return (_unit(embeddings1) * _unit(embeddings2)).sum(axis=-1)


def _unit(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
