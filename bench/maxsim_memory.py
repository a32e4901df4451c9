"""Peak CPU memory of MaxSim InfoNCE beyond its inputs and their gradients: ours (the chunked torch path) against
colpali-engine's formulation (einsum over query x doc tokens, max, sum), each measured in a fresh process.

    python -m bench.fused_kernels --cpu-memory [--maxsim-shapes goal,scaled] [--time-box-s 600]

A child process builds the inputs (queries L2-normalised per token, every document `doc_tokens` long; query i's
positive is document i, every query is scored against every document), resets its peak resident set (VmHWM, via
/proc/self/clear_refs) and runs one phase: `step` (forward + backward through autograd), `forward` (the op's
forward alone) or `backward` (our backward op alone, from random scores: it needs no forward). Beyond = peak -
resident set with the inputs - the gradients' bytes (ours allocates both gradients zero-filled when its backward
starts, so they are resident from then on). A phase that outlives the time box is stopped; its row then holds the
peak seen so far and says so: our chunked loops allocate the same temporaries for every band of documents, so the
peak is reached in the first bands. The contenders' arithmetic is fp32 on the CPU; no times are reported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

TEMPERATURE = 0.02
SHAPES = {  # queries, tokens per query, documents, tokens per document, dim
    "goal": (1024, 32, 3072, 1024, 128),  # the goal: inputs + gradients ~3.3 GB in fp32
    "scaled": (64, 32, 256, 256, 128),  # both contenders run to the end on 2 cores
    "tiny": (4, 4, 8, 8, 128),  # the process's own overhead: library pages the first ops touch
}
COLPALI_LIMIT_BYTES = 4 << 30  # do not run the materialising peer past this similarity tensor


def maxsim_inputs(Q: int, Lq: int, N: int, Ld: int, D: int, device="cpu", dtype=torch.float32, seed: int = 0):
    """(q_tokens [Q·Lq, D] normalised leaf, q_cu_seqlens, d_tokens [N·Ld, D] normalised leaf, d_cu_seqlens,
    targets = arange(Q)); normalised in place, so no temporary of their size is left behind."""
    g = torch.Generator(device).manual_seed(seed)
    tokens = []
    for rows in (Q * Lq, N * Ld):
        x = torch.randn(rows, D, generator=g, device=device, dtype=dtype)
        x /= torch.linalg.vector_norm(x, dim=1, keepdim=True)
        tokens.append(x.requires_grad_())
    cu = lambda n, length: torch.arange(n + 1, dtype=torch.int32, device=device) * length
    return tokens[0], cu(Q, Lq), tokens[1], cu(N, Ld), torch.arange(Q, device=device)


def colpali_formulation_loss(q_tokens, d_tokens, Q: int, Lq: int, N: int, Ld: int, targets, temperature: float):
    """colpali-engine's ColbertLoss formulation: scores = einsum("bnd,csd->bcns") over padded [Q, Lq, D] and
    [N, Ld, D] tokens, max over document tokens, sum over query tokens; cross-entropy of scores / temperature."""
    D = q_tokens.shape[1]
    scores = torch.einsum("bnd,csd->bcns", q_tokens.view(Q, Lq, D), d_tokens.view(N, Ld, D)).amax(dim=3).sum(dim=2)
    return F.cross_entropy(scores / temperature, targets)


def similarity_bytes(Q: int, Lq: int, N: int, Ld: int, element_bytes: int = 4) -> int:
    """The [Q, N, Lq, Ld] similarity tensor that the materialising formulation holds."""
    return Q * N * Lq * Ld * element_bytes


def chunk_elements() -> int:
    """The chunked torch path's budget for one temporary (elements)."""
    from moca_fast.kernels import _common

    return _common.CHUNK_ELEMENTS


