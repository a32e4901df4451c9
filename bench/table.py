"""Write the README's performance section from bench/results/*.json: numbers are generated, never typed.

python -m bench.table            # rewrite the section between the markers in README.md
python -m bench.table --check    # exit 1 if README.md is not what the committed results give (CI test)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench.report import RESULTS, write_section

BEGIN, END = "<!-- performance:begin (bench/table.py writes this) -->", "<!-- performance:end -->"
GPU_KINDS = ("quick", "train", "embed", "kernels")


def _num(x, digits: int = 0) -> str:
    if x is None:
        return "-"
    return f"{x:,.{digits}f}"


def _source(data: dict, path: Path) -> str:
    v = data["versions"]
    versions = ", ".join(f"{k} {v[k]}" for k in ("torch", "triton", "transformers", "liger-kernel") if v.get(k))
    return f"_{data['device']}; {versions}; {data['date'][:10]}; `{data['command']}` -> `{path.name}`_"


def train_rows(data: dict) -> list[str]:
    lines = [
        "| stage | path | tokens/s | MFU | peak memory (GiB) | speed-up vs reference | loss vs reference |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for stage, summary in data["results"].items():
        speedups, diffs = summary.get("speedup_vs_reference", {}), summary.get("check_loss_rel_diff", {})
        for name, run in summary["paths"].items():
            mfu = f"{100 * run['mfu']:.1f}%" if run.get("mfu") is not None else "-"
            speed = f"{speedups[name]:.2f}x" if name in speedups else "1.00x" if name == "reference" else "-"
            diff = f"{diffs[name]:.1e} rel." if name in diffs else "-"
            lines.append(
                f"| {stage} | {name} | {_num(run['tokens_per_s'])} | {mfu} | {_num(run['max_memory_gb'], 1)} "
                f"| {speed} | {diff} |"
            )
    return lines


def embed_rows(data: dict) -> list[str]:
    lines = [
        "| workload | ours (inputs/s) | reference (inputs/s) | speed-up | min cosine |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in data["results"].items():
        lines.append(
            f"| {name} | {_num(r['ours_per_s'], 1)} | {_num(r['reference_per_s'], 1)} "
            f"| {r['speedup_vs_reference']:.2f}x | {r['cosine_min']:.5f} |"
        )
    return lines


def serve_rows(data: dict) -> list[str]:
    lines = [
        "| max wait (ms) | clients | requests/s | p50 (ms) | p99 (ms) | inputs per forward |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['max_wait_ms']:g} | {r['clients']} | {_num(r['requests_per_s'], 1)} | {_num(r['p50_ms'], 1)} "
        f"| {_num(r['p99_ms'], 1)} | {r['inputs_per_forward']:.2f} |"
        for r in data["results"]
    ]
    if "load_average" in data:  # CPU figures from a shared machine: how busy it was
        lines += [
            "",
            f"5-minute load average {data['load_average']:.1f} at the end (clients and server share the machine).",
        ]
    return lines


def kernels_rows(data: dict) -> list[str]:
    lines = ["| kernel | shape | ms | x of ideal | speed-ups |", "|---|---|---:|---:|---|"]
    for entry in data["summary"]:
        shape = ", ".join(
            f"{k}={v}"
            for k, v in entry.items()
            if k not in ("kernel", "ms", "x_of_ideal") and not k.startswith(("speedup_vs_", "memory_vs_"))
        )
        speedups = ", ".join(
            f"{k.removeprefix('speedup_vs_')} {v:.2f}x"
            if isinstance(v, float)
            else f"{k.removeprefix('speedup_vs_')} {v}"
            for k, v in entry.items()
            if k.startswith("speedup_vs_")
        )
        lines.append(f"| {entry['kernel']} | {shape} | {entry['ms']:.3f} | {entry['x_of_ideal']:.2f} | {speedups} |")
    return lines


def quick_rows(data: dict) -> list[str]:
    lines = ["| step | figure | ours | reference path | ours vs reference | check |", "|---|---|---:|---:|---:|---|"]
    steps = data["results"]

    def part(step: str, name: str) -> dict:
        return steps.get(step, {}).get("parts", {}).get(name, {"status": "not run"})

    def ok(run: dict) -> bool:
        return run.get("status") == "ok"

    def row(step, figure, ours, reference, speedup, check) -> None:
        lines.append(f"| {step} | {figure} | {ours} | {reference} | {speedup} | {check} |")

    ours, reference, masked = (part("kernel", n) for n in ("moca_fast", "liger_all_rows", "liger_masked_rows"))
    if "masked_rows" in ours:
        figure = f"masked-LM loss, ms ({ours['tokens']:,} rows, {ours['masked_rows']:,} masked)"
        speedup = f"{reference['ms'] / ours['ms']:.2f}x" if ok(ours) and ok(reference) else "-"
        check = f"Liger on the masked rows: {masked['ms']:.2f} ms" if ok(masked) else f"Liger: {masked['status']}"
        row(
            "kernel",
            figure,
            f"{ours['ms']:.2f}" if ok(ours) else ours["status"],
            f"{reference['ms']:.2f}" if ok(reference) else reference["status"],
            speedup,
            check,
        )

    def training(step: str, name: str, label: str, stage: str) -> None:
        run, base = part(step, name), part(stage, "reference")

        def shown(r: dict) -> str:
            if not ok(r):
                return r["status"]
            return _num(r["tokens_per_s"]) + (f" ({100 * r['mfu']:.1f}% MFU)" if r.get("mfu") is not None else "")

        both = ok(run) and ok(base)
        check = f"loss {abs(run['check_loss'] / base['check_loss'] - 1):.1e} rel." if both else ""
        off = [k for k in ("compile", "fp8") if k in label.lower() and not run.get("transforms", {}).get(k, True)]
        row(
            step,
            f"{label}, tokens/s",
            shown(run),
            shown(base),
            f"{base['seconds'] / run['seconds']:.2f}x" if both else "-",
            check + "".join(f"; {k} was off" for k in off),
        )

    training("cpt", "ours-eager", "stage 1", "cpt")
    training("cl", "ours-eager", "stage 2", "cl")
    for workload in ("realistic", "text", "image", "page", "interleaved"):
        run = part("embed", workload)
        if ok(run):
            row(
                "embed",
                f"{workload}, inputs/s",
                _num(run["ours_per_s"], 1),
                _num(run["reference_per_s"], 1),
                f"{run['speedup_vs_reference']:.2f}x",
                f"cosine >= {run['cosine_min']:.5f}",
            )
        else:
            row("embed", f"{workload}, inputs/s", run["status"], "", "-", "")
    training("extras", "ours", "stage 1 with compile", "cpt")
    training("extras", "ours-fp8", "stage 1 with compile + FP8", "cpt")
    return lines


WORK_FLOPS = {
    "total": "TFLOP, total",
    "backbone": "TFLOP, backbone forward + backward",
    "recompute": "TFLOP, activation recompute",
    "lm_head": "TFLOP, LM head + cross-entropy",
    "mae_layer": "TFLOP, MAE layer",
    "mae_projection": "TFLOP, MAE projection",
}
WORK_ROWS = {
    "decoder_tokens": "decoder tokens (padding included)",
    "lm_head_rows": "LM-head rows",
    "mae_layer_queries": "MAE-layer query rows",
    "vision_patches": "vision patches",
}


def work_rows(data: dict) -> list[str]:
    pools = data["results"]  # {pool: {stage: summary}}, the realistic pool first
    if "cpt" in pools or "cl" in pools:  # written before bench/work.py counted two pools: the uniform one
        pools = {"uniform": pools}
    lines = [
        "| stage | count | " + " | ".join(f"{pool}: ours | reference | reference / ours" for pool in pools) + " |",
        "|---|---|" + "---:|---:|---:|" * len(pools),
    ]

    def cells(ours, reference, digits: int) -> str:
        ratio = f"{reference / ours:.2f}x" if ours else "-"
        return f"{_num(ours, digits)} | {_num(reference, digits)} | {ratio}"

    first = next(iter(pools.values()))
    for stage in first:

        def each(get, digits: int = 0, stage=stage) -> str:
            return " | ".join(
                cells(get(s[stage]["paths"]["ours"]), get(s[stage]["paths"]["reference"]), digits)
                for s in pools.values()
            )

        ours = first[stage]["paths"]["ours"]
        for key, label in WORK_FLOPS.items():
            if key in ours["flops"]:
                lines.append(f"| {stage} | {label} | {each(lambda p, key=key: p['flops'][key] / 1e12, 1)} |")
        for key, label in WORK_ROWS.items():
            if key in ours["rows"]:
                lines.append(f"| {stage} | {label} | {each(lambda p, key=key: p['rows'][key])} |")
        lines.append(f"| {stage} | forwards | {each(lambda p: p['forwards'])} |")
    lines += [
        "",
        "Ours / reference FLOPs: "
        + "; ".join(
            f"{pool} pool {stage} {1 / s['reference_over_ours']['flops']:.2f}x"
            for pool, stages in pools.items()
            for stage, s in stages.items()
        )
        + ".",
    ]
    for pool, stages in pools.items():
        for stage, summary in stages.items():
            composition = summary["pool"]
            lines += [
                "",
                f"{pool} {stage}: {composition['sequences']:,} sequences ({composition['text_only']:,} "
                f"text-only, {composition['single_image']:,} with one image, {composition['several_images']:,} "
                f"with several), {composition['tokens']:,} tokens of which {composition['image_tokens']:,} "
                f"image tokens; useful work {_num(summary['useful_flops'] / 1e12, 1)} TFLOP (the MFU "
                "numerator).",
            ]
    cpu = data.get("cpu_time")
    if cpu:
        lines += [
            "",
            "CPU time, not GPU (bench/cpu_time.py: the tiny model, one thread, median of "
            f"{next(iter(cpu.values()))['repeats']} passes, realistic pool at the reference's shapes): "
            + "; ".join(
                f"{stage} reference / ours {c['reference_over_ours']:.2f}x CPU time "
                f"(ours {_num(c['median_cpu_seconds']['ours'], 2)} s, reference "
                f"{_num(c['median_cpu_seconds']['reference'], 2)} s), "
                f"{c['flops_reference_over_ours']:.2f}x FLOPs on the same samples"
                for stage, c in cpu.items()
            )
            + ".",
        ]
    return lines + [
        "",
        "Attention is counted over each sequence's real tokens on both sides (flash-attn's way); the "
        "InfoNCE loss and element-wise work are left out. bench/work.py says what each path runs.",
    ]


def colqwen_rows(data: dict) -> list[str]:
    lines = [
        "| workload | ours (inputs/s) | colpali-engine (inputs/s) | ours / colpali-engine | max abs difference |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in data["results"].items():
        lines.append(
            f"| {name} | {_num(r['ours_per_s'], 1)} | {_num(r['colpali_per_s'], 1)} "
            f"| {r['ratio_ours_to_colpali']:.2f}x | {r['max_abs_difference']:.1e} |"
        )
    return lines


def loader_rows(data: dict) -> list[str]:
    lines = ["| workers | samples/s | tokens/s |", "|---:|---:|---:|"]
    lines += [
        f"| {r['workers']} | {_num(r['samples_per_s'], 1)} | {_num(r['tokens_per_s'])} |" for r in data["results"]
    ]
    return lines


RENDERERS = {
    "quick": ("Headline figures in one short GPU run (bench/gpu_quick.py)", quick_rows),
    "train": ("Training steps, ours against the reference path", train_rows),
    "embed": ("Embedding, ours against the reference path", embed_rows),
    "serve": ("Embedding server on loopback (bench/serve.py)", serve_rows),
    "kernels": ("Fused kernels", kernels_rows),
    "work": ("Work counted on the same samples (FLOPs and rows, not times)", work_rows),
    "loader": ("Stage-1 data loading (CPU)", loader_rows),
    "colqwen": ("ColQwen2.5 multi-vectors, ours against colpali-engine (bench/embed.py --colqwen)", colqwen_rows),
}


def render(results: Path = RESULTS) -> str:
    files = sorted(results.glob("*.json"))
    parts = [BEGIN]
    if not any(f.name.startswith(GPU_KINDS) for f in files):
        parts.append(
            "GPU figures are pending: no GPU results are committed yet. `python -m bench.gpu_quick` (8 "
            "minutes) or `bash bench/run_gpu.sh` on an H100/H200 writes them to bench/results/, and "
            "`python -m bench.table` this table from them.\n"
        )
    for kind, (title, rows) in RENDERERS.items():
        for path in (f for f in files if f.name.startswith(kind + "-")):
            data = json.loads(path.read_text())
            parts += [f"**{title}**: {data['benchmark']}", "", *rows(data), "", _source(data, path), ""]
    parts.append(END)
    return "\n".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if README.md differs from the results")
    args = parser.parse_args()
    return write_section(BEGIN, END, render(), check=args.check, fix="python -m bench.table")


if __name__ == "__main__":
    sys.exit(main())
