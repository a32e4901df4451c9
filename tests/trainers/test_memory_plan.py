"""Memory-planned recompute: the fake-tensor estimate of a step's peak against the resident-memory peak of the real
step (measured in a subprocess by the kernel, independent of the estimator), plans that fit their budget and change
with it, and selective recompute that changes no number."""

import collections
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moca_fast.parallel import memory_plan as mp

sys.path.insert(0, str(Path(__file__).parent))
from memory_shapes import tiny_model, tiny_pack, tiny_spec

CPU = dict(world_size=1, dtype=torch.float32, backend="sdpa", device_type="cpu")


def measured_peak(documents: int, mode: str) -> int:
    """Resident bytes the real step adds at its peak (tests/trainers/memory_worker.py)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("memory_worker.py")), str(documents), mode],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("documents, mode", [(8, "none"), (16, "selective"), (12, "full")])
def test_estimate_within_15_percent_of_the_measured_peak(documents, mode):
    estimate = mp.activation_peak(
        mp.stage1_step, tiny_pack(documents), tiny_spec(), dict.fromkeys(mp.KINDS, mode), mp.Target(1e12, **CPU)
    )
    measured = measured_peak(documents, mode)
    assert abs(estimate / measured - 1) <= 0.15, f"estimated {estimate} bytes, measured {measured}"


@pytest.mark.slow
def test_the_plan_fits_its_budget_and_changes_with_it():
    spec = tiny_spec()
    packs = {s: tiny_pack(16 // s) for s in (1, 2)}
    model, mae = tiny_model()
    blocks = [b for bs in mp.block_kinds(model, mae).values() for b in bs]

    def plan(memory: float) -> mp.MemoryPlan:
        target = mp.Target(memory, **CPU)
        return mp.plan_stage1(
            spec, mp.static_bytes(model, mae, blocks, target), packs.__getitem__, target, max_splits=2
        )

    roomy = plan(10e9)
    assert roomy.fits and roomy.splits == 1 and set(roomy.modes.values()) == {"none"}
    # a budget between the all-full and the all-none peaks of the whole pack: something must be recomputed or split
    target = mp.Target(1e12, **CPU)
    static = mp.static_bytes(model, mae, blocks, target)
    none = static + mp.activation_peak(mp.stage1_step, packs[1], spec, dict.fromkeys(mp.KINDS, "none"), target)
    full = static + mp.activation_peak(mp.stage1_step, packs[1], spec, dict.fromkeys(mp.KINDS, "full"), target)
    tight = plan((full + 0.5 * (none - full)) / (1 - mp.HEADROOM))
    assert tight.fits and tight.peak <= tight.budget < none
    assert tight.splits > 1 or set(tight.modes.values()) != {"none"}
    hopeless = plan(static)  # not even the parameters fit: the smallest peak, marked as not fitting
    assert not hopeless.fits and hopeless.splits == 2 and set(hopeless.modes.values()) == {"full"}
    assert "DOES NOT FIT" in hopeless.describe()


class OpCounts(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["selective", "full"])
def test_recompute_changes_no_loss_and_no_gradient(mode):
    batch = tiny_pack(4)
    results = {}
    for run in ("none", mode):
        model, mae = tiny_model()
        for blocks in mp.block_kinds(model, mae).values():
            for block in blocks:
                mp.apply_recompute(block, run)
        with OpCounts() as ops:
            hidden = model(batch)
            loss = mae(hidden, batch, "sdpa") + hidden.square().mean()
            loss.backward()
        grads = {name: p.grad for name, p in [*model.named_parameters(), *mae.named_parameters()]}
        results[run] = (loss.detach(), grads, ops.counts)
    (loss, grads, ops), (loss_r, grads_r, ops_r) = results["none"], results[mode]
    assert torch.equal(loss, loss_r)
    for name in grads:
        assert torch.equal(grads[name], grads_r[name]), name
    # what each mode recomputes: selective the element-wise work only (SwiGLU's silu), full the matmuls too
    assert ops_r["aten.silu"] > ops["aten.silu"]
    assert (ops_r["aten.mm"] + ops_r["aten.addmm"] > ops["aten.mm"] + ops["aten.addmm"]) == (mode == "full")


def test_auto_applies_the_plan_and_logs_it_once(tmp_path, documents, monkeypatch, caplog):
    """A stage-1 run with `activation_checkpointing: auto` takes the plan's modes per block kind and its splits
    (half the token budget, twice the accumulation), and logs the plan at start."""
    from moca_fast.trainers.cpt import ContinualPretraining
    from moca_fast.trainers.setup import build_model, build_processor, build_tokenizer

    from .conftest import cpt_config

    planned = mp.MemoryPlan({"decoder": "selective", "vision": "full", "mae": "none"}, 2, None, 1.0, 2.0)
    monkeypatch.setattr(mp, "plan_stage1", lambda *args, **kwargs: planned)
    config = cpt_config(tmp_path, activation_checkpointing="auto", device_memory_gb=1.0, max_steps=1)
    tokenizer = build_tokenizer(config)
    model = build_model(config, tokenizer, torch.device("cpu"))
    with caplog.at_level("INFO"):
        stage = ContinualPretraining(
            config, model, build_processor(config, tokenizer), torch.device("cpu"), 0, 1, documents=documents
        )
    assert caplog.text.count("memory plan: decoder selective, vision full, mae none; micro-batches split in 2") == 1
    assert stage.grad_accum == 2 * config.grad_accum
    assert stage.sampler.budget == config.tokens_per_micro_batch // 2
    assert stage.state["activation_checkpointing"]


def test_auto_needs_a_memory_size_off_cuda():
    with pytest.raises(ValueError, match="device_memory_gb"):
        mp.device_target(torch.device("cpu"), 1, "float32", None)
