"""Compile every fused-loss Triton kernel for Hopper (sm_90) on a machine without a GPU, through the project's own
launch code, and report what the compiled code uses: shared memory, registers, spills, tensor cores (wgmma).

    python tests/kernels/hopper_codegen.py '{"masked_lm_ce": ["bfloat16", "bfloat16"], ...}' [3B,7B]

The argument gives each loss's operand dtypes (what training passes the op under autocast); the optional second
the model sizes. A stand-in Triton driver
targets sm_90 and launches nothing: every `kernel[grid](...)` of the launch code becomes `kernel.warmup(...)`,
which compiles with Triton's bundled ptxas. Tensors live on the meta device, so the torch work between launches
(reductions, the backward's band GEMMs) costs nothing. Prints one JSON object: a row per compiled kernel. Run in
its own process: TRITON_INTERPRET must be unset before triton is imported.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.jit import KernelInterface

# The reference recipe's shapes: 12,800 tokens per micro-batch with 40% masked text rows, twelve
# 1,024-token images with half their tokens masked, 24 pairs per GPU x 8 GPUs with 2 hard negatives each.
SIZES = {"3B": (2048, 151936), "7B": (3584, 152064)}  # hidden size, vocabulary
MLM_ROWS, MAE_ROWS, PATCH_VALUES = 5120, 12 * 512, 4 * 1176
PAIRS_PER_RANK, RANKS, NEGATIVES = 24, 8, 2
# Late interaction at those pairs: 32-token queries against ColQwen-sized 1,024-token pages of 128-dim vectors.
QUERY_TOKENS, DOC_TOKENS, MULTI_VECTOR_DIM = 32, 1024, 128


class HopperWithoutGpu:
    """A Triton driver stand-in: the current target is sm_90; there is no device to launch on."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)


def _ptxas() -> str:
    from triton.backends.nvidia import compiler

    try:
        return compiler.get_ptxas(90).path
    except TypeError:  # older Triton: no arch argument
        return compiler.get_ptxas().path


def ptxas_usage(ptx: str) -> dict:
    """Registers and spill bytes that ptxas reports for the kernel in `ptx`."""
    arch = re.search(r"\.target\s+(sm_\w+)", ptx).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "kernel.ptx"
        source.write_text(ptx)
        done = subprocess.run(
            [_ptxas(), f"-arch={arch}", "-v", str(source), "-o", str(Path(tmp) / "kernel.cubin")],
            capture_output=True,
            text=True,
            check=True,
        )
    log = done.stdout + done.stderr
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
    return {
        "arch": arch,
        "registers": int(re.search(r"Used (\d+) registers", log).group(1)),
        "spill_bytes": sum(spills),
    }


def _compile_launches(record: list, current: dict):
    """Make `kernel[grid](...)` compile the kernel for the stand-in target and record it under the loss being run,
    launching nothing."""

    def getitem(kernel, grid):
        def launch(*args, **kwargs):
            record.append((current["loss"], kernel.fn.__name__, kernel.warmup(*args, grid=grid, **kwargs)))

        return launch

    KernelInterface.__getitem__ = getitem


def run_maxsim_launch_code(dtypes: dict[str, list[str]], current: dict) -> None:
    """MaxSim InfoNCE's forward and backward launch code: a rank's queries against the gathered positives and
    their own hard negatives (the kernels do not depend on the model size)."""
    from moca_fast.kernels import late_interaction

    current["loss"] = "maxsim_info_nce"
    q_t, d_t = dtypes["maxsim_info_nce"][:2]
    Q, N = PAIRS_PER_RANK, PAIRS_PER_RANK * RANKS + PAIRS_PER_RANK * NEGATIVES
    layout = late_interaction.Layout(
        list(range(0, (Q + 1) * QUERY_TOKENS, QUERY_TOKENS)),
        list(range(0, (N + 1) * DOC_TOKENS, DOC_TOKENS)),
        NEGATIVES,
    )
    q = torch.empty((Q * QUERY_TOKENS, MULTI_VECTOR_DIM), dtype=getattr(torch, q_t), device="meta")
    d = torch.empty((N * DOC_TOKENS, MULTI_VECTOR_DIM), dtype=getattr(torch, d_t), device="meta")
    offsets = late_interaction._device_offsets(layout, q.device)
    _, argmax = late_interaction._triton_scores(q, d, layout, *offsets)
    g = torch.empty((Q, N), dtype=torch.float32, device="meta")
    late_interaction._triton_backward(q, d, layout, g, argmax, *offsets)


