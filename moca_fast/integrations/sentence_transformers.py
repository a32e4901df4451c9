"""A sentence-transformers input module around MocaEmbedder, so a moca_fast checkpoint loads as

    SentenceTransformer("path/to/checkpoint", trust_remote_code=True)

(sentence-transformers >= 6 imports any module class outside its own package only with trust_remote_code; the
checkpoint's modules.json names this one). `encode`, `encode_query`, `encode_document`, prompts by name and
quantisation then work as for any SentenceTransformer, with our packed engine underneath: `preprocess` keeps the
inputs as they are (texts, PIL images or paths, {"text", "image"} dicts), `forward` embeds one batch of them. The
embeddings come out L2-normalised, as MoCa's always are. Images go through moca_fast's own processor, so
sentence-transformers' image path (which wants torchvision) is never used.
"""

from __future__ import annotations

from typing import Any

from sentence_transformers.base.modules.input_module import InputModule

from ..embed import MocaEmbedder
from ..inputs import as_input, with_instructions
from ..model.loading import save_pretrained
from . import write_sentence_transformers_config

_INPUTS = "moca_inputs"


class MocaModule(InputModule):
    """The whole MoCa embedder as one sentence-transformers module: inputs in, `sentence_embedding` out."""

    def __init__(self, model_name_or_path: str, **embedder_options: Any):
        super().__init__()
        self.embedder = MocaEmbedder.from_pretrained(model_name_or_path, **embedder_options)
        self.model = self.embedder.model  # a submodule, so SentenceTransformer.to(device) moves it
        self.tokenizer = self.embedder.processor.tokenizer

    @property
    def modalities(self) -> list:
        return ["text", "image", ("image", "text"), "message"]  # "message": a batch mixing kinds

    def preprocess(self, inputs, prompt: str | None = None, task: str | None = None, **kwargs) -> dict[str, Any]:
        """The batch's inputs, normalised, with `prompt` applied, or with the checkpoint's instruction (the
        reference's, or a ColQwen2.5's own) for a query or a document (`task`, which encode_query / encode_document
        set) when no prompt is given."""
        items = [as_input(x, f"input {i}") for i, x in enumerate(inputs)]
        role = task if task in ("query", "document") else None
        return {_INPUTS: with_instructions(items, prompt, role, role_prompt=self.embedder.role_prompt)}

    def forward(self, features: dict[str, Any], **kwargs) -> dict[str, Any]:
        embeddings = self.embedder.encode(features[_INPUTS], convert_to_tensor=True)  # L2-normalised
        features["sentence_embedding"] = embeddings.to(self.embedder.device)
        return features

    def get_sentence_embedding_dimension(self) -> int:
        return self.embedder.dim

    def save(self, output_path: str, *args, **kwargs) -> None:
        """What a moca_fast checkpoint holds: weights and config (with these modules files), tokenizer, processor."""
        save_pretrained(self.model, output_path)
        write_sentence_transformers_config(output_path)
        self.embedder.processor.save_pretrained(output_path)

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", **kwargs) -> MocaModule:
        return cls(model_name_or_path)
