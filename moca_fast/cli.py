"""The `moca-fast` command line. One subcommand per job, each an `add_<name>(subparsers)` function that declares
its arguments and sets `run` to the function doing the work; adding a command (cpt, cl, demo, bench) means
writing one such function and listing it in COMMANDS.

    moca-fast embed inputs.jsonl --output embeddings.npy --model DIR      (or .parquet)
    torchrun --nproc_per_node 8 -m moca_fast.cli embed inputs.jsonl --output DIR --model DIR  (parts, resumable)
    moca-fast eval mmeb --data DIR [--images DIR] --model DIR
    moca-fast eval vidore --data DIR --model DIR
    moca-fast demo [--out runs/demo] [--steps 40 600] [--device cpu]
    moca-fast cpt --config configs/qwen25vl-3b-cpt.yaml [--resume] [--set key=value ...]  (torchrun for FSDP2)
    moca-fast cl --config configs/qwen25vl-3b-cl.yaml [--resume] [--set key=value ...]
    moca-fast plot RUN_DIR [--out losses.png]
    moca-fast export-stage1 RUN/checkpoints/step-NNNNNNN OUTPUT           (a model folder carrying the MAE head)
    moca-fast serve --model DIR [--host 127.0.0.1 --port 8000]                  (pip install 'moca-fast[serve]')
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger("moca_fast")

DTYPES = ("bfloat16", "float16", "float32")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moca-fast", description="Train, embed with and evaluate MoCa models.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(subparsers)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return args.run(args) or 0
    except (ValueError, FileNotFoundError) as error:  # bad input: the message names it, no traceback needed
        parser.exit(2, f"moca-fast {args.command}: error: {error_line(error)}\n")


def error_line(error: Exception) -> str:
    """A bad input's message as one line; a TrainConfig that a command builds from its own options (the demo's
    --steps) reports its bad values as a config file's are reported."""
    if getattr(error, "title", None) == "TrainConfig" and hasattr(error, "errors"):  # pydantic's ValidationError
        from .config import validation_message

        return validation_message(error, lambda key: "from the command's options")
    return str(error)


# ---------------------------------------------------------------------------------------------- model options


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", required=True, help="checkpoint directory, or a hub id (owner/name)")
    group.add_argument("--processor", help="tokenizer directory or hub id (default: the checkpoint's)")
    group.add_argument("--device", help="default: cuda when present, else cpu")
    group.add_argument("--dtype", choices=DTYPES, help="default: bfloat16 on cuda, float32 on cpu")
    group.add_argument("--batch-tokens", type=int, help="tokens per packed forward (default: the embedder's)")
    group.add_argument("--num-workers", type=int, help="image preprocessing workers (default: the embedder's)")
    group.add_argument("--compile", action="store_true", help="torch.compile each decoder layer")
    group.add_argument("--fp8", action="store_true", help="float8 decoder linears (CUDA, capability >= 8.9)")
    group.add_argument("--min-pixels", type=int, help="per image (default: the checkpoint's, else the reference's)")
    group.add_argument("--max-pixels", type=int, help="per image (default: the checkpoint's, else the reference's)")
    group.add_argument(
        "--max-length", type=int, help="truncate inputs to this many tokens (default: the checkpoint's, else none)"
    )


def embedder_from_args(args):
    import torch

    from .embed import MocaEmbedder

    options = dict(
        device=args.device,
        dtype=getattr(torch, args.dtype) if args.dtype else None,
        compile=args.compile,
        fp8=args.fp8,
        processor_path=args.processor,
        num_workers=args.num_workers,
        max_length=args.max_length,
        min_pixels=args.min_pixels,
        max_pixels=args.max_pixels,
    )
    if args.batch_tokens:
        options["batch_tokens"] = args.batch_tokens
    return MocaEmbedder.from_pretrained(args.model, **options)


# ---------------------------------------------------------------------------------------------- embed


def add_embed(subparsers) -> None:
    parser = subparsers.add_parser(
        "embed",
        help="embed JSON lines of text and/or image paths",
        description='Each line: {"text": ..., "image": path} (either or both; an '
        'optional "id" is kept in parquet output). Embeddings come out '
        "in line order, L2-normalised, float32.",
    )
    parser.add_argument("inputs", type=Path, help="JSON-lines file")
    parser.add_argument(
        "--output",
        type=Path,
        required=True,
        help=".npy ([N, dim] array) or .parquet file; or a "
        "folder (a path without a suffix): parquet parts, sharded across torchrun's ranks, resumable",
    )
    parser.add_argument(
        "--part-size",
        type=int,
        default=4096,
        help="inputs per part of a folder --output (default: 4096); a rerun skips the parts on disk",
    )
    parser.add_argument("--images", type=Path, help="root of relative image paths (default: the file's folder)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an --output file that exists; a folder "
        "--output otherwise resumes (or refuses another run's folder)",
    )
    parser.add_argument(
        "--output-kind",
        choices=("pooled", "multi_vector", "both"),
        default="pooled",
        help="a folder --output: pooled vectors (default), the multi-vector head's token vectors "
        "(a list of fp16 vectors per row; the checkpoint needs the head), or both",
    )
    parser.add_argument(
        "--pool-factor",
        type=int,
        help="a multi-vector folder --output: pool each input's token vectors hierarchically to about 1/N of them",
    )
    add_model_arguments(parser)
    parser.set_defaults(run=run_embed)


