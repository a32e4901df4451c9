"""MocaEmbedder: the public inference API, a faster drop-in for the published MoCa checkpoints.

`encode` takes one input or a list of them, in the forms moca_fast.inputs lists (text, an image, text and an
image, an interleaved sequence, an EmbedInput), and sentence-transformers' keywords (prompt / prompt_name,
batch_size, normalize_embeddings, convert_to_numpy / convert_to_tensor, precision, truncate_dim, device);
`encode_query` / `encode_document` give each input the reference's instruction for its kind, `similarity` scores by
cosine. A prompt is an instruction template (moca_fast.inputs.apply_prompt).

Inputs are costed from their text and image headers (no pixel decoded), sorted by cost, packed into batches of at
most `batch_tokens` tokens (and `batch_size` inputs, when given; an input longer than the budget runs alone) and
embedded; results come back in input order.
`output` chooses what comes back: "pooled" (the mean-pooled vector, the default), "multi_vector" (a checkpoint with a
multi-vector head: each input's token vectors [n_tokens, multi_vector_dim], L2-normalised per token, every token of
the sequence kept as colpali-engine's ColQwen2.5 keeps every token of its attention mask) or "both" (a dict).
Packing has no padding and attention never crosses sequences, so an input's embedding does not depend on what it
is batched with. Images are decoded, resized and patchified in DataLoader workers while the model runs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from . import prompts
from .data.batch import PackedBatch
from .data.image_patches import MAX_PIXELS, MIN_PIXELS
from .data.images import image_size
from .data.loader import PackCollator, one_line_errors, packed_loader
from .data.packing import plan_batches
from .data.processor import EncodedSequence, Processor, saved_settings
from .data.tokenizer import load_tokenizer
from .inputs import EmbedInput, as_input, encode_input, with_instructions
from .model.colqwen import is_colqwen_checkpoint, load_colqwen
from .model.colqwen import processor_settings as colqwen_settings
from .model.colqwen import role_prompt as colqwen_role_prompt
from .model.loading import load_pretrained
from .model.moca import MocaModel
from .model.pooling import mean_pool

log = logging.getLogger(__name__)

DEFAULT_BATCH_TOKENS = 16384
OUTPUTS = ("pooled", "multi_vector", "both")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


class _Encoded(Dataset):
    """Worker side: index -> the input's images decoded and the sequence encoded."""

    def __init__(self, inputs: Sequence[EmbedInput], processor: Processor):
        self.inputs, self.processor = inputs, processor

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> EncodedSequence:
        return encode_input(self.processor, self.inputs[index])