def _status_kb(pid: int | str, field: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def child(contender: str, shape: tuple[int, ...], phase: str) -> None:
    """Runs in the measuring process: prints a `ready` line (resident bytes with the inputs), then a `done` line."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from moca_fast.kernels import late_interaction as ops
    from moca_fast.kernels import maxsim_info_nce

    Q, Lq, N, Ld, D = shape
    q, q_cu, d, d_cu, targets = maxsim_inputs(Q, Lq, N, Ld, D)
    grad_bytes = 0
    if phase == "backward":
        scores = torch.randn(Q, N) * 10
        excluded = torch.zeros(Q, N, dtype=torch.bool)
        argmax = torch.empty(0, dtype=torch.int32)
        run = lambda: ops._maxsim_info_nce_backward(
            torch.ones(()),
            q.detach(),
            q_cu,
            d.detach(),
            d_cu,
            targets,
            excluded,
            scores,
            argmax,
            TEMPERATURE,
            0,
            "torch",
        )
        grad_bytes = 4 * (q.numel() + d.numel())
    elif contender == "moca_fast":
        loss = lambda: maxsim_info_nce(q, q_cu, d, d_cu, targets, temperature=TEMPERATURE, backend="torch")
    else:
        loss = lambda: colpali_formulation_loss(q, d, Q, Lq, N, Ld, targets, TEMPERATURE)
    if phase == "forward":
        run = lambda: torch.no_grad()(loss)()
    elif phase == "step":
        run = lambda: loss().backward()
        grad_bytes = 4 * (q.numel() + d.numel())
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    baseline = _status_kb("self", "VmRSS") * 1024
    print(json.dumps({"event": "ready", "baseline_bytes": baseline}), flush=True)
    start = time.perf_counter()
    run()
    print(
        json.dumps(
            {
                "event": "done",
                "peak_bytes": _status_kb("self", "VmHWM") * 1024,
                "grad_bytes": grad_bytes,
                "seconds": time.perf_counter() - start,
            }
        ),
        flush=True,
    )


def measure(contender: str, shape: tuple[int, ...], phase: str, time_box_s: float) -> dict:
    """One child process: the peak beyond inputs and gradients, or the peak so far when the time box ends it."""
    Q, Lq, N, Ld, D = shape
    row = {
        "contender": contender,
        "phase": phase,
        "queries": Q,
        "query_tokens": Lq,
        "documents": N,
        "doc_tokens": Ld,
        "dim": D,
        "inputs_bytes": 4 * D * (Q * Lq + N * Ld),
    }
    if contender == "colpali_formulation" and similarity_bytes(Q, Lq, N, Ld) > COLPALI_LIMIT_BYTES:
        row |= {"status": "not run", "similarity_tensor_bytes": similarity_bytes(Q, Lq, N, Ld)}
        return row
    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r}); "
        "from bench import maxsim_memory; "
        f"maxsim_memory.child({contender!r}, {tuple(shape)!r}, {phase!r})"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")},
    )
    ready = json.loads(process.stdout.readline())
    deadline, peak_kb = time.monotonic() + time_box_s, 0
    while process.poll() is None and time.monotonic() < deadline:
        peak_kb = max(peak_kb, _status_kb(process.pid, "VmHWM") or 0)
        time.sleep(0.2)
    if process.poll() is None:
        peak_kb = max(peak_kb, _status_kb(process.pid, "VmHWM") or 0)
        process.kill()
        process.wait()
        grad_bytes = 4 * (Q * Lq + N * Ld) * D if phase != "forward" else 0
        row |= {
            "status": f"stopped by the {time_box_s:.0f} s time box",
            "peak_bytes": peak_kb * 1024,
            "grad_bytes": grad_bytes,
        }
    else:
        done = process.stdout.readline()
        if process.returncode != 0 or not done:
            raise RuntimeError(
                f"{contender} {phase} at {shape}: the measuring process exited with {process.returncode}"
            )
        done = json.loads(done)
        row |= {"status": "ok", "peak_bytes": done["peak_bytes"], "grad_bytes": done["grad_bytes"]}
    row["beyond_inputs_and_grads_bytes"] = row["peak_bytes"] - ready["baseline_bytes"] - row["grad_bytes"]
    row["beyond_mib"] = round(row["beyond_inputs_and_grads_bytes"] / 2**20, 1)
    if contender == "colpali_formulation":
        row["similarity_tensor_bytes"] = similarity_bytes(Q, Lq, N, Ld)
    return row


def plan(shape_name: str) -> list[tuple[str, str]]:
    """(contender, phase) pairs for a shape: the goal shape's step takes hours on 2 CPU cores, so its forward and
    backward are measured apart, each time-boxed."""
    if shape_name == "goal":
        return [("moca_fast", "forward"), ("moca_fast", "backward"), ("colpali_formulation", "step")]
    if shape_name == "tiny":
        return [("moca_fast", "step")]
    return [("moca_fast", "step"), ("colpali_formulation", "step")]


def run(shape_names: list[str], time_box_s: float) -> list[dict]:
    rows = []
    for name in shape_names:
        for contender, phase in plan(name):
            row = {"shape": name, **measure(contender, SHAPES[name], phase, time_box_s)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows
