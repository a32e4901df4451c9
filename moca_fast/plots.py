"""Training curves from metrics.jsonl, drawn with matplotlib (an optional dependency, imported only here).

`plot_run(run_dir)` finds the metrics of a run (its own metrics.jsonl, or those of the runs in its subfolders, as
the demo's cpt/ and cl/) and draws one column per run: every loss part against the optimizer step (loss, and
stage 1's mlm and mae), then the learning rate. Each panel has its own labelled axes. Written at the end of every
training run and by `moca-fast plot RUN_DIR`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

METRICS = "metrics.jsonl"
LOSS_PARTS = ("loss", "mlm", "mae")


def find_runs(run_dir: str | os.PathLike) -> dict[str, Path]:
    """{run name: its metrics.jsonl}: the folder's own, else those of its direct subfolders."""
    run_dir = Path(run_dir)
    if (run_dir / METRICS).is_file():
        return {run_dir.name: run_dir / METRICS}
    runs = {child.name: child / METRICS for child in sorted(run_dir.iterdir()) if (child / METRICS).is_file()}
    if not runs:
        raise FileNotFoundError(f"{run_dir}: no {METRICS}, here or in a subfolder (a training run's output_dir)")
    return runs


def read_metrics(path: Path) -> list[dict]:
    """The logged records in step order; a step logged twice (replayed after a resume) keeps its last record."""
    by_step = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            by_step[record["step"]] = record
    return [by_step[step] for step in sorted(by_step)]


def plot_run(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Draw the curves of the run(s) under `run_dir` into `out` (default: run_dir/losses.png); returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {name: read_metrics(path) for name, path in find_runs(run_dir).items()}
    out = Path(out) if out is not None else Path(run_dir) / "losses.png"
    fig, axes = plt.subplots(
        2, len(runs), figsize=(5.5 * len(runs), 6.5), squeeze=False, gridspec_kw={"height_ratios": [3, 1]}
    )
    for column, (name, records) in enumerate(runs.items()):
        steps = [r["step"] for r in records]
        losses, rates = axes[0][column], axes[1][column]
        for part in LOSS_PARTS:
            if any(part in r for r in records):
                losses.plot(steps, [r.get(part) for r in records], label=part, linewidth=1.5)
        losses.set_title(f"{name}: {len(records)} steps")
        losses.set_ylabel("loss")
        losses.legend()
        losses.grid(alpha=0.3)
        rates.plot(steps, [r.get("lr") for r in records], color="tab:gray")
        rates.set_xlabel("optimizer step")
        rates.set_ylabel("learning rate")
        rates.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        rates.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
