"""The headline GPU figures in one command of at most 8 minutes on an H100/H200, most important first.

Each step is time-boxed (a deadline per step; a part still running at it is stopped, the step's later parts are
skipped, and the JSON says so) and the JSON is rewritten after every part, so whatever has landed survives a
stopped run; with $OUT set (the device tool) it is copied there too. All at the Qwen2.5-VL-3B shape, random weights:

1. kernel (45 s): the masked-LM cross-entropy on a 12,800-row micro-batch, 40% masked: ours on the masked rows
   against the reference path (Liger's fused linear cross-entropy over every row) and Liger on the masked rows
   (bench/fused_kernels.py's case and measurement).
2. cpt (110 s): stage-1 training, ours without compile then the reference path, on the same 24 warm-up and 96
   timed documents (bench/train.py's bench_path: tokens/s, MFU, peak memory, loss agreement, the attention each
   path ran). Ours goes first so that a reference run past the box costs the ratio, not our figure.
3. cl (100 s): stage 2 the same, on 48 warm-up and 96 timed pairs (2 and 4 steps of 24 pairs).
4. embed (75 s): embeddings/s of ours and the reference path on 32 inputs of each workload, with their cosine
   and the attention each ran (bench/embed.py).
5. extras (the rest): stage 1 of ours with compile, then with FP8, against step 2's reference run.

Needs only torch, triton, transformers, safetensors, pillow and numpy plus the wheels the README lists
(liger-kernel, torchao); `datasets` is not needed. `--tiny` runs every step but the extras end to end on the CPU
with the tiny model for CI: nothing is timed there, and every time field reads "not measured (CPU)".

Duration on an H100/H200, estimated from counted work (no GPU has run it yet): bench/work.py's FLOP counts for
these pools, run at >= 30% of the 989 TFLOP/s bf16 peak, plus counted compiles and model builds.
  start-up  ~20 s: pip of the two wheels, the editable install, imports (before the time box starts).
  1 kernel  ~20 s: a bf16 matmul peak (~3 s); 3 contenders, each ~2 Triton compiles (~3 s), 1 untimed step and
            ~1 s of timing.
  2 cpt     ~50 s: 120 documents encoded (~2 s); per path a 3B model + AdamW (~10 s for the reference with its
            transformers copy, ~3 s ours) and check + warm-up + timed micro-batches: reference 1 + 2 + 7 (2,880
            TFLOP, ~10 s), ours 1 + 1 + 3 (2,205 TFLOP, ~7 s); ~8 Triton compiles of ours (~12 s).
  3 cl      ~45 s: 144 pairs rendered and encoded (~3 s); 2 + 4 steps of 24 pairs per path: reference 4,157 TFLOP
            (~14 s), ours 3,348 (~10 s); 2 model builds (~13 s); ~3 InfoNCE compiles (~5 s).
  4 embed   ~40 s: two bf16 3B models (~7 s); 4 workloads x 2 paths x 36 inputs, each encode call starting 8
            preprocessing workers (~1-2 s).
  5 extras  the rest: ~155 s for steps 1-4 (their time boxes sum to 330 s) leaves ~285 s (at least 110 s) of the
            440 s box: torch.compile of the decoder layer, vision block and MAE layer, forward and backward (~1-2
            minutes, more if pack lengths recompile), the same pool (~7 s); FP8 needs a second compile and may not
            fit: the JSON then says it was stopped or skipped.
So about 20 s + 440 s = 7.7 minutes however long the compiles take: give the device command a 540 s limit.

    python -m bench.gpu_quick                        # GPU: bench/results/quick-3b-<device>.json (and $OUT)
    python -m bench.gpu_quick --tiny --out quick.json   # CPU, tiny model, untimed (CI)

It is also the runner of every GPU benchmark (bench/run_gpu.sh calls it): `--full all | kernels | train | embed |
suite` runs those scripts and suites as child processes under the same time box (`--budget-s`, default 45
minutes; a part past it is stopped, later ones skipped), then regenerates the README's table.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch

if not torch.cuda.is_available():  # before anything imports triton: the kernels then run in its interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bench import embed, fused_kernels, train
from bench.report import RESULTS, device_slug, report, require_cuda
from moca_fast.trainers.metrics import device_peak_flops

BUDGETS = {"kernel": 45, "cpt": 110, "cl": 100, "embed": 75, "extras": None}  # seconds; None: whatever is left
POOLS = {"cpt": (24, 96), "cl": (48, 96)}  # (warm-up, timed) documents / pairs
TINY_POOLS = {"cpt": (2, 2), "cl": (4, 4)}
EMBED_INPUTS, EMBED_WARM = 32, 4
NOT_MEASURED = "not measured (CPU)"
TIMINGS = {
    "seconds",
    "wall_s",
    "tokens_per_s",
    "mfu",
    "speedup_vs_reference",
    "ours_per_s",
    "reference_per_s",
    "ms",
    "tflops",
    "peak_fraction",
    "x_of_ideal",
    "ideal_ms",
    "bf16_matmul_peak_tflops",
}


class TimeUp(BaseException):
    """A step's time box ran out (a BaseException, so that no `except Exception` on the way swallows it)."""


