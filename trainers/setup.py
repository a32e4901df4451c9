"""What both stages set up the same way: device, tokenizer, processor, model (loaded or tiny), precision."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch

from ..config import TrainConfig
from ..data.processor import Processor
from ..data.tokenizer import load_tokenizer, tiny_tokenizer
from ..model.loading import load_pretrained
from ..model.moca import MocaModel
from ..parallel.distributed import init_distributed, training_device

log = logging.getLogger(__name__)

TINY = "tiny"
RANDOM = "random:"  # "random:3b" / "random:7b": the reference shapes with random weights (benchmarks)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def build_tokenizer(config: TrainConfig):
    """The model directory's tokenizer when it carries one (stage 1's final/ does, with the `<|mask|>` id its
    embeddings were trained with), else `config.tokenizer` (a local directory, or "tiny"). A directory that does
    not exist is a one-line error naming the key: training loads nothing from a hub."""
    generated = config.model == TINY or config.model.startswith(RANDOM)
    if not generated:
        model = Path(config.model)
        if not model.is_dir():
            raise FileNotFoundError(
                f"model {config.model}: no such directory (expected a local Qwen2.5-VL checkpoint directory)"
            )
        if any((model / name).is_file() for name in TOKENIZER_FILES):
            if config.tokenizer is not None and Path(config.tokenizer) != model:
                log.info("tokenizer: the model directory's (%s), not %s", model, config.tokenizer)
            return load_tokenizer(model)
    if config.tokenizer == TINY or (config.tokenizer is None and generated):
        return tiny_tokenizer()
    if config.tokenizer is None:
        raise FileNotFoundError(
            f"model {config.model}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); "
            "name a tokenizer directory with `tokenizer:`"
        )
    if not Path(config.tokenizer).is_dir():
        raise FileNotFoundError(f"tokenizer {config.tokenizer}: no such directory")
    return load_tokenizer(config.tokenizer)


def build_processor(config: TrainConfig, tokenizer) -> Processor:
    return Processor(
        tokenizer, min_pixels=config.min_pixels, max_pixels=config.max_pixels, max_length=config.max_length
    )


def generated_hf_config(name: str, tokenizer):
    """The transformers config of a generated model: `tiny`, `random:3b` or `random:7b`."""
    from ..model.tiny import reference_hf_config, tiny_hf_config

    return tiny_hf_config(tokenizer) if name == TINY else reference_hf_config(name[len(RANDOM) :], tokenizer)


def build_model(config: TrainConfig, tokenizer, device: torch.device) -> MocaModel:
    """fp32 master weights on `device`: a checkpoint directory, a random tiny Qwen2.5-VL (`model: tiny`) or
    random weights of the reference shapes (`model: random:3b`, `random:7b`)."""
    if config.model == TINY or config.model.startswith(RANDOM):
        from ..config import ModelSpec

        torch.manual_seed(config.seed)
        with torch.device(device):
            model = MocaModel(
                ModelSpec.from_hf_config(generated_hf_config(config.model, tokenizer)), config.attention_backend
            )
        return model.init_weights()
    return load_pretrained(config.model, dtype=torch.float32, device=device, attention_backend=config.attention_backend)


def autocast(config: TrainConfig, device: torch.device, world_size: int):
    """bf16 autocast over fp32 master weights on one CUDA device; FSDP's mixed-precision policy does it when
    sharded; CPU runs stay fp32."""
    if device.type == "cuda" and world_size == 1 and config.dtype == "bfloat16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def start(config: TrainConfig) -> tuple[torch.device, int, int]:
    """Device and (rank, world size), with the process group joined when launched by torchrun."""
    device = training_device(config.device)
    rank, world = init_distributed(device.type)
    torch.manual_seed(config.seed)
    if device.type == "cpu":
        fix_cpu_threads(torch.get_num_threads())
    return device, rank, world


def fix_cpu_threads(threads: int) -> None:
    """Run the CPU ops with exactly `threads` threads: torch.set_num_threads sets OpenMP's and MKL's counts and turns
    MKL's dynamic choice of thread counts off (MKL_DYNAMIC, on by default: until a process calls it, MKL may run a
    product on fewer threads than asked). Reductions split across threads add in another order with another
    count, so the same step in two processes is bitwise the same only with the same fixed count; the loop records
    it in each checkpoint and a resume takes it back."""
    torch.set_num_threads(threads)
    log.info("CPU threads: %d (fixed: a run and its resumes compute with the same count)", threads)
