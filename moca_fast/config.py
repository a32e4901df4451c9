"""Dataclass configs: the model spec read from a Hugging Face Qwen2.5-VL config, and the stage configs."""

from __future__ import annotations

import types
import typing
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, ConfigDict, Field, ValidationError
from pydantic.dataclasses import dataclass as pydantic_dataclass


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
    # Embedding heads the checkpoint was trained for, declared in its config.json under HEADS_KEY: the multi-vector
    # projection's size (None: no such head) and the pooled vector's Matryoshka dimensions (empty: none).
    multi_vector_dim: int | None = None
    matryoshka_dims: tuple[int, ...] = ()

    @classmethod
    def from_hf_config(cls, config) -> ModelSpec:
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
            **declared_heads(getattr(config, HEADS_KEY, None)),
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("hf_config")
        return d


HEADS_KEY = "moca_fast_heads"  # config.json: {"multi_vector_dim": int | null, "matryoshka_dims": [int, ...]}


def declared_heads(declared: dict | None) -> dict[str, Any]:
    """ModelSpec's head fields from a config's HEADS_KEY entry (absent: no heads)."""
    declared = declared or {}
    unknown = sorted(set(declared) - {"multi_vector_dim", "matryoshka_dims"})
    if unknown:
        raise ValueError(f"config.json {HEADS_KEY}: unknown keys {unknown}")
    dim = declared.get("multi_vector_dim")
    return {
        "multi_vector_dim": None if dim is None else int(dim),
        "matryoshka_dims": tuple(int(d) for d in declared.get("matryoshka_dims") or ()),
    }


@dataclass(frozen=True)
class OnlyIn:
    """Marks a TrainConfig field as one stage's: a config of the other stage that sets it is refused."""

    stage: str


CPT, CL = OnlyIn("cpt"), OnlyIn("cl")


@dataclass(frozen=True)
class OnResume:
    """Marks a TrainConfig field's resume policy (each field has one). `free`: the field says where things are, how
    fast they run, how often to save or what to do with bad input (which changes nothing on good input; a policy
    that changes the samples changes the data fingerprint), so it may differ from the checkpoint's. Otherwise the
    field is part of what the run computes: a resume with another value is refused unless the changes are allowed
    explicitly (trainers/resume.py)."""

    free: bool


Free, Compared = OnResume(free=True), OnResume(free=False)


def recompute_mode(value):
    """The recompute mode an activation_checkpointing value names: it was a boolean, and true / false (Python, YAML
    or --set) still mean full / none; any other value (a mode) is returned as it is."""
    if isinstance(value, (bool, str)):
        return {True: "full", False: "none", "true": "full", "false": "none"}.get(value, value)
    return value


Positive = Field(gt=0)
Count = Field(ge=1)
Fraction = Field(ge=0, le=1)
Rate = Field(gt=0, lt=1)


