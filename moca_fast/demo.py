"""`moca-fast demo`: the whole MoCa pipeline on the built-in synthetic world with a tiny Qwen2.5-VL, in minutes on
a CPU: stage 1 (MLM + MAE), stage 2 (contrastive), then embedding and evaluation in the MMEB and BEIR formats,
before and after training, against chance (computed from each task's own candidate counts). Deterministic by
seed; the summary records the wall time, the machine and the date (bench/demo_section.py puts it in the README).
With `multi_vector`, stage 2 also trains a multi-vector head and Matryoshka dimensions (full and a quarter of the
hidden size), and the summary scores the trained model three ways: pooled, Matryoshka-truncated, multi-vector MaxSim.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from .config import TrainConfig, load_train_config
from .data.synthetic import write_world
from .embed import MocaEmbedder
from .eval.mmeb import evaluate_mmeb, find_datasets, read_dataset
from .eval.vidore import evaluate_vidore
from .model.loading import load_pretrained
from .plots import plot_run

# The two stages' recipes: the demo runs these files with its paths, seed, device and step counts set on top, so a
# user can rerun either stage with `moca-fast cpt|cl --config` after a demo. They live in the repository's configs/.
RECIPES = Path(__file__).resolve().parents[1] / "configs"
CPT_RECIPE, CL_RECIPE = RECIPES / "tiny-cpt.yaml", RECIPES / "tiny-cl.yaml"
# `--multi-vector`: the tiny model's hidden size is 64, so its Matryoshka prefix is a quarter of it (16), as 512 is of
# the 3B's 2048.
MATRYOSHKA_DIM = 16
HEADS = dict(multi_vector_dim=32, matryoshka_dims=(64, MATRYOSHKA_DIM))


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
    multi_vector: bool = False  # also train the multi-vector head and Matryoshka dimensions; score all three


def stage_configs(s: DemoSettings, world: Path) -> tuple[TrainConfig, TrainConfig]:
    """configs/tiny-cpt.yaml and tiny-cl.yaml with the demo's folders, seed, device and steps (bfloat16 on CUDA)."""
    for recipe in (CPT_RECIPE, CL_RECIPE):
        if not recipe.is_file():
            raise FileNotFoundError(
                f"{recipe}: the demo's recipe is missing (the demo runs from a clone of the "
                "repository: pip install -e .)"
            )
    cuda = (s.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    common = dict(seed=s.seed, device=s.device, **({"dtype": "bfloat16"} if cuda else {}))
    cpt = load_train_config(
        str(CPT_RECIPE),
        dict(data=str(world / "cpt" / "documents"), output_dir=str(s.out / "cpt"), max_steps=s.cpt_steps, **common),
        stage="cpt",
    )
    cl = load_train_config(
        str(CL_RECIPE),
        dict(
            model=str(s.out / "cpt" / "final"),
            data=str(world / "cl"),
            output_dir=str(s.out / "cl"),
            max_steps=s.cl_steps,
            **common,
            **(HEADS if s.multi_vector else {}),
        ),
        stage="cl",
    )
    return cpt, cl


def evaluate(model, config: TrainConfig, world: Path) -> dict:
    from .trainers.setup import build_processor, build_tokenizer

    embedder = MocaEmbedder(model.eval(), build_processor(config, build_tokenizer(config)))
    mmeb = evaluate_mmeb(embedder, world / "eval" / "mmeb")
    beir = evaluate_vidore(embedder, world / "eval" / "beir")
    scores = {name: d["score"] for name, d in mmeb["datasets"].items()}
    scores.update({f"{name} (NDCG@5)": d["ndcg@5"] for name, d in beir["datasets"].items()})
    return scores


def head_scores(model, config: TrainConfig, world: Path) -> dict:
    """Each task scored with the pooled vector, its first MATRYOSHKA_DIM dimensions (normalised again) and the
    multi-vector head (MaxSim): {task: {"pooled", "matryoshka", "multi_vector"}} (x100, P@1 or NDCG@5)."""
    import torch.nn.functional as F

    from .eval import mmeb, vidore
    from .eval.late_interaction import maxsim_scores
    from .eval.metrics import ndcg_at_k, precision_at_1
    from .trainers.setup import build_processor, build_tokenizer

    embedder = MocaEmbedder(model.eval(), build_processor(config, build_tokenizer(config)))

    def similarities(queries, candidates) -> dict:
        q, c = embedder.encode(queries, output="both"), embedder.encode(candidates, output="both")
        short = [F.normalize(torch.from_numpy(x["pooled"][:, :MATRYOSHKA_DIM]), dim=-1).numpy() for x in (q, c)]
        return {
            "pooled": q["pooled"] @ c["pooled"].T,
            "matryoshka": short[0] @ short[1].T,
            "multi_vector": maxsim_scores(q["multi_vector"], c["multi_vector"]),
        }

    scores = {}
    for name, source in mmeb.find_datasets(world / "eval" / "mmeb").items():
        data = mmeb.read_dataset(name, source, world / "eval" / "mmeb")
        scores[name] = {
            kind: 100 * precision_at_1([row[index] for row, index in zip(matrix, data.candidate_index)])
            for kind, matrix in similarities(data.queries, data.candidates).items()
        }
    for name, folder in vidore.find_datasets(world / "eval" / "beir").items():
        data = vidore.read_dataset(name, folder)
        scores[f"{name} (NDCG@5)"] = {
            kind: 100 * float(ndcg_at_k(matrix, data.relevance, 5).mean())
            for kind, matrix in similarities(*vidore.instructed(data, embedder.role_prompt)).items()
        }
    return scores


def chance_scores(world: Path, names: list[str]) -> dict:
    """Expected scores of a random ranking, from each task's own data: precision@1 is the mean over queries of
    1 / (the query's distinct candidates); NDCG@5 with one relevant page among D pages is the sum over the top 5
    ranks of (1 / D) / log2(rank + 1)."""
    mmeb = world / "eval" / "mmeb"
    chance = {
        name: 100
        * statistics.mean(1 / len(np.unique(index)) for index in read_dataset(name, source, mmeb).candidate_index)
        for name, source in find_datasets(mmeb).items()
    }
    corpus = sum(1 for _ in (world / "eval" / "beir" / "SynPages" / "corpus.jsonl").open())
    ndcg = 100 * sum(1 / corpus / np.log2(rank + 1.0) for rank in range(1, 6))
    return {name: ndcg if "NDCG" in name else chance[name] for name in names}


def run_demo(settings: DemoSettings, *, resume: bool = False) -> dict:
    """Run everything; returns (and writes to out/summary.json) the summary that `format_summary` prints. With
    `resume`, each stage continues from its last checkpoint in `out` (a stage that had finished is not rerun);
    without, a rerun starts over. A stop signal checkpoints the current step and raises TrainingStopped."""
    from .plots import read_metrics
    from .trainers.run import run
    from .trainers.setup import build_model, build_tokenizer

    start = time.perf_counter()
    out = settings.out
    out.mkdir(parents=True, exist_ok=True)
    world = out / "world"
    write_world(
        world,
        seed=settings.seed,
        n_documents=settings.documents,
        n_pairs_per_task=settings.pairs_per_task,
        n_eval_queries=settings.eval_queries,
    )
    cpt, cl = stage_configs(settings, world)
    device = torch.device(settings.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    before = evaluate(build_model(cpt, build_tokenizer(cpt), device), cpt, world)  # stage 1's starting point
    for config in (cpt, cl):
        run(config, resume=resume, overwrite=not resume)
    records = {name: read_metrics(Path(c.output_dir) / "metrics.jsonl") for name, c in (("cpt", cpt), ("cl", cl))}
    after = evaluate(load_pretrained(out / "cl" / "final", device=device), cl, world)
    summary = {
        "stages": {
            name: {
                "steps": len(r),
                "tokens_per_s": statistics.median(x["tokens_per_s"] for x in r),
                "loss_first": r[0]["loss"],
                "loss_last": r[-1]["loss"],
            }
            for name, r in records.items()
        },
        "retrieval": {name: {"untrained": before[name], "trained": after[name]} for name in before},
        "chance": chance_scores(world, list(before)),
        "checkpoint": str(out / "cl" / "final"),
        "loss_curves": str(plot_run(out)) if importlib.util.find_spec("matplotlib") else None,
    }
    if settings.multi_vector:
        summary["heads"] = head_scores(load_pretrained(out / "cl" / "final", device=device), cl, world)
    summary["run"] = {
        "seconds": round(time.perf_counter() - start, 1),
        "device": machine(device),
        "load_average": round(os.getloadavg()[1], 2),  # 5 minutes: other work sharing the CPU
        "torch": torch.__version__,
        "date": datetime.now(UTC).date().isoformat(),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items()},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine()}, {os.cpu_count()} cores)"