@contextlib.contextmanager
def alarm(seconds: float):
    """Raise TimeUp in the main thread once `seconds` have passed."""

    def ring(signum, frame):
        raise TimeUp

    previous = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def not_measured(value):
    """`value` with every timing replaced by NOT_MEASURED: CPU timings of GPU code are never reported."""
    if isinstance(value, dict):
        return {k: NOT_MEASURED if k in TIMINGS else not_measured(v) for k, v in value.items()}
    if isinstance(value, list):
        return [not_measured(v) for v in value]
    return value


def run_parts(parts: list, deadline: float, landed) -> dict:
    """Run (name, function) parts in order until `deadline` (time.monotonic()); each part's result is
    {"status", **what it returned}; `landed` is called after every part."""
    results = {}
    for name, part in parts:
        left = deadline - time.monotonic()
        if left <= 0:
            results[name] = {"status": "skipped: the step's time was up"}
            landed(results)
            continue
        start = time.monotonic()
        try:
            with alarm(left):
                results[name] = {"status": "ok", **part()}
        except TimeUp:
            results[name] = {"status": f"stopped: the step's time was up after {time.monotonic() - start:.0f} s"}
        except Exception as error:  # one failed part must not cost the figures of the others
            traceback.print_exc()
            results[name] = {"status": f"failed: {type(error).__name__}: {error}"[:600]}
        results[name]["wall_s"] = time.monotonic() - start  # each part frees what it put on the device
        landed(results)
    return results


