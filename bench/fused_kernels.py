"""Kernel benchmarks: moca_fast's fused losses against the reference path and peers at MoCa's shapes (CUDA only).

    python -m bench.fused_kernels [--out bench/results/kernels-<device>.json] [--only masked_lm_ce,info_nce] [--dry-run]
    python -m bench.fused_kernels --cpu-memory [--maxsim-shapes tiny,scaled,goal] [--time-box-s 300]

For every case each contender runs forward + backward from the same starting tensors; we report the median
time over CUDA events after warm-up, the peak memory the step allocates on top of its inputs, the FLOP/s of
the dense work it executes and the fraction of this device's bf16 matmul peak (measured here with a large
torch.matmul). `useful_flops` is the work the loss needs (6·rows·cols·H for forward + backward on the rows
that carry a loss); `ideal_ms` is that work at the measured peak. Contenders:

- masked_lm_ce: ours on the 40% masked rows; the reference path (Liger's fused linear cross-entropy over all
  12800 rows with ignored labels, as the reference does); Liger and cut-cross-entropy (when importable; with its
  default gradient filtering and exact) on the masked rows only.
- patch_reconstruction: ours; torch Linear + MSE (the reference path).
- info_nce: ours; torch matmul + cross-entropy on the gathered similarity matrix (the reference path); a plain
  chunked torch InfoNCE (our torch backend, fp32 chunks).
- maxsim_info_nce: ours (Triton); colpali-engine's formulation (einsum over query x doc tokens, max, sum, then
  cross-entropy; bench/maxsim_memory.py) at equal shapes, every query against every document.
Without CUDA the script stops (no CPU numbers); --dry-run prints the plan and FLOP counts anywhere.
--cpu-memory measures instead the peak CPU memory of MaxSim InfoNCE beyond its inputs and gradients, ours (the
chunked torch path) against colpali-engine's formulation (bench/maxsim_memory.py), and writes
bench/results/maxsim-memory-cpu.json; no times.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import importlib.util
import json
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from bench import maxsim_memory
from bench.report import device_slug, report, versions, write_report
from moca_fast.kernels import (
    info_nce_loss,
    info_nce_reference,
    masked_lm_cross_entropy,
    maxsim_info_nce,
    patch_reconstruction_loss,
)

DTYPE = torch.bfloat16
TOKENS_PER_MICRO_BATCH = 12800
MLM_FRACTION = 0.4
MODELS = {"3B": (2048, 151936), "7B": (3584, 152064)}  # hidden size, vocabulary
PATCH_VALUES = 4 * 1176  # the MAE head's output: 4 patches of 3*2*14*14 values per merged image token
# Logit-sized matmuls per forward + backward of a fused linear cross-entropy: ours and cut-cross-entropy form the
# log-sum-exp, recompute the logits in backward and take two gradient GEMMs; Liger forms the logits and both
# gradients once, in its forward.
LM_HEAD_GEMMS = {"moca_fast": 4, "liger": 3, "cut_cross_entropy": 4}

Step = Callable[[], None]


@dataclass
class Contender:
    name: str
    role: str  # "ours" | "reference" | "peer"
    flops: float  # dense FLOPs it executes per forward + backward (recomputation included)
    build: Callable[[], Step]  # allocates its inputs on the GPU, returns one forward + backward


@dataclass
class Case:
    kernel: str
    shape: dict
    useful_flops: float
    contenders: list[Contender]


def linear_ce_flops(rows: int, hidden: int, vocab: int, kernel: str) -> float:
    """Dense FLOPs `kernel` executes for the LM head + cross-entropy over `rows`, forward + backward."""
    return LM_HEAD_GEMMS[kernel] * 2.0 * rows * hidden * vocab


def patch_reconstruction_flops(rows: int, hidden: int) -> float:
    """Forward + backward of Linear(hidden -> 4 * 1176) + MSE over `rows`: three GEMMs (ours and torch alike)."""
    return 6.0 * rows * PATCH_VALUES * hidden


# ------------------------------------------------------------------------------------------------------ cases


def _leaf(*shape, scale=1.0, device="cuda", dtype=DTYPE):
    return (torch.randn(*shape, device=device, dtype=dtype) * scale).requires_grad_()


def _step(loss_fn: Callable[[], torch.Tensor], leaves: list[torch.Tensor]) -> Step:
    def step():
        loss_fn().backward()
        for leaf in leaves:  # freed after each step, so memory is measured from the inputs alone
            leaf.grad = None

    return step


def masked_lm_cases(
    models: dict = MODELS, tokens: int = TOKENS_PER_MICRO_BATCH, device: str = "cuda", dtype: torch.dtype = DTYPE
) -> list[Case]:
    cases = []
    for model, (H, V) in models.items():
        T = tokens
        M = round(MLM_FRACTION * T)

        def inputs(H=H, V=V, T=T, M=M):
            on = dict(device=device, dtype=dtype)
            hidden, weight = _leaf(T, H, **on), _leaf(V, H, scale=H**-0.5, **on)
            rows = torch.randperm(T, device=device)[:M].sort().values
            labels = torch.full((T,), -100, device=device)
            labels[rows] = torch.randint(0, V, (M,), device=device)
            return hidden, weight, rows, labels

        def ours(inputs=inputs):
            hidden, weight, rows, labels = inputs()
            return _step(lambda: masked_lm_cross_entropy(hidden[rows], weight, labels[rows]), [hidden, weight])

        def liger(all_rows: bool, inputs=inputs):
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            hidden, weight, rows, labels = inputs()
            loss = LigerFusedLinearCrossEntropyLoss()
            if all_rows:
                return _step(lambda: loss(weight, hidden, labels), [hidden, weight])
            return _step(lambda: loss(weight, hidden[rows], labels[rows]), [hidden, weight])

        def cut_cross_entropy(exact: bool, inputs=inputs):
            from cut_cross_entropy import linear_cross_entropy

            hidden, weight, rows, labels = inputs()
            options = {"filter_eps": None} if exact else {}
            return _step(lambda: linear_cross_entropy(hidden[rows], weight, labels[rows], **options), [hidden, weight])

        contenders = [
            Contender("moca_fast", "ours", linear_ce_flops(M, H, V, "moca_fast"), ours),
            Contender("liger_all_rows", "reference", linear_ce_flops(T, H, V, "liger"), lambda f=liger: f(True)),
            Contender("liger_masked_rows", "peer", linear_ce_flops(M, H, V, "liger"), lambda f=liger: f(False)),
        ]
        if importlib.util.find_spec("cut_cross_entropy") is not None:
            cce = linear_ce_flops(M, H, V, "cut_cross_entropy")
            contenders += [
                Contender("cut_cross_entropy_filtered", "peer", cce, lambda f=cut_cross_entropy: f(False)),
                Contender("cut_cross_entropy_exact", "peer", cce, lambda f=cut_cross_entropy: f(True)),
            ]
        shape = {"model": model, "tokens": T, "masked_rows": M, "hidden": H, "vocab": V}
        cases.append(Case("masked_lm_ce", shape, 6.0 * M * H * V, contenders))  # 3 GEMMs on the masked rows
    return cases


def patch_reconstruction_cases() -> list[Case]:
    cases = []
    N = PATCH_VALUES
    # One 1024-token image with half its tokens masked, and a micro-batch of twelve such images.
    for model, (H, _) in MODELS.items():
        for K in (512, 12 * 512):

            def inputs(H=H, K=K):
                return _leaf(K, H), _leaf(N, H, scale=H**-0.5), _leaf(N), torch.randn(K, N, device="cuda", dtype=DTYPE)

            def ours(inputs=inputs):
                hidden, weight, bias, targets = inputs()
                return _step(lambda: patch_reconstruction_loss(hidden, weight, bias, targets), [hidden, weight, bias])

            def torch_linear_mse(inputs=inputs):
                hidden, weight, bias, targets = inputs()
                predict = lambda: torch.nn.functional.linear(hidden, weight, bias)
                return _step(lambda: torch.nn.functional.mse_loss(predict(), targets), [hidden, weight, bias])

            flops = patch_reconstruction_flops(K, H)
            contenders = [
                Contender("moca_fast", "ours", flops, ours),
                Contender("torch_linear_mse", "reference", flops, torch_linear_mse),
            ]
            shape = {"model": model, "rows": K, "outputs": N, "hidden": H}
            cases.append(Case("patch_reconstruction", shape, flops, contenders))
    return cases


def info_nce_cases() -> list[Case]:
    cases = []
    D, r = MODELS["3B"][0], 2
    # The reference's global batch (8 GPUs x 24) up to far beyond what one similarity matrix fits in memory.
    for B in (192, 8192, 65536, 131072):
        G = B

        def inputs(B=B, G=G):
            targets = torch.arange(B, device="cuda")
            return _leaf(B, D), _leaf(G, D), _leaf(B, r, D), targets

        def ours(backend: str, inputs=inputs):
            queries, positives, negatives, targets = inputs()
            loss = lambda: info_nce_loss(queries, positives, negatives, targets, backend=backend)
            return _step(loss, [queries, positives, negatives])

        def torch_matmul_ce(inputs=inputs):
            queries, positives, negatives, targets = inputs()
            loss = lambda: info_nce_reference(queries, positives, negatives, targets)
            return _step(loss, [queries, positives, negatives])

        useful = 6.0 * B * (G + r) * D
        recomputing = 8.0 * B * G * D + 6.0 * B * r * D
        contenders = [
            Contender("moca_fast", "ours", recomputing, lambda f=ours: f("auto")),
            Contender("torch_matmul_ce", "reference", useful, torch_matmul_ce),
            Contender("torch_chunked", "peer", recomputing, lambda f=ours: f("torch")),
        ]
        shape = {"queries": B, "positives": G, "negatives_per_query": r, "dim": D, "temperature": 0.03}
        cases.append(Case("info_nce", shape, useful, contenders))
    return cases


def maxsim_info_nce_cases() -> list[Case]:
    cases = []
    # A ColQwen-style batch (32 query tokens, 1,024 page-image tokens of 128 dims) up to the goal shape,
    # where colpali-engine's formulation would hold a ~200 GB bf16 similarity tensor.
    for Q, N in ((64, 192), (256, 768), (1024, 3072)):
        Lq, Ld, D = 32, 1024, 128

        def inputs(Q=Q, N=N, Lq=Lq, Ld=Ld, D=D):
            return maxsim_memory.maxsim_inputs(Q, Lq, N, Ld, D, device="cuda", dtype=DTYPE)

        def ours(inputs=inputs):
            q, q_cu, d, d_cu, targets = inputs()
            loss = lambda: maxsim_info_nce(q, q_cu, d, d_cu, targets, temperature=maxsim_memory.TEMPERATURE)
            return _step(loss, [q, d])

        def colpali_formulation(inputs=inputs, Q=Q, N=N, Lq=Lq, Ld=Ld):
            q, _, d, _, targets = inputs()
            loss = lambda: maxsim_memory.colpali_formulation_loss(
                q,
                d,
                Q,
                Lq,
                N,
                Ld,
                targets,
                maxsim_memory.TEMPERATURE,
            )
            return _step(loss, [q, d])

        dots = 2.0 * Q * Lq * N * Ld * D  # every query token against every document token
        contenders = [
            # forward dots, then the backward's Pᵀ @ q dots for the documents (the queries' part is gathers)
            Contender("moca_fast", "ours", 2 * dots, ours),
            Contender("colpali_formulation", "peer", 3 * dots, colpali_formulation),  # einsum + its two gradients
        ]
        shape = {"queries": Q, "query_tokens": Lq, "documents": N, "doc_tokens": Ld, "dim": D}
        cases.append(Case("maxsim_info_nce", shape, 3 * dots, contenders))
    return cases


CASES = {
    "masked_lm_ce": masked_lm_cases,
    "patch_reconstruction": patch_reconstruction_cases,
    "info_nce": info_nce_cases,
    "maxsim_info_nce": maxsim_info_nce_cases,
}


# -------------------------------------------------------------------------------------------------- measuring


def _release():
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def time_ms(step: Step, warmup: int, budget_s: float) -> float:
    """Median of at least 3 timed steps, more (up to 50) while the budget lasts."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times: list[float] = []
    while len(times) < 3 or (sum(times) < budget_s * 1e3 and len(times) < 50):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def bf16_matmul_peak_tflops(n: int = 8192) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = time_ms(functools.partial(torch.matmul, a, b), warmup=5, budget_s=2.0)
    del a, b
    _release()
    return 2.0 * n**3 / (ms * 1e-3) / 1e12