# Each field is typed and ranged where it is declared (pydantic checks both when a TrainConfig is made, and refuses
# inf and nan); a stage's own fields carry CPT or CL; every field carries its resume policy, Free or Compared
# (OnResume). A new field says it all in its line, e.g.
#     warmup_tokens: Annotated[int, Count, CPT, Compared] = 1000
# and the YAML files, --set, the one-line errors (allowed range included) and resume's checks follow from it.
@pydantic_dataclass(config=ConfigDict(allow_inf_nan=False))
class TrainConfig:
    """One training run of either stage; YAML files in configs/ fill it (see `load_train_config`)."""

    stage: Annotated[Literal["cpt", "cl"], Compared]  # "cpt" (stage 1: MLM + MAE) or "cl" (stage 2: contrastive)
    # a Hugging Face checkpoint directory; "tiny"; or "random:3b" / "random:7b" (reference shapes)
    model: Annotated[str, Free]
    # stage 1: a document source (data/documents.py); stage 2: a folder of <task>.jsonl files
    data: Annotated[str, Free]
    output_dir: Annotated[str, Free]
    # a local tokenizer/processor dir; None: the model dir; "tiny": offline BPE
    tokenizer: Annotated[str | None, Free] = None
    seed: Annotated[int, Field(ge=0), Compared] = 0
    # optimisation (the reference recipes live in configs/)
    # AdamW moves each weight by about lr per step: above 1 diverges
    lr: Annotated[float, Field(gt=0, le=1), Compared] = 2e-6
    weight_decay: Annotated[float, Fraction, Compared] = 0.0
    betas: Annotated[tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]], Compared] = (
        0.9,
        0.999,
    )
    warmup_ratio: Annotated[float, Fraction, Compared] = 0.1
    clip_grad_norm: Annotated[float, Positive, Compared] = 5.0
    epochs: Annotated[int, Count, Compared] = 1
    # stop early (demos, benchmarks); the schedule still spans max_steps
    max_steps: Annotated[int | None, Count, Compared] = None
    grad_accum: Annotated[int, Count, CPT, Compared] = 4  # micro-batches per optimizer step (stage 1)
    tokens_per_micro_batch: Annotated[int, Count, Compared] = 12800  # the packing budget of one micro-batch
    max_length: Annotated[int, Count, Compared] = 1280
    min_pixels: Annotated[int, Count, Compared] = 256 * 28 * 28
    max_pixels: Annotated[int, Count, Compared] = 1024 * 28 * 28
    # precision and speed switches: each state is logged at start
    # parameters/activations on CUDA; CPU runs use float32
    dtype: Annotated[Literal["bfloat16", "float16", "float32"], Compared] = "bfloat16"
    compile: Annotated[bool, Free] = False  # torch.compile per decoder layer and vision block
    # none | selective | full | auto (planned to fit device memory); true / false mean full / none, as before
    activation_checkpointing: Annotated[
        Literal["none", "selective", "full", "auto"], BeforeValidator(recompute_mode), Free
    ] = "full"
    fp8: Annotated[bool, Compared] = False  # torchao float8 for the decoder's linear layers (CUDA, capability >= 8.9)
    attention_backend: Annotated[Literal["auto", "flash", "varlen", "sdpa"], Free] = "auto"
    device: Annotated[str | None, Free] = None  # None: CUDA (this process's LOCAL_RANK) when present, else CPU
    num_workers: Annotated[int, Field(ge=0), Free] = 2
    # memory-planned recompute (moca_fast/parallel/memory_plan.py): with activation_checkpointing: auto, the budget
    device_memory_gb: Annotated[float | None, Positive, Free] = None  # None: the CUDA device's total memory
    # bad data and bad steps
    # skip samples failing validation or decoding (each logged, counted), not stop
    skip_invalid: Annotated[bool, Free] = False
    # let image paths leave the data's image folder ('..', absolute paths)
    allow_image_paths_outside: Annotated[bool, Free] = False
    # skip an update with a non-finite loss or gradient norm (counted), not stop
    skip_nonfinite: Annotated[bool, Free] = False
    # skip_nonfinite: stop once more of the run's steps skip
    max_skipped_fraction: Annotated[float, Fraction, Free] = 0.05
    # stage 1
    mlm_rate: Annotated[float, Rate, CPT, Compared] = 0.4
    mae_rate: Annotated[float, Rate, CPT, Compared] = 0.5
    mae_weight: Annotated[float, Field(ge=0), CPT, Compared] = 0.1
    # stage 2
    temperature: Annotated[float, Positive, CL, Compared] = 0.03
    pairs_per_rank: Annotated[int, Count, CL, Compared] = 24
    negative_ratio: Annotated[int, Field(ge=0), CL, Compared] = 2
    # GradCache chunk budget; None: one packed forward
    grad_cache_tokens: Annotated[int | None, Count, CL, Compared] = None
    mask_duplicates: Annotated[bool, CL, Compared] = True  # drop in-batch false negatives (identical targets)
    task_homogeneous: Annotated[bool, CL, Compared] = False
    # train on these <task> files of the data folder (None: all)
    tasks: Annotated[tuple[str, ...] | None, CL, Compared] = None
    # stage 2 embedding heads (None: the reference's pooled-only InfoNCE). multi_vector_dim adds a projection of
    # every final hidden state (L2-normalised per token) trained by a late-interaction (MaxSim) InfoNCE, weighted
    # by multi_vector_weight, whose logits are MaxSim scores (sums over query tokens, so tens, not cosines) over
    # multi_vector_temperature (1.0: the raw sums, as ColPali's pairwise loss takes them); matryoshka_dims trains
    # the pooled vector's InfoNCE at each of these leading dimensions (each prefix normalised again), weighted by
    # matryoshka_weights (None: 1 each), summed.
    multi_vector_dim: Annotated[int | None, Count, CL, Compared] = None
    multi_vector_weight: Annotated[float, Field(ge=0), CL, Compared] = 1.0
    multi_vector_temperature: Annotated[float, Positive, CL, Compared] = 1.0
    matryoshka_dims: Annotated[tuple[Annotated[int, Count], ...] | None, CL, Compared] = None
    matryoshka_weights: Annotated[tuple[Annotated[float, Field(ge=0)], ...] | None, CL, Compared] = None
    # bookkeeping
    checkpoint_every: Annotated[int, Count, Free] = 500
    keep_checkpoints: Annotated[int, Field(ge=0), Free] = 2  # 0: keep all
    # also log the metrics to output_dir/tensorboard (needs the tensorboard package)
    tensorboard: Annotated[bool, Compared] = False
    # stage-1 micro-batches: what tokens_per_micro_batch counts. "reference_cost": the reference's cost units
    # (text tokens + 4 x image tokens + 2 per image, capped at max_length), its buckets cut as it cuts them, so
    # a micro-batch and a step hold the reference's samples; "tokens": packed tokens, cut first-fit (fuller).
    micro_batch_budget: Annotated[Literal["reference_cost", "tokens"], CPT, Compared] = "reference_cost"

    def __post_init__(self):
        if self.max_length > self.tokens_per_micro_batch:
            raise ValueError(
                f"max_length {self.max_length} exceeds tokens_per_micro_batch "
                f"{self.tokens_per_micro_batch}: a full-length sample could never be packed"
            )
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels {self.min_pixels} exceeds max_pixels {self.max_pixels}")
        if self.matryoshka_weights is not None and len(self.matryoshka_weights) != len(self.matryoshka_dims or ()):
            raise ValueError(
                f"matryoshka_weights {self.matryoshka_weights} needs one weight per matryoshka_dims "
                f"entry {self.matryoshka_dims}"
            )