class QuickRun:
    """The steps of one run and the JSON document they fill, rewritten (and copied to $OUT) as parts land."""

    def __init__(self, args, device: torch.device, folder: Path):
        self.tiny, self.device, self.folder = args.tiny, device, folder
        self.model = "tiny" if args.tiny else "random:3b"
        self.end = time.monotonic() + args.budget_s
        self.out = args.out
        self.pools: dict[str, train.StagePool] = {}
        self.runs: dict[str, dict] = {}  # stage -> path -> bench_path's result
        self.steps: dict[str, dict] = {}
        self.document = report(
            "gpu_quick: the headline figures, ours against the reference path, random-weight Qwen2.5-VL-3B"
            if not args.tiny
            else "gpu_quick --tiny: every step on the tiny model, untimed",
            device,
            shapes={
                "size": "tiny" if args.tiny else "3b",
                "pools": TINY_POOLS if args.tiny else POOLS,
                "embed_inputs_per_workload": 4 if args.tiny else EMBED_INPUTS,
                "budget_s": args.budget_s,
                "step_budgets_s": BUDGETS,
            },
            measured=not args.tiny,
            results=self.steps,
        )

    def save(self) -> None:
        document = not_measured(self.document) if self.tiny else self.document
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(document, indent=2) + "\n")
        if os.environ.get("OUT"):
            shutil.copy(self.out, Path(os.environ["OUT"]) / self.out.name)

    def run(self, name: str, parts: list, summarize=None) -> None:
        budget = BUDGETS[name]
        deadline = self.end if budget is None else min(time.monotonic() + budget, self.end)
        step = self.steps[name] = {"budget_s": budget, "parts": {}}

        def landed(results):  # the summary too, so that a ratio is written as soon as both of its sides are
            step["parts"] = results
            if summarize is not None:
                step["summary"] = summarize(results)
            self.save()

        results = run_parts(parts, deadline, landed)
        for part, result in results.items():
            shown = {
                k: v
                for k, v in (not_measured(result) if self.tiny else result).items()
                if k in SHOWN and v not in (None, NOT_MEASURED)
            }
            print(
                f"{name} {part}: "
                + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items()),
                flush=True,
            )

    # ------------------------------------------------------------------------------------------------- steps

    def kernel(self) -> None:
        if self.tiny:
            case = fused_kernels.masked_lm_cases({"tiny": (64, 1024)}, 64, device="cpu", dtype=torch.float32)[0]
        else:
            case = fused_kernels.masked_lm_cases({"3B": fused_kernels.MODELS["3B"]})[0]
        peak = {}

        def matmul_peak():
            peak["tflops"] = fused_kernels.bf16_matmul_peak_tflops()
            return {"bf16_matmul_peak_tflops": peak["tflops"]}

        def contender(c):
            if self.tiny:  # one forward + backward: it runs, nothing is timed
                c.build()()
                return {"kernel": case.kernel, **case.shape, "contender": c.name, "role": c.role, "flops": c.flops}
            peak_tflops = peak.get("tflops") or (device_peak_flops(self.device) or 989e12) / 1e12  # if unmeasured
            return fused_kernels.measure(case, c, peak_tflops, SimpleNamespace(warmup=3, budget_s=1.0))

        def summarize(results):  # the contenders that were measured, as fused_kernels.py compares them
            return fused_kernels.summarize(
                [{k: v for k, v in r.items() if k != "wall_s"} for r in results.values() if "role" in r]
            )

        parts = [] if self.tiny else [("bf16_matmul_peak", matmul_peak)]
        parts += [(c.name, functools.partial(contender, c)) for c in case.contenders]
        self.run("kernel", parts, None if self.tiny else summarize)

    def stage(self, stage: str, paths: tuple[str, ...], step: str) -> None:
        warm, pool = (TINY_POOLS if self.tiny else POOLS)[stage]

        def samples():
            if stage not in self.pools:
                self.pools[stage] = train.stage_pool(stage, self.model, warm, pool, self.folder)
            p = self.pools[stage]
            return {"tokens": p.tokens, "useful_flops": p.useful_flops, "warm": warm, "pool": pool}

        def path(name):
            run = self.runs.setdefault(stage, {})[name] = train.bench_path(name, self.pools[stage], self.device)
            return run

        def summarize(results):
            ran = {k: v for k, v in self.runs.get(stage, {}).items() if k == "reference" or k in results}
            if stage not in self.pools or not ran:
                return None
            return {k: v for k, v in train.summarize(self.pools[stage], ran).items() if k != "paths"}

        self.run(step, [("samples", samples)] + [(name, functools.partial(path, name)) for name in paths], summarize)

    def embed(self) -> None:
        models = {}

        def build():
            pixels = (
                dict(min_pixels=4 * 28 * 28, max_pixels=64 * 28 * 28)
                if self.tiny
                else dict(min_pixels=embed.MIN_PIXELS, max_pixels=embed.MAX_PIXELS)
            )
            models["pair"] = embed.embedders(
                self.model,
                self.device,
                torch.float32 if self.tiny else torch.bfloat16,
                workers=0 if self.tiny else 8,
                reference_batch=4 if self.tiny else 16,
                **pixels,
            )
            sizes = dict(image_side=112, page_size=(120, 170)) if self.tiny else {}
            models["loads"] = embed.workloads(4 if self.tiny else EMBED_INPUTS, seed=0, **sizes)
            ours, reference = models["pair"]
            return {
                "our_attention": embed.our_attention(ours),
                "reference_attention": reference.path.attention,
                "our_batch_tokens": ours.batch_tokens,
            }

        def workload(name):
            ours, reference = models["pair"]
            return embed.bench_embedding(
                ours, reference, {name: models["loads"][name]}, 1 if self.tiny else EMBED_WARM, self.device
            )[name]

        self.run(
            "embed",
            [("models", build)]
            + [(w, functools.partial(workload, w)) for w in ("realistic", "text", "image", "page", "interleaved")],
        )
        models.clear()


