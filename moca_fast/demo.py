"""`moca-fast demo`: the whole MoCa pipeline on the built-in synthetic world with a tiny Qwen2.5-VL, in minutes on
a CPU: stage 1 (MLM + MAE), stage 2 (contrastive), then embedding and evaluation in the MMEB and BEIR formats,
before and after training, against chance. Deterministic by seed.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import TrainConfig
from .data.synthetic import N_CANDIDATES, write_world
from .embed import MocaEmbedder
from .eval.mmeb import evaluate_mmeb
from .eval.vidore import evaluate_vidore
from .model.loading import load_pretrained

IMAGE_PIXELS = 112 * 112  # the world's images at full size: 16 LLM tokens each
# Stage 2 trains on the scene tasks. Rendered pages are unreadable at 16 tokens per image, so their task only
# adds batches a tiny model cannot learn; page retrieval is still evaluated (and stays near chance).
TRAIN_TASKS = ("t2i", "i2t", "vqa")


@dataclass(frozen=True)
class DemoSettings:
    out: Path
    cpt_steps: int = 40
    cl_steps: int = 600
    device: str | None = None  # None: CUDA when present
    seed: int = 0
    documents: int = 512
    pairs_per_task: int = 512
    eval_queries: int = 100


def stage_configs(s: DemoSettings, world: Path) -> tuple[TrainConfig, TrainConfig]:
    cuda = (s.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    common = dict(tokenizer="tiny", max_length=256, min_pixels=IMAGE_PIXELS, max_pixels=IMAGE_PIXELS, seed=s.seed,
                  dtype="bfloat16" if cuda else "float32", activation_checkpointing=False, num_workers=0,
                  device=s.device, checkpoint_every=10**9, warmup_ratio=0.05)
    cpt = TrainConfig(stage="cpt", model="tiny", data=str(world / "cpt" / "documents"),
                      output_dir=str(s.out / "cpt"), lr=3e-4, grad_accum=1, tokens_per_micro_batch=4096,
                      max_steps=s.cpt_steps, **common)
    cl = TrainConfig(stage="cl", model=str(s.out / "cpt" / "final"), data=str(world / "cl"),
                     output_dir=str(s.out / "cl"), lr=5e-4, pairs_per_rank=32, tokens_per_micro_batch=8192,
                     temperature=0.05, task_homogeneous=True, tasks=TRAIN_TASKS, max_steps=s.cl_steps, **common)
    return cpt, cl


def evaluate(model, config: TrainConfig, world: Path) -> dict:
    from .trainers.setup import build_processor, build_tokenizer

    embedder = MocaEmbedder(model.eval(), build_processor(config, build_tokenizer(config)))
    mmeb = evaluate_mmeb(embedder, world / "eval" / "mmeb")
    beir = evaluate_vidore(embedder, world / "eval" / "beir")
    scores = {name: d["score"] for name, d in mmeb["datasets"].items()}
    scores.update({f"{name} (NDCG@5)": d["ndcg@5"] for name, d in beir["datasets"].items()})
    return scores


def chance_scores(world: Path, names: list[str]) -> dict:
    """Expected scores of a random ranking: 1/candidates for precision@1; for NDCG@5 with one relevant page
    among the corpus, sum over the top 5 ranks of P(relevant there) / log2(rank + 1)."""
    corpus = sum(1 for _ in (world / "eval" / "beir" / "SynPages" / "corpus.jsonl").open())
    ndcg = 100 * sum(1 / corpus / torch.log2(torch.tensor(rank + 1.0)).item() for rank in range(1, 6))
    return {name: ndcg if "NDCG" in name else 100 / N_CANDIDATES for name in names}


def run_demo(settings: DemoSettings) -> dict:
    """Run everything; returns (and writes to out/summary.json) the summary that `format_summary` prints."""
    from .trainers.run import run
    from .trainers.setup import build_model, build_tokenizer

    out = settings.out
    out.mkdir(parents=True, exist_ok=True)
    world = out / "world"
    write_world(world, seed=settings.seed, n_documents=settings.documents, n_pairs_per_task=settings.pairs_per_task,
                n_eval_queries=settings.eval_queries)
    cpt, cl = stage_configs(settings, world)
    device = torch.device(settings.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    before = evaluate(build_model(cpt, build_tokenizer(cpt), device), cpt, world)  # stage 1's starting point
    records = {"cpt": run(cpt, overwrite=True), "cl": run(cl, overwrite=True)}  # a demo rerun starts over
    after = evaluate(load_pretrained(out / "cl" / "final", device=device), cl, world)
    summary = {
        "stages": {name: {"steps": len(r), "tokens_per_s": statistics.median(x["tokens_per_s"] for x in r),
                          "loss_first": r[0]["loss"], "loss_last": r[-1]["loss"]} for name, r in records.items()},
        "retrieval": {name: {"untrained": before[name], "trained": after[name]} for name in before},
        "chance": chance_scores(world, list(before)),
        "checkpoint": str(out / "cl" / "final"),
        "loss_curves": str(plot_losses(records, out / "losses.png")),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def plot_losses(records: dict[str, list[dict]], path: Path) -> Path:
    """One panel per stage: training loss against step, drawn with PIL (no plotting dependency)."""
    from PIL import Image, ImageDraw

    width, height, margin = 480, 300, 40
    canvas = Image.new("RGB", (width * len(records), height), "white")
    draw = ImageDraw.Draw(canvas)
    for k, (name, recs) in enumerate(records.items()):
        losses = [r["loss"] for r in recs]
        lo, hi = min(losses), max(losses)
        x0 = k * width
        draw.rectangle([x0 + margin, margin, x0 + width - margin // 2, height - margin], outline="black")
        points = [(x0 + margin + (width - 1.5 * margin) * i / max(1, len(losses) - 1),
                   height - margin - (height - 2 * margin) * (v - lo) / max(hi - lo, 1e-9))
                  for i, v in enumerate(losses)]
        draw.line(points, fill=(40, 80, 220), width=2)
        draw.text((x0 + margin, 12), f"{name}: loss {losses[0]:.2f} -> {losses[-1]:.2f} over {len(losses)} steps",
                  fill="black")
        draw.text((x0 + 4, margin), f"{hi:.2f}", fill="black")
        draw.text((x0 + 4, height - margin - 10), f"{lo:.2f}", fill="black")
    canvas.save(path)
    return path


def format_summary(summary: dict) -> str:
    lines = ["", "moca-fast demo: summary", "", f"{'stage':<6}{'steps':>7}{'tokens/s':>11}   loss first -> last"]
    for name, s in summary["stages"].items():
        lines.append(f"{name:<6}{s['steps']:>7}{s['tokens_per_s']:>11.0f}   {s['loss_first']:.3f} -> {s['loss_last']:.3f}")
    lines += ["", f"{'retrieval (x100)':<24}{'chance':>8}{'untrained':>11}{'trained':>9}"]
    for name, s in summary["retrieval"].items():
        metric = name if "NDCG" in name else f"{name} (P@1)"
        lines.append(f"{metric:<24}{summary['chance'][name]:>8.1f}{s['untrained']:>11.1f}{s['trained']:>9.1f}")
    lines += ["", f"checkpoint (HF layout): {summary['checkpoint']}", f"loss curves: {summary['loss_curves']}", ""]
    return "\n".join(lines)