def run_embed(args) -> None:
    """One --output file, or a folder of parts on every rank torchrun starts (moca_fast.embed_io.output_is_folder)."""
    from .embed_io import embed_to_file, embed_to_folder, output_is_folder

    image_root = args.images or args.inputs.parent
    options = dict(overwrite=args.overwrite, output_kind=args.output_kind, pool_factor=args.pool_factor)
    if not output_is_folder(args.output):
        return embed_to_file(lambda: embedder_from_args(args), args.inputs, args.output, image_root, **options)

    def this_ranks_embedder():
        from .parallel.distributed import training_device

        args.device = str(training_device(args.device))  # under torchrun on CUDA: this rank's GPU
        return embedder_from_args(args)

    embed_to_folder(
        this_ranks_embedder, args.inputs, args.output, image_root, model=args.model, part_size=args.part_size, **options
    )


# ---------------------------------------------------------------------------------------------- eval


def add_eval(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="evaluate on MMEB or ViDoRe-v2 (local data)")
    benchmarks = parser.add_subparsers(dest="benchmark", required=True)
    mmeb = benchmarks.add_parser("mmeb", help="MMEB precision@1 on TIGER-Lab MMEB-eval rows")
    mmeb.add_argument("--data", type=Path, required=True, help="folder of dataset folders (parquet / JSON lines)")
    mmeb.add_argument("--images", type=Path, help="root of the rows' image paths (default: --data)")
    vidore = benchmarks.add_parser("vidore", help="ViDoRe-v2 NDCG@5 on BEIR-format folders")
    vidore.add_argument("--data", type=Path, required=True, help="a BEIR folder, or a folder of them")
    vidore.add_argument("--split", default="test", help="qrels split (default: test)")
    for parser in (mmeb, vidore):
        parser.add_argument("--datasets", nargs="+", help="only these datasets (default: all found)")
        parser.add_argument(
            "--output",
            type=Path,
            default=Path("moca-eval"),
            help="results JSON and the embedding cache that lets a rerun resume (default: moca-eval)",
        )
        add_model_arguments(parser)
        parser.set_defaults(run=run_eval)


def run_eval(args) -> None:
    from .eval import mmeb, vidore

    embedder = embedder_from_args(args)
    model_id = f"{args.model} with the processor {args.processor}" if args.processor else str(args.model)
    common = dict(
        datasets=args.datasets, cache_dir=args.output / "cache" / args.benchmark, model_id=model_id, progress=True
    )
    if args.benchmark == "mmeb":
        report = mmeb.evaluate_mmeb(embedder, args.data, image_root=args.images, **common)
        table = mmeb.format_report(report)
    else:
        report = vidore.evaluate_vidore(embedder, args.data, split=args.split, **common)
        table = vidore.format_report(report)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / f"{args.benchmark}.json").write_text(json.dumps(report, indent=2))
    print(table)
    log.info("results in %s", args.output / f"{args.benchmark}.json")


# ---------------------------------------------------------------------------------------------- cpt, cl


def add_train(subparsers) -> None:
    for stage, what in (
        ("cpt", "stage 1: continual pre-training (masked-LM + masked-patch reconstruction)"),
        ("cl", "stage 2: contrastive fine-tuning (InfoNCE with hard negatives)"),
    ):
        parser = subparsers.add_parser(
            stage,
            help=what,
            description=f"{what}. Launch with torchrun for several "
            "processes (FSDP2); the YAML recipes live in configs/.",
        )
        parser.add_argument("--config", required=True, help="YAML file (configs/*.yaml)")
        parser.add_argument("--resume", action="store_true", help="continue from output_dir's last complete checkpoint")
        parser.add_argument("--overwrite", action="store_true", help="replace the run already in output_dir")
        parser.add_argument(
            "--allow-config-change",
            action="store_true",
            help="with --resume: apply config changes against the checkpoint's (each logged)",
        )
        parser.add_argument("--model", help="override the config's model")
        parser.add_argument("--data", help="override the config's data")
        parser.add_argument("--output-dir", help="override the config's output_dir")
        parser.add_argument("--max-steps", help="override the config's max_steps")
        parser.add_argument(
            "--set",
            action="append",
            metavar="KEY=VALUE",
            default=[],
            help="override any config key, typed by the config (e.g. --set lr=1e-4 --set "
            "mask_duplicates=false --set tasks=t2i,vqa); repeatable",
        )
        parser.set_defaults(run=run_train, stage=stage)