class MocaEmbedder:
    """Embeds text, images and interleaved inputs with a MocaModel: mean pooling over every token, L2-normalised."""

    def __init__(
        self,
        model: MocaModel,
        processor: Processor,
        *,
        num_workers: int = 0,
        batch_tokens: int = DEFAULT_BATCH_TOKENS,
        role_prompt=prompts.role_prompt,
    ):
        self.model = model.eval()
        self.processor = processor
        self.num_workers = num_workers
        self.batch_tokens = batch_tokens
        self.role_prompt = role_prompt  # the instructions of queries and documents (a ColQwen2.5 brings its own)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dim(self) -> int:
        return self.model.spec.text.hidden_size

    @property
    def matryoshka_dims(self) -> tuple[int, ...]:
        """The pooled vector's leading dimensions the checkpoint was trained for (empty: not trained for truncation)."""
        return self.model.spec.matryoshka_dims

    @property
    def multi_vector_dim(self) -> int | None:
        """The multi-vector head's size (None: the checkpoint has no multi-vector head)."""
        return self.model.spec.multi_vector_dim

    def check_output(self, output: str) -> None:
        """A ValueError unless this checkpoint can give `output` (one of OUTPUTS)."""
        if output not in OUTPUTS:
            raise ValueError(f"output={output!r}: choose one of {', '.join(OUTPUTS)}")
        if output != "pooled" and self.multi_vector_dim is None:
            raise ValueError(
                f"output={output!r}: this checkpoint has no multi-vector head (its config.json declares "
                "no multi_vector_dim); only output='pooled' is available"
            )

    def get_sentence_embedding_dimension(self) -> int:
        """The embedding size (sentence-transformers' name for `dim`)."""
        return self.dim

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | os.PathLike,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        compile: bool = False,
        fp8: bool = False,
        processor_path: str | os.PathLike | None = None,
        *,
        attention_backend: str = "auto",
        num_workers: int | None = None,
        batch_tokens: int = DEFAULT_BATCH_TOKENS,
        max_length: int | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
    ) -> MocaEmbedder:
        """Load a MoCa checkpoint (local directory, or a hub id such as moca-embed/MoCa-Qwen25VL-3B).

        The tokenizer comes from `processor_path` (the published checkpoints need the Qwen2.5-VL-*-Instruct one),
        else from the checkpoint. Defaults: CUDA when present, bf16 there and fp32 on CPU; the pixel budget and max
        length the checkpoint was saved with (moca_fast writes them beside its checkpoints), else the reference's
        pixel budget (256..1024 tokens per image) and no length limit; image preprocessing in min(8, cores - 1)
        workers on CUDA, in the main process on CPU (where the forward, not decoding, is the bottleneck).
        `compile` compiles each decoder layer; `fp8` converts the decoder's linear layers to torchao float8 where
        the GPU supports it (a logged reason otherwise); both through the trainers' shared `parallelize`.
        A colpali-engine ColQwen2.5 checkpoint (a peft LoRA adapter folder, or a config.json naming ColQwen2_5) loads
        through model/colqwen.py: LoRA merged, causal decoder, its processor's prompts (encode_query /
        encode_document) and pixel budget."""
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        path = local_checkpoint(path_or_hub_id)
        tokenizer_dir = local_checkpoint(processor_path) if processor_path is not None else path
        if not any((tokenizer_dir / name).is_file() for name in _TOKENIZER_FILES):
            raise FileNotFoundError(
                f"{tokenizer_dir}: no tokenizer; pass processor_path (for the published MoCa "
                "checkpoints: a copy of Qwen/Qwen2.5-VL-3B-Instruct or -7B-Instruct)"
            )
        colqwen = is_colqwen_checkpoint(path)
        model = (
            load_colqwen(path, dtype, device, attention_backend, locate=local_checkpoint)
            if colqwen
            else load_pretrained(path, dtype=dtype, device=device, attention_backend=attention_backend)
        )
        broken = [name for name, tensor in model.state_dict().items() if not torch.isfinite(tensor).all()]
        if broken:
            raise ValueError(
                f"{path}: {len(broken)} weight tensors hold NaN or inf (first: {broken[0]}); "
                "every embedding would be NaN"
            )
        if compile or fp8:
            from .parallel.parallelize import parallelize

            parallelize(
                model,
                list(model.language_model.layers),
                device=device,
                fp8_layers=model.language_model.layers if fp8 else None,
                activation_checkpointing=False,
                compile=compile,
                world_size=1,
            )
        saved = colqwen_settings(path) if colqwen else saved_settings(path)
        settings = dict(
            min_pixels=min_pixels or saved.get("min_pixels", MIN_PIXELS),
            max_pixels=max_pixels or saved.get("max_pixels", MAX_PIXELS),
            max_length=max_length or saved.get("max_length"),
        )
        log.info("processor: %s (%s)", settings, f"saved with {path}" if saved else "the reference's")
        processor = Processor(load_tokenizer(tokenizer_dir), **settings)
        if num_workers is None:
            num_workers = min(8, max((os.cpu_count() or 1) - 1, 0)) if device.type == "cuda" else 0
        return cls(
            model,
            processor,
            num_workers=num_workers,
            batch_tokens=batch_tokens,
            role_prompt=colqwen_role_prompt if colqwen else prompts.role_prompt,
        )

    def encode(
        self,
        inputs,
        prompt_name: str | None = None,
        prompt: str | None = None,
        batch_size: int | None = None,
        show_progress_bar: bool = False,
        precision: str = "float32",
        convert_to_numpy: bool = True,
        convert_to_tensor: bool = False,
        device: str | torch.device | None = None,
        normalize_embeddings: bool = True,
        truncate_dim: int | None = None,
        batch_tokens: int | None = None,
        output: str = "pooled",
        _role: str | None = None,
    ):
        """Embeddings [N, dim] (float32) of a list of inputs, in input order; [dim] for a single input.

        A list is always a list of inputs: wrap an interleaved input in its own list (`encode([[text, image]])`).
        `prompt` (or a name of moca_fast.prompts.PROMPTS) instructs every input; `batch_size` bounds the inputs of a
        packed batch as `batch_tokens` bounds its tokens; `truncate_dim` keeps the first dimensions (normalised
        again); `precision` int8 / uint8 / binary / ubinary quantises with sentence-transformers'
        quantize_embeddings; `device` moves the model there. Returns numpy (default), a tensor
        (`convert_to_tensor`), or a list of tensors (both conversions off).

        `output="multi_vector"` returns a list, in input order, of each input's token vectors [n_tokens_i,
        multi_vector_dim] (float32, L2-normalised per token; numpy arrays, or tensors with either conversion off
        or `convert_to_tensor`), one array for a single input; `output="both"` a dict {"pooled": ...,
        "multi_vector": ...}. `truncate_dim`, `normalize_embeddings` and `precision` apply to the pooled vectors."""
        self.check_output(output)
        single = not isinstance(inputs, (list, tuple))
        items = [as_input(x, f"input {i}") for i, x in enumerate([inputs] if single else inputs)]
        if prompt is None and prompt_name is not None:
            prompt = prompts.prompt_named(prompt_name)
        items = with_instructions(items, prompt, _role, role_prompt=self.role_prompt)
        if device is not None:
            self.model.to(device)
        out, vectors = self._embed(items, batch_tokens or self.batch_tokens, batch_size, show_progress_bar, output)
        if vectors is not None:
            vectors = [v.numpy() for v in vectors] if convert_to_numpy and not convert_to_tensor else vectors
            vectors = vectors[0] if single else vectors
            if output == "multi_vector":
                return vectors
        out = finish_embeddings(out, truncate_dim, normalize_embeddings)
        if precision != "float32":
            out = torch.from_numpy(quantize(out.numpy(), precision)) if len(out) else out
        out = out[0] if single else out
        if not convert_to_tensor:
            out = out.numpy() if convert_to_numpy else list(out)
        return out if vectors is None else {"pooled": out, "multi_vector": vectors}

    def encode_query(self, inputs, **kwargs):
        """`encode` for queries: without a prompt, each input gets the reference's query instruction for its kind
        (text: none, as ViDoRe queries; image + text: the image question; image: the image target)."""
        return self.encode(inputs, _role="query", **kwargs)

    def encode_document(self, inputs, **kwargs):
        """`encode` for documents: without a prompt, an image alone gets the reference's image-target instruction
        (pass prompt_name="document_page" for document pages); text and image + text go as they are."""
        return self.encode(inputs, _role="document", **kwargs)

    @staticmethod
    def similarity(a, b) -> torch.Tensor:
        """Cosine similarities [N, M] of two sets of embeddings (numpy or torch)."""
        a, b = (x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x)) for x in (a, b))
        a, b = (F.normalize(torch.atleast_2d(x).float(), dim=-1) for x in (a, b))
        return a @ b.T

    def _embed(
        self, items: list[EmbedInput], budget: int, max_items: int | None, progress: bool, output: str = "pooled"
    ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """Mean-pooled embeddings [N, dim] (float32, not normalised) on the CPU, in input order, and (unless `output`
        is "pooled") each input's token vectors, in input order."""
        out = torch.empty(len(items), self.dim, dtype=torch.float32)
        vectors = None if output == "pooled" else [None] * len(items)
        if not items:
            return out, vectors
        batches = plan_batches([self.cost(item) for item in items], budget, max_items)
        workers = min(self.num_workers, len(batches) - 1)  # one batch: no worker is worth starting
        loader = packed_loader(
            _Encoded(items, self.processor),
            batches,
            self.collator(),
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
        )
        with tqdm(total=len(items), disable=not progress, unit="input") as bar:
            for indices, batch in zip(batches, one_line_errors(loader)):
                embedded = self.embed_packed(batch, "both" if vectors is not None else "pooled")
                if vectors is None:
                    out[indices] = embedded
                else:
                    out[indices] = embedded["pooled"]
                    for i, tokens in zip(indices, embedded["multi_vector"]):
                        vectors[i] = tokens
                bar.update(len(indices))
        return out, vectors

    def collator(self) -> PackCollator:
        """Encoded sequences -> one PackedBatch for this model (what `embed_packed` takes)."""
        return PackCollator(self.processor, window_size=self.model.spec.vision.window_size)

    def embed_packed(self, batch: PackedBatch, output: str = "pooled"):
        """Mean-pooled embeddings [S, dim] (float32, not normalised, on the CPU) of one packed batch's sequences:
        the forward `encode` runs per batch, for callers that pack themselves (the server's batcher). A non-finite
        embedding is a ValueError naming its input. `output="multi_vector"`: a list of the sequences' token vectors
        [n_i, multi_vector_dim] (float32, L2-normalised per token, on the CPU) in the batch's sequence order;
        "both": {"pooled": ..., "multi_vector": ...}."""
        self.check_output(output)
        lengths = batch.cu_seqlens.diff().tolist()
        with torch.inference_mode():
            batch = batch.to(self.device, non_blocking=True)
            hidden = self.model(batch)
            pooled = mean_pool(hidden, batch.cu_seqlens).float().cpu()
            vectors = None if output == "pooled" else self.model.multi_vectors(hidden).cpu()
        finite = torch.isfinite(pooled).all(dim=-1)
        if vectors is not None:  # a sequence's token vectors are finite when their sum is
            finite &= torch.isfinite(mean_pool(vectors, batch.cu_seqlens.cpu())).all(dim=-1)
        if not finite.all():
            first = batch.sample_ids[int((~finite).nonzero()[0])]
            raise ValueError(
                f"{first}: its embedding is not finite (NaN or inf): the model's weights or its "
                f"{next(self.model.parameters()).dtype} arithmetic overflow"
            )
        if vectors is None:
            return pooled
        vectors = list(vectors.split(lengths))
        return vectors if output == "multi_vector" else {"pooled": pooled, "multi_vector": vectors}

    def cost(self, item: EmbedInput) -> int:
        """Tokens the input will take, from its text and image headers alone."""
        return self.processor.count_tokens(item.text, [image_size(image, item.id) for image in item.images], item.id)


def finish_embeddings(raw: torch.Tensor, truncate_dim: int | None = None, normalize: bool = True) -> torch.Tensor:
    """Raw mean-pooled embeddings [N, dim] as `encode` returns them: the first `truncate_dim` dimensions, then
    L2-normalised."""
    out = raw if truncate_dim is None else raw[:, :truncate_dim]
    return F.normalize(out, dim=-1) if normalize else out


def quantize(embeddings: np.ndarray, precision: str) -> np.ndarray:
    """sentence-transformers' quantisation (int8, uint8, binary, ubinary) of float32 embeddings."""
    try:
        from sentence_transformers import quantize_embeddings
    except ImportError as error:
        raise ImportError(
            f"precision={precision!r} quantises with sentence-transformers: "
            "pip install 'moca-fast[sentence-transformers]'"
        ) from error
    return quantize_embeddings(embeddings, precision=precision)


def local_checkpoint(path_or_hub_id: str | os.PathLike) -> Path:
    """A local directory as it is; an `owner/name` hub id that is not a local path is downloaded (config,
    weights and tokenizer files only) through huggingface_hub. Nothing else ever reaches the network."""
    path = Path(path_or_hub_id)
    if path.exists():
        return path
    name = str(path_or_hub_id)
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{name}: no such checkpoint directory (and not a hub id of the form owner/name)")
    from huggingface_hub import snapshot_download

    log.info("downloading %s from the Hugging Face hub", name)
    return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "merges.txt", "vocab.json"]))