def free_on_resume(name: str) -> bool:
    """Whether a TrainConfig field may differ from the checkpoint's when a run resumes (its OnResume mark)."""
    marks = [m for m in TrainConfig.__pydantic_fields__[name].metadata if isinstance(m, OnResume)]
    if len(marks) != 1:
        raise TypeError(f"TrainConfig.{name} needs exactly one resume policy (Free or Compared), has {len(marks)}")
    return marks[0].free


def stage_of_field(name: str) -> str | None:
    """The stage a TrainConfig field belongs to ("cpt" / "cl"), None for fields of both."""
    marks = [m for m in TrainConfig.__pydantic_fields__[name].metadata if isinstance(m, OnlyIn)]
    return marks[0].stage if marks else None


def validation_message(error: ValidationError, origin: Callable[[str], str]) -> str:
    """A pydantic ValidationError of TrainConfig as one line: each bad key with its value, the allowed range and
    where the value came from (`origin(key)`)."""
    problems = []
    for item in error.errors():
        message = item["msg"].removeprefix("Value error, ")
        if not item["loc"]:  # a check across fields (__post_init__)
            problems.append(message)
            continue
        key = item["loc"][0]
        shown = key + "".join(f"[{part}]" for part in item["loc"][1:])
        if item["type"] in _BOUND_ERRORS and len(item["loc"]) == 1:
            message = f"out of range, allowed {allowed_range(key)}"
        problems.append(f"{shown}={item['input']!r} ({origin(key)}): {message.replace('Input should', 'should')}")
    return "; ".join(problems)


_BOUND_ERRORS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")


def allowed_range(name: str) -> str:
    """A TrainConfig field's declared bounds in words, e.g. '> 0 and < 1'."""
    signs = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
    return " and ".join(
        f"{sign} {getattr(mark, bound)}"
        for mark in TrainConfig.__pydantic_fields__[name].metadata
        for bound, sign in signs.items()
        if getattr(mark, bound, None) is not None
    )


def load_train_config(path: str, overrides: dict[str, Any] | None = None, *, stage: str | None = None) -> TrainConfig:
    """A TrainConfig from a YAML file, with `overrides` (the command line's, from `parse_overrides`) applied on top.
    Every problem is a one-line ValueError naming the key, its value and where it came from: a file that is not a
    YAML mapping, unknown keys, values of the wrong type or out of range, another stage's keys, and (with `stage`,
    the command's) a config of the other stage."""
    import yaml

    with open(path) as f:
        try:
            values = yaml.safe_load(f)
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise ValueError(f"{path}: not valid YAML{where}: {getattr(error, 'problem', None) or error}") from None
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of config keys (key: value lines), got a {type(values).__name__}")
    overrides = overrides or {}

    def origin(key: str) -> str:
        return "command line" if key in overrides else path

    unknown = sorted((set(values) | set(overrides)) - {f.name for f in fields(TrainConfig)})
    if unknown:
        raise ValueError(f"{origin(unknown[0])}: unknown config keys {unknown}")

    if stage is not None:
        if "stage" in overrides and overrides["stage"] != stage:
            raise ValueError(
                f"stage={overrides['stage']} (command line): the stage is the command's, here {stage!r}; "
                f"run `moca-fast {overrides['stage']}` instead"
            )
        if values.setdefault("stage", stage) != stage:
            raise ValueError(f"{path} is a {values['stage']!r} config, not {stage!r}")
    values.update(overrides)
    run_stage = values.get("stage")
    foreign = sorted(k for k in values if stage_of_field(k) not in (None, run_stage))
    if run_stage in ("cpt", "cl") and foreign:
        raise ValueError(
            "; ".join(
                f"{k} ({origin(k)}) is a {stage_of_field(k)} key: a {run_stage} run does not use it" for k in foreign
            )
        )
    try:
        return TrainConfig(**values)
    except ValidationError as error:
        missing = [item["loc"][0] for item in error.errors() if item["type"] == "missing"]
        if missing:
            raise ValueError(f"{path}: missing config keys {missing}") from None
        raise ValueError(validation_message(error, origin)) from None


_NONE = ("null", "none", "~")
_BOOLEANS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def parse_overrides(assignments: list[str] | None) -> dict[str, Any]:
    """`key=value` strings (the CLI's `--set` and its named overrides) -> TrainConfig values, each typed by its
    field: numbers, booleans (true/false), `null` for optional fields, comma-separated tuples. Unknown keys and
    values that do not parse raise; ranges are checked when the config is made (`load_train_config`)."""
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
            raise ValueError(f"{key}={raw} (command line): {error}") from None
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
