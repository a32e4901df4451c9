"""Dataclass configs: the model spec read from a Hugging Face Qwen2.5-VL config, and the stage configs."""

from __future__ import annotations

import types
import typing
from dataclasses import asdict, dataclass, field, fields
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


@dataclass
class TrainConfig:
    """One training run of either stage; YAML files in configs/ fill it (see `load_train_config`)."""

    stage: str  # "cpt" (stage 1: MLM + MAE) or "cl" (stage 2: contrastive)
    model: str  # a Hugging Face checkpoint directory; "tiny"; or "random:3b" / "random:7b" (reference shapes)
    data: str  # stage 1: a document source (data/documents.py); stage 2: a folder of <task>.jsonl files
    output_dir: str
    tokenizer: str | None = None  # a local tokenizer/processor dir; None: the model dir; "tiny": offline BPE
    seed: int = 0
    # optimisation (the reference recipes live in configs/)
    lr: float = 2e-6
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_ratio: float = 0.1
    clip_grad_norm: float = 5.0
    epochs: int = 1
    max_steps: int | None = None  # stop early (demos, benchmarks); the schedule still spans max_steps
    grad_accum: int = 4  # micro-batches per optimizer step (stage 1)
    tokens_per_micro_batch: int = 12800  # the packing budget of one micro-batch
    max_length: int = 1280
    min_pixels: int = 256 * 28 * 28
    max_pixels: int = 1024 * 28 * 28
    # precision and speed switches: each state is logged at start
    dtype: str = "bfloat16"  # parameter/activation dtype on CUDA; CPU runs use float32
    compile: bool = False  # torch.compile per decoder layer and vision block
    activation_checkpointing: bool = True
    fp8: bool = False  # torchao float8 for the decoder's linear layers (CUDA, capability >= 8.9)
    attention_backend: str = "auto"
    device: str | None = None  # None: CUDA (this process's LOCAL_RANK) when present, else CPU
    num_workers: int = 2
    # bad data and bad steps
    skip_invalid: bool = False  # skip samples failing validation or decoding (each logged, counted), not stop
    allow_image_paths_outside: bool = False  # let image paths leave the data's image folder ('..', absolute paths)
    skip_nonfinite: bool = False  # skip an update with a non-finite loss or gradient norm (counted), not stop
    # stage 1
    mlm_rate: float = 0.4
    mae_rate: float = 0.5
    mae_weight: float = 0.1
    # stage 2
    temperature: float = 0.03
    pairs_per_rank: int = 24
    negative_ratio: int = 2
    grad_cache_tokens: int | None = None  # GradCache chunk budget; None: one packed forward with gradient
    mask_duplicates: bool = True  # drop in-batch false negatives (identical targets)
    task_homogeneous: bool = False
    tasks: tuple[str, ...] | None = None  # train on these <task> files of the data folder only (None: all)
    # bookkeeping
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    tensorboard: bool = False  # also log the metrics to output_dir/tensorboard (needs the tensorboard package)
    # stage-1 micro-batches: what tokens_per_micro_batch counts. "reference_cost": the reference's cost units
    # (text tokens + 4 x image tokens + 2 per image, capped at max_length), its buckets cut as it cuts them, so
    # a micro-batch and a step hold the reference's samples; "tokens": packed tokens, cut first-fit (fuller).
    micro_batch_budget: str = "reference_cost"

    def __post_init__(self):
        if self.stage not in ("cpt", "cl"):
            raise ValueError(f"stage must be 'cpt' or 'cl', got {self.stage!r}")
        if self.max_length > self.tokens_per_micro_batch:
            raise ValueError(f"max_length {self.max_length} exceeds tokens_per_micro_batch "
                             f"{self.tokens_per_micro_batch}: a full-length sample could never be packed")
        if self.micro_batch_budget not in ("reference_cost", "tokens"):
            raise ValueError(f"micro_batch_budget must be 'reference_cost' or 'tokens', got {self.micro_batch_budget!r}")
        self.betas = tuple(self.betas)
        self.tasks = tuple(self.tasks) if self.tasks is not None else None


def load_train_config(path: str, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """A TrainConfig from a YAML file, with `overrides` (e.g. from the command line) applied on top."""
    import yaml

    with open(path) as f:
        values = yaml.safe_load(f) or {}
    values.update(overrides or {})
    unknown = sorted(set(values) - {f.name for f in TrainConfig.__dataclass_fields__.values()})
    if unknown:
        raise ValueError(f"{path}: unknown config keys {unknown}")
    return TrainConfig(**values)


_NONE = ("null", "none", "~")
_BOOLEANS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def parse_overrides(assignments: list[str] | None) -> dict[str, Any]:
    """`key=value` strings (the CLI's `--set`) -> TrainConfig values, each typed by its field: numbers, booleans
    (true/false), `null` for optional fields, comma-separated tuples. Unknown keys and bad values raise."""
    hints = typing.get_type_hints(TrainConfig)
    known = [f.name for f in fields(TrainConfig)]
    values = {}
    for assignment in assignments or []:
        key, sep, raw = assignment.partition("=")
        key = key.strip()
        if not sep:
            raise ValueError(f"--set {assignment!r}: expected key=value")
        if key not in hints:
            raise ValueError(f"--set {key}: unknown config key; the keys are {', '.join(known)}")
        try:
            values[key] = _typed(raw.strip(), hints[key])
        except ValueError as error:
            raise ValueError(f"--set {key}={raw}: {error}") from None
    return values


def _typed(raw: str, hint) -> Any:
    """`raw` converted to the type `hint` (a TrainConfig field's annotation)."""
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        if raw.lower() in _NONE and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _typed(raw, inner)
    if typing.get_origin(hint) is tuple:
        items = [item.strip() for item in raw.strip("[]()").split(",") if item.strip()]
        kinds = [args[0]] * len(items) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(kinds) != len(items):
            raise ValueError(f"expected {len(kinds)} comma-separated values")
        return tuple(_typed(item, kind) for item, kind in zip(items, kinds))
    if hint is bool:
        if raw.lower() not in _BOOLEANS:
            raise ValueError("expected true or false")
        return _BOOLEANS[raw.lower()]
    if hint in (int, float):
        try:
            return hint(raw)
        except ValueError:
            raise ValueError(f"expected {'an integer' if hint is int else 'a number'}") from None
    return raw
