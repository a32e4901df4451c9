"""Entry point of both stages: build everything a TrainConfig describes and run the shared loop."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from ..config import TrainConfig
from ..parallel.distributed import finish_distributed
from .guards import TrainingStopped
from .loop import train
from .setup import build_model, build_processor, build_tokenizer, start

log = logging.getLogger(__name__)


def run(
    config: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    allow_config_change: bool = False,
    stop_after: int | None = None,
    documents=None,
    pairs=None,
) -> list[dict]:
    """Train stage `config.stage`; `documents` / `pairs` replace the configured data source (tests). See
    trainers/loop.py for `resume`, `overwrite` and `allow_config_change`."""
    device, rank, world = start(config)
    try:
        records = _run(
            config,
            device,
            rank,
            world,
            documents=documents,
            pairs=pairs,
            options=dict(
                resume=resume, overwrite=overwrite, allow_config_change=allow_config_change, stop_after=stop_after
            ),
        )
    except TrainingStopped:  # every rank stops at the same step: leave together
        finish_distributed()
        raise
    finish_distributed()  # on success only: after a failure torchrun stops the other ranks, a barrier would hang
    if rank == 0:
        plot_losses(Path(config.output_dir))
    return records


def plot_losses(output_dir: Path) -> None:
    """output_dir/losses.png from its metrics (moca_fast.plots), when matplotlib is installed."""
    if importlib.util.find_spec("matplotlib") is None:
        log.info("no loss plot: matplotlib is not installed (pip install 'moca-fast[plot]')")
        return
    from ..plots import plot_run

    log.info("loss curves: %s", plot_run(output_dir))


def _run(config: TrainConfig, device, rank: int, world: int, *, documents, pairs, options: dict) -> list[dict]:
    tokenizer = build_tokenizer(config)
    processor = build_processor(config, tokenizer)
    model = build_model(config, tokenizer, device)
    if config.stage == "cpt":
        from .cpt import ContinualPretraining

        stage = ContinualPretraining(config, model, processor, device, rank, world, documents=documents)
    else:
        from .cl import ContrastiveFinetuning

        stage = ContrastiveFinetuning(config, model, processor, device, rank, world, pairs=pairs)
    return train(config, stage, processor=processor, device=device, **options)