def run_launch_code(dtypes: dict[str, list[str]], size: str, current: dict) -> None:
    """Call each loss's forward and backward launch code at `size` in the given operand dtypes."""
    from moca_fast.kernels import _linear_ce, info_nce, masked_lm_ce, patch_reconstruction

    H, V = SIZES[size]
    meta = dict(device="meta")

    def tensor(shape, dtype):
        return torch.empty(shape, dtype=getattr(torch, dtype), **meta)

    current["loss"] = "masked_lm_ce"
    hidden_t, weight_t = dtypes["masked_lm_ce"][:2]
    hidden, weight = tensor((MLM_ROWS, H), hidden_t), tensor((V, H), weight_t)
    labels = torch.empty(MLM_ROWS, dtype=torch.long, **meta)
    lse, _ = _linear_ce.forward(hidden, weight, labels, masked_lm_ce._NO_TERMS, "triton")
    _linear_ce.backward(hidden, weight, labels, lse, torch.ones((), **meta), masked_lm_ce._NO_TERMS, "triton")

    current["loss"] = "patch_reconstruction"
    hidden_t, weight_t, bias_t = dtypes["patch_reconstruction"][:3]
    patch_reconstruction._triton_forward(
        tensor((MAE_ROWS, H), hidden_t),
        tensor((PATCH_VALUES, H), weight_t),
        tensor((PATCH_VALUES,), bias_t),
        tensor((MAE_ROWS, PATCH_VALUES), "float32"),
        grad_factor=1.0,
    )

    current["loss"] = "info_nce"
    q_t, p_t, n_t = dtypes["info_nce"][:3]
    queries, positives = tensor((PAIRS_PER_RANK, H), q_t), tensor((PAIRS_PER_RANK * RANKS, H), p_t)
    negatives = tensor((PAIRS_PER_RANK, NEGATIVES, H), n_t)
    targets = torch.empty(PAIRS_PER_RANK, dtype=torch.long, **meta)
    duplicates = torch.empty(PAIRS_PER_RANK * RANKS, dtype=torch.long, **meta)
    for normalize in (False, True):  # training passes normalised embeddings (False); the API's default is True
        scales = info_nce._Scales.of(queries, positives, negatives, 0.03, normalize)
        terms = scales.logit_terms(negatives, duplicates)
        lse, _ = _linear_ce.forward(queries, positives, targets, terms, "triton")
        _linear_ce.backward(queries, positives, targets, lse, torch.ones((), **meta), terms, "triton")

    run_maxsim_launch_code(dtypes, current)


def main(dtypes: dict[str, list[str]], sizes: list[str]) -> list[dict]:
    driver.set_active(HopperWithoutGpu())
    record: list = []
    current: dict = {}
    _compile_launches(record, current)
    rows, seen = [], set()
    for size in sizes:
        start = len(record)
        run_launch_code(dtypes, size, current)
        for loss, name, compiled in record[start:]:
            if (size, loss, compiled.hash) in seen:  # the same kernel launched again (the backward's bands)
                continue
            seen.add((size, loss, compiled.hash))
            ptx = compiled.asm["ptx"]
            rows.append(
                {
                    "size": size,
                    "loss": loss,
                    "kernel": name,
                    "shared_bytes": compiled.metadata.shared,
                    "num_warps": compiled.metadata.num_warps,
                    "wgmma": "wgmma" in ptx,
                    **ptxas_usage(ptx),
                }
            )
    return rows


if __name__ == "__main__":
    chosen = sys.argv[2].split(",") if len(sys.argv) > 2 else list(SIZES)
    print(json.dumps({"triton": triton.__version__, "kernels": main(json.loads(sys.argv[1]), chosen)}))