def format_summary(summary: dict) -> str:
    run = summary["run"]
    minutes, seconds = divmod(round(run["seconds"]), 60)
    lines = [
        "",
        f"moca-fast demo: summary ({minutes} min {seconds} s on {run['device']})",
        "",
        f"{'stage':<6}{'steps':>7}{'tokens/s':>11}   loss first -> last",
    ]
    for name, s in summary["stages"].items():
        lines.append(
            f"{name:<6}{s['steps']:>7}{s['tokens_per_s']:>11.0f}   {s['loss_first']:.3f} -> {s['loss_last']:.3f}"
        )
    lines += ["", f"{'retrieval (x100)':<24}{'chance':>8}{'untrained':>11}{'trained':>9}"]
    for name, s in summary["retrieval"].items():
        metric = name if "NDCG" in name else f"{name} (P@1)"
        lines.append(f"{metric:<24}{summary['chance'][name]:>8.1f}{s['untrained']:>11.1f}{s['trained']:>9.1f}")
    if "heads" in summary:
        lines += [
            "",
            f"{'trained, scored by (x100)':<26}{'pooled':>8}{f'Matryoshka-{MATRYOSHKA_DIM}':>15}{'multi-vector':>14}",
        ]
        for name, s in summary["heads"].items():
            metric = name if "NDCG" in name else f"{name} (P@1)"
            lines.append(f"{metric:<26}{s['pooled']:>8.1f}{s['matryoshka']:>15.1f}{s['multi_vector']:>14.1f}")
    lines += ["", f"checkpoint (HF layout): {summary['checkpoint']}", f"loss curves: {summary['loss_curves']}", ""]
    return "\n".join(lines)
