"""Every fused-loss Triton kernel compiles for Hopper (sm_90) through the project's launch code, at the 3B and 7B
shapes (MaxSim InfoNCE at a rank's ColQwen-sized batch), in the operand dtypes that training passes under bf16
autocast, and the compiled code is what the
kernels are for: tensor cores (wgmma) in every matmul-shaped kernel, shared memory within the 227 KiB a block may
use, no register spills; and the forward's column splits fill the waves of resident blocks that its registers
allow. No GPU is needed: Triton's bundled ptxas compiles for sm_90 (tests/kernels/hopper_codegen.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moca_fast.kernels import _common

from .test_autocast import training_losses_under_autocast
from .test_common import H100_SXM, _busy

SCRIPT = Path(__file__).with_name("hopper_codegen.py")
# tile GEMMs: tensor cores or nothing
MATMUL_KERNELS = {"_lse_kernel", "_dlogits_kernel", "_mse_kernel", "_maxsim_forward_kernel", "_doc_grad_kernel"}
SHARED_LIMIT = 227 * 1024


def compile_for_hopper(dtypes: dict[str, list[str]], sizes: str = "3B,7B") -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # real code generation, no interpreter
    done = subprocess.run(
        [sys.executable, str(SCRIPT), json.dumps(dtypes), sizes], capture_output=True, text=True, env=env, timeout=900
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout)


def problems(report: dict) -> list[str]:
    """What in the compiled kernels falls short of the hot path's needs, one line each."""
    found = []
    for row in report["kernels"]:
        where = f"{row['size']} {row['loss']} {row['kernel']}"
        if row["shared_bytes"] > SHARED_LIMIT:
            found.append(f"{where}: {row['shared_bytes']} bytes of shared memory")
        if row["spill_bytes"]:
            found.append(f"{where}: {row['spill_bytes']} bytes of register spills")
        if row["kernel"] in MATMUL_KERNELS and not row["wgmma"]:
            found.append(f"{where}: no wgmma (tensor cores) in the PTX")
    return found


def training_dtypes(processor, make_image) -> dict[str, list[str]]:
    calls = training_losses_under_autocast(processor, make_image)
    dtypes = {name: [str(d).removeprefix("torch.") for d in call[0] if d is not None] for name, call in calls.items()}
    # The late-interaction loss takes the multi-vector head's token vectors, cast by autocast at its entry like the
    # others' operands (test_maxsim_info_nce checks that the op receives bf16 under bf16 autocast).
    return dtypes | {"maxsim_info_nce": ["bfloat16", "bfloat16"]}


@pytest.mark.slow
def test_training_kernels_compile_for_hopper_on_tensor_cores(processor, make_image):
    dtypes = training_dtypes(processor, make_image)
    report = compile_for_hopper(dtypes)
    kernels = {(row["loss"], row["kernel"]) for row in report["kernels"]}
    assert kernels == {
        ("masked_lm_ce", "_lse_kernel"),
        ("masked_lm_ce", "_dlogits_kernel"),
        ("patch_reconstruction", "_mse_kernel"),
        ("info_nce", "_lse_kernel"),
        ("info_nce", "_dlogits_kernel"),
        ("info_nce", "_negatives_backward_kernel"),
        ("maxsim_info_nce", "_maxsim_forward_kernel"),
        ("maxsim_info_nce", "_segment_sum_kernel"),
        ("maxsim_info_nce", "_query_grad_kernel"),
        ("maxsim_info_nce", "_doc_grad_kernel"),
    }, kernels
    assert {row["size"] for row in report["kernels"]} == {"3B", "7B"}
    assert problems(report) == [], (report["triton"], problems(report))
    # The masked-LM forward at 3B: the compiled registers decide how many blocks an SM holds; its column splits
    # then end their waves together.
    lse = next(
        r
        for r in report["kernels"]
        if r["size"] == "3B" and r["kernel"] == "_lse_kernel" and r["loss"] == "masked_lm_ce"
    )
    slots = H100_SXM.count * _common.resident_blocks(lse["registers"], lse["shared_bytes"], lse["num_warps"], H100_SXM)
    row_tiles, col_tiles = -(-5120 // 128), -(-151936 // 128)
    assert _busy(row_tiles, col_tiles, slots, _common.balanced_splits(row_tiles, col_tiles, slots)) > 0.99


@pytest.mark.slow
def test_fp32_operands_fail_the_check():
    """The guard guards: were the losses given fp32 operands (no autocast cast), the matmul kernels compile to
    FMA loops and the check above reports every one of them."""
    fp32 = {
        "masked_lm_ce": ["float32"] * 2,
        "patch_reconstruction": ["float32"] * 3,
        "info_nce": ["float32"] * 3,
        "maxsim_info_nce": ["float32"] * 2,
    }
    found = problems(compile_for_hopper(fp32, sizes="3B"))
    assert {line.split(":")[0] for line in found if "no wgmma" in line} == {
        "3B masked_lm_ce _lse_kernel",
        "3B masked_lm_ce _dlogits_kernel",
        "3B patch_reconstruction _mse_kernel",
        "3B info_nce _lse_kernel",
        "3B info_nce _dlogits_kernel",
        "3B maxsim_info_nce _maxsim_forward_kernel",
        "3B maxsim_info_nce _doc_grad_kernel",
    }, found