def measure(case: Case, contender: Contender, peak_tflops: float, args) -> dict:
    row = {"kernel": case.kernel, **case.shape, "contender": contender.name, "role": contender.role}
    row |= {"flops": contender.flops, "useful_flops": case.useful_flops}
    row["ideal_ms"] = case.useful_flops / peak_tflops / 1e9
    step = None
    try:
        step = contender.build()
        step()  # compile / autotune outside the measurement
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        row["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
        row["step_extra_gb"] = (torch.cuda.max_memory_allocated() - base) / 1e9
        ms = time_ms(step, args.warmup, args.budget_s)
        tflops = contender.flops / (ms * 1e-3) / 1e12
        row |= {"status": "ok", "ms": ms, "tflops": tflops, "peak_fraction": tflops / peak_tflops}
    except torch.cuda.OutOfMemoryError:
        row["status"] = "out of memory"
    finally:
        del step
        _release()
    return row


def summarize(rows: list[dict]) -> list[dict]:
    """Per case: our time and peak memory relative to every other contender that ran."""
    summary = []
    for ours in rows:
        if ours["role"] != "ours" or ours["status"] != "ok":
            continue
        case_rows = [r for r in rows if r["kernel"] == ours["kernel"] and r is not ours and _same_shape(r, ours)]
        entry = {key: ours[key] for key in ours if key not in _MEASURED and key not in ("contender", "role", "status")}
        entry["ms"], entry["x_of_ideal"] = ours["ms"], ours["ms"] / ours["ideal_ms"]
        for other in case_rows:
            if other["status"] == "ok":
                entry[f"speedup_vs_{other['contender']}"] = other["ms"] / ours["ms"]
                entry[f"memory_vs_{other['contender']}"] = ours["peak_gb"] / other["peak_gb"]
            else:
                entry[f"speedup_vs_{other['contender']}"] = other["status"]
        summary.append(entry)
    return summary


_MEASURED = {"flops", "useful_flops", "ideal_ms", "peak_gb", "step_extra_gb", "ms", "tflops", "peak_fraction"}


def _same_shape(a: dict, b: dict) -> bool:
    keys = (set(a) | set(b)) - _MEASURED - {"contender", "role", "status"}
    return all(a.get(k) == b.get(k) for k in keys)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="JSON path (default bench/results/kernels-<device>.json)")
    parser.add_argument("--only", default=",".join(CASES), help=f"comma-separated subset of {', '.join(CASES)}")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=2.0, help="time one contender for about this long")
    parser.add_argument("--dry-run", action="store_true", help="print the cases and their FLOPs, run nothing")
    parser.add_argument(
        "--cpu-memory",
        action="store_true",
        help="measure MaxSim InfoNCE's peak CPU memory beyond inputs and gradients instead (no times)",
    )
    parser.add_argument(
        "--maxsim-shapes",
        default="tiny,scaled,goal",
        help=f"with --cpu-memory: comma-separated subset of {', '.join(maxsim_memory.SHAPES)}",
    )
    parser.add_argument(
        "--time-box-s",
        type=float,
        default=300.0,
        help="with --cpu-memory: stop a measuring process after this long (its peak so far is kept)",
    )
    args = parser.parse_args(argv)
    if args.cpu_memory:
        names = [n for n in args.maxsim_shapes.split(",") if n]
        if unknown := set(names) - set(maxsim_memory.SHAPES):
            parser.error(f"unknown MaxSim shapes {sorted(unknown)}; choose from {list(maxsim_memory.SHAPES)}")
        rows = maxsim_memory.run(names, args.time_box_s)
        shapes = {
            name: dict(zip(("queries", "query_tokens", "documents", "doc_tokens", "dim"), maxsim_memory.SHAPES[name]))
            for name in names
        }
        write_report(
            args.out or Path(__file__).parent / "results" / "maxsim-memory-cpu.json",
            report(
                "maxsim_info_nce_cpu_memory",
                "cpu",
                shapes=shapes,
                results=rows,
                dtype="float32",
                chunk_elements=maxsim_memory.chunk_elements(),
            ),
        )
        return 0
    kernels = [k for k in args.only.split(",") if k]
    if unknown := set(kernels) - set(CASES):
        parser.error(f"unknown kernels {sorted(unknown)}; choose from {list(CASES)}")
    cases = [case for kernel in kernels for case in CASES[kernel]()]

    if args.dry_run:
        for case in cases:
            print(f"{case.kernel} {case.shape} useful {case.useful_flops / 1e12:.4g} TFLOP")
            for c in case.contenders:
                print(f"    {c.role:9s} {c.name:28s} executes {c.flops / 1e12:10.4g} TFLOP")
        return 0
    if not torch.cuda.is_available():
        print("bench/fused_kernels.py times CUDA kernels and needs a CUDA device; none is visible.", file=sys.stderr)
        return 2

    device = torch.cuda.get_device_name()
    out = args.out or Path(__file__).parent / "results" / f"kernels-{device_slug(device)}.json"
    peak = bf16_matmul_peak_tflops()
    print(f"{device}: bf16 matmul peak {peak:.0f} TFLOP/s", flush=True)
    rows = []
    for case in cases:
        for contender in case.contenders:
            row = measure(case, contender, peak, args)
            rows.append(row)
            timing = row["status"]
            if timing == "ok":
                timing = f"{row['ms']:9.3f} ms {row['tflops']:6.0f} TFLOP/s {row['peak_gb']:7.2f} GB"
            print(f"{case.kernel:22s} {str(case.shape):90s} {contender.name:28s} {timing}", flush=True)
    result = {
        "device": device,
        "versions": versions(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "dtype": str(DTYPE).removeprefix("torch."),
        "bf16_matmul_peak_tflops": peak,
        "summary": summarize(rows),
        "results": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