def run_steps(run: QuickRun) -> None:
    """The steps, most important first."""
    run.save()
    run.kernel()
    # Ours first: a reference run that overruns the step's box (an alarm cannot stop a C++ call) then costs only
    # the ratio, never our figure, and the ratio lands with the reference's run.
    run.stage("cpt", ("ours-eager", "reference"), "cpt")
    run.stage("cl", ("ours-eager", "reference"), "cl")
    run.embed()
    if run.tiny:
        run.steps["extras"] = {
            "status": "skipped: --tiny runs no compile (CPU inductor takes minutes) and no FP8 (CUDA only)"
        }
        run.save()
    else:
        run.stage("cpt", ("ours", "ours-fp8"), "extras")


def full_parts(which: str, slug: str) -> list:
    """bench/run_gpu.sh's parts as (name, function) pairs for run_parts: each runs one command (a child process,
    killed if the time box ends it) and raises if it fails."""
    python = [sys.executable]
    pytest = [*python, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    commands = {
        "kernels": [
            ("kernel tests", [*pytest, "tests/kernels"]),
            ("fused kernels", [*python, "-m", "bench.fused_kernels"]),
        ],
        "train": [("training", [*python, "-m", "bench.train", "--size", "3b"])],
        "embed": [("embedding", [*python, "-m", "bench.embed", "--size", "3b"])],
        "suite": [
            (
                "pytest-benchmark suite",
                [
                    *pytest,
                    "bench",
                    "--benchmark-enable",
                    "--benchmark-only",
                    "--benchmark-json",
                    f"bench/results/pytest-benchmark-{slug}.json",
                ],
            )
        ],
    }
    chosen = [c for name in (commands if which == "all" else [which]) for c in commands[name]]
    return [(name, functools.partial(run_command, argv)) for name, argv in chosen]


def run_command(argv: list[str]) -> dict:
    subprocess.run(argv, check=True)  # TimeUp inside it kills the child before it propagates
    return {"command": " ".join(argv[1:])}


def run_full(which: str, budget_s: float) -> int:
    """Every GPU benchmark of `which` under one time box, then the README's table; 1 if a part did not finish."""
    slug = device_slug(torch.cuda.get_device_name()) if torch.cuda.is_available() else "cpu"
    results = run_parts(full_parts(which, slug), time.monotonic() + budget_s, lambda results: None)
    for name, result in results.items():
        print(f"{name}: {result['status']} ({result['wall_s']:.0f} s)", flush=True)
    subprocess.run([sys.executable, "-m", "bench.table"], check=True)
    return 0 if all(r["status"] == "ok" for r in results.values()) else 1


SHOWN = {
    "status",
    "ms",
    "tokens_per_s",
    "mfu",
    "ours_per_s",
    "reference_per_s",
    "speedup_vs_reference",
    "cosine_min",
    "check_loss",
    "max_memory_gb",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny model on the CPU, untimed (CI)")
    parser.add_argument("--budget-s", type=float, help="the whole run's time box (default 440 s; --full: 2,700 s)")
    parser.add_argument(
        "--full",
        choices=["all", "kernels", "train", "embed", "suite"],
        help="every GPU benchmark of this part instead of the headline figures (bench/run_gpu.sh)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="JSON path (default bench/results/quick-3b-<device>.json; "
        "with --tiny, quick-tiny.json in the temporary folder)",
    )
    args = parser.parse_args(argv)
    if args.full:
        return run_full(args.full, args.budget_s or 2700.0)
    args.budget_s = args.budget_s or 440.0
    if args.tiny:
        device = torch.device("cpu")
        args.out = args.out or Path(tempfile.gettempdir()) / "quick-tiny.json"
    else:
        device = require_cuda("the headline figures")
        args.out = args.out or RESULTS / f"quick-3b-{device_slug(torch.cuda.get_device_name())}.json"
    with tempfile.TemporaryDirectory() as folder:
        run = QuickRun(args, device, Path(folder))
        run_steps(run)
    print(
        json.dumps({name: step.get("summary") for name, step in run.steps.items()}, default=str)[:2000]
        if not args.tiny
        else f"--tiny: every step ran; nothing timed; {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