def run_train(args) -> int:
    from .config import load_train_config, parse_overrides
    from .trainers.run import run

    named = {"model": args.model, "data": args.data, "output_dir": args.output_dir, "max_steps": args.max_steps}
    assignments = [f"{key}={value}" for key, value in named.items() if value is not None] + args.set
    config = load_train_config(args.config, parse_overrides(assignments), stage=args.stage)
    from .trainers.guards import TrainingStopped

    try:
        run(config, resume=args.resume, overwrite=args.overwrite, allow_config_change=args.allow_config_change)
    except TrainingStopped as stop:
        print(f"moca-fast {args.stage}: stopped: {stop}", file=sys.stderr)
        return stop.exit_code
    return 0


# ---------------------------------------------------------------------------------------------- demo


def add_demo(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="the whole pipeline on the built-in synthetic world, in minutes",
        description="Stage 1, stage 2, then embedding and MMEB/BEIR evaluation before "
        "and after training, with a tiny Qwen2.5-VL on synthetic data.",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (default: runs/demo)")
    parser.add_argument(
        "--steps",
        type=int,
        nargs=2,
        metavar=("CPT", "CL"),
        default=(40, 600),
        help="optimizer steps of stage 1 and stage 2 (default: 40 600)",
    )
    parser.add_argument("--device", help="default: cuda when present, else cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--multi-vector",
        action="store_true",
        help="stage 2 also trains a multi-vector head and "
        "Matryoshka dimensions; the summary scores pooled, Matryoshka and multi-vector (MaxSim)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue a stopped demo in --out from its last checkpoints (same --steps and --seed)",
    )
    parser.set_defaults(run=run_demo_command)


def run_demo_command(args) -> int:
    from .demo import DemoSettings, format_summary, run_demo
    from .trainers.guards import TrainingStopped

    try:
        summary = run_demo(
            DemoSettings(
                out=args.out,
                cpt_steps=args.steps[0],
                cl_steps=args.steps[1],
                device=args.device,
                seed=args.seed,
                multi_vector=args.multi_vector,
            ),
            resume=args.resume,
        )
    except TrainingStopped as stop:
        print(f"moca-fast demo: stopped: {stop}", file=sys.stderr)
        return stop.exit_code
    print(format_summary(summary))
    return 0


# ---------------------------------------------------------------------------------------------- plot


def add_plot(subparsers) -> None:
    parser = subparsers.add_parser(
        "plot",
        help="loss and learning-rate curves of a training run (matplotlib)",
        description="Reads RUN_DIR/metrics.jsonl, or those of its subfolders (e.g. a "
        "demo's cpt/ and cl/), and draws one column per run.",
    )
    parser.add_argument("run_dir", type=Path, help="a training output_dir, or a folder of them")
    parser.add_argument("--out", type=Path, help="PNG file (default: RUN_DIR/losses.png)")
    parser.set_defaults(run=run_plot)


def run_plot(args) -> None:
    from .plots import plot_run

    print(plot_run(args.run_dir, args.out))


# ---------------------------------------------------------------------------------------------- export-stage1


def add_export_stage1(subparsers) -> None:
    parser = subparsers.add_parser(
        "export-stage1",
        help="a stage-1 step checkpoint as a model folder carrying its MAE head",
        description="Writes STEP's model/ with its MAE head under the reference's names (mae_decoder.*, mae_proj.*) "
        "into OUTPUT: `cpt --model OUTPUT` continues the head, `cl --model OUTPUT` leaves it out. Also "
        "takes the step folders of moca_fast before checkpoints had checkpoint.json (converting their "
        "MAE projection's layout). The optimizer state is not carried over.",
    )
    parser.add_argument("step", type=Path, help="a stage-1 checkpoint folder, e.g. RUN/checkpoints/step-0001000")
    parser.add_argument("output", type=Path, help="a new folder")
    parser.set_defaults(run=run_export_stage1)


def run_export_stage1(args) -> None:
    from .trainers.stage1_export import export_stage1

    print(export_stage1(args.step, args.output))


# ---------------------------------------------------------------------------------------------- serve


def add_serve(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="an HTTP embedding server (OpenAI's /v1/embeddings)",
        description="POST /v1/embeddings in OpenAI's shape (text, images as data URLs, "
        "image + text, chat messages), GET /health, /ready, /metrics. Inputs from "
        "many requests share packed forwards of --batch-tokens tokens.",
    )
    from .serve.settings import add_serve_arguments

    add_serve_arguments(parser)
    add_model_arguments(parser)
    parser.set_defaults(run=run_serve)


def run_serve(args) -> None:
    from .serve.settings import check_serve_arguments, settings_from_args

    check_serve_arguments(args)  # before the model loads: a limit that admits nothing is a one-line error
    try:
        from .serve.app import serve
    except ImportError as error:
        raise SystemExit(f"moca-fast serve: error: {error.name} is missing: pip install 'moca-fast[serve]'") from None
    embedder = embedder_from_args(args)
    serve(
        embedder, settings_from_args(args, embedder.batch_tokens, embedder.processor.max_length), args.host, args.port
    )


COMMANDS = [add_demo, add_embed, add_eval, add_train, add_plot, add_export_stage1, add_serve]

if __name__ == "__main__":
    sys.exit(main())
