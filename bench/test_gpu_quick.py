"""bench/gpu_quick.py: its time box, and its --tiny run end to end on the CPU where `datasets` is not installed,
with no CPU timing in what it writes or prints."""

import json
import re
import time
import types

import pytest

from bench import gpu_quick


def test_a_part_past_its_deadline_is_stopped_and_the_rest_skipped():
    landed = []

    def slow():
        time.sleep(60)
        return {}

    def broken():
        raise ValueError("bad sample 7")

    parts = [("fast", lambda: {"x": 1}), ("broken", broken), ("slow", slow), ("after", lambda: {"x": 2})]
    start = time.monotonic()
    results = gpu_quick.run_parts(parts, time.monotonic() + 5.0, lambda r: landed.append(dict(r)))
    assert time.monotonic() - start < 30
    assert results["fast"]["status"] == "ok" and results["fast"]["x"] == 1
    assert results["broken"]["status"] == "failed: ValueError: bad sample 7"
    assert results["slow"]["status"].startswith("stopped: the step's time was up")
    assert results["after"]["status"] == "skipped: the step's time was up"
    assert [list(r) for r in landed] == [
        ["fast"],
        ["fast", "broken"],
        ["fast", "broken", "slow"],
        ["fast", "broken", "slow", "after"],
    ]  # written as each part lands


def test_timings_are_never_reported_from_the_cpu():
    result = {
        "seconds": 1.5,
        "check_loss": 2.0,
        "paths": {"ours": {"tokens_per_s": 10.0, "steps": 3}},
        "speedup_vs_reference": {"ours": 2.0},
        "rows": [{"ms": 0.1, "flops": 5.0}],
    }
    scrubbed = gpu_quick.not_measured(result)
    assert scrubbed == {
        "seconds": gpu_quick.NOT_MEASURED,
        "check_loss": 2.0,
        "paths": {"ours": {"tokens_per_s": gpu_quick.NOT_MEASURED, "steps": 3}},
        "speedup_vs_reference": gpu_quick.NOT_MEASURED,
        "rows": [{"ms": gpu_quick.NOT_MEASURED, "flops": 5.0}],
    }


def _timing_values(value, key=None):
    """Every number found under a timing key."""
    if isinstance(value, dict):
        return [x for k, v in value.items() for x in _timing_values(v, k)]
    if isinstance(value, list):
        return [x for v in value for x in _timing_values(v, key)]
    return [(key, value)] if key in gpu_quick.TIMINGS and isinstance(value, (int, float)) else []


@pytest.mark.slow
def test_tiny_run_end_to_end_without_datasets_and_untimed(run_without_datasets, tmp_path):
    out = tmp_path / "quick.json"
    argv = ["bench/gpu_quick.py", "--tiny", "--out", str(out)]
    done = run_without_datasets(
        f"import runpy, sys\nsys.argv = {argv!r}\nrunpy.run_path('bench/gpu_quick.py', run_name='__main__')"
    )
    assert done.returncode == 0, done.stderr[-4000:]
    data = json.loads(out.read_text())
    assert data["measured"] is False and data["device"].startswith("cpu")
    steps = data["results"]
    for name in ("kernel", "cpt", "cl", "embed"):
        assert steps[name]["parts"] and all(p["status"] == "ok" for p in steps[name]["parts"].values()), steps[name]
    assert steps["extras"]["status"].startswith("skipped")
    assert set(steps["kernel"]["parts"]) == {"moca_fast", "liger_all_rows", "liger_masked_rows"}
    for stage in ("cpt", "cl"):  # both paths trained on the same batch from the same weights
        assert steps[stage]["summary"]["check_loss_rel_diff"]["ours-eager"] < 1e-5, steps[stage]["summary"]
    assert all(steps["embed"]["parts"][w]["cosine_min"] > 0.9999 for w in ("text", "image", "page", "interleaved"))
    assert _timing_values(data) == []
    printed = done.stdout + done.stderr
    assert not re.search(rf"\b({'|'.join(gpu_quick.TIMINGS)})\b\s+[\d.]", printed), printed[-3000:]


@pytest.fixture
def stand_ins(monkeypatch):
    """The GPU-only measurements replaced by stand-ins (a GPU run is rare and one-shot). Returns the set of
    (stage, path) training runs that overrun their step's box (empty: none does)."""
    overrun = set()
    kernel_ms = {"moca_fast": 5.0, "liger_all_rows": 15.0, "liger_masked_rows": 6.0}

    def measure(case, contender, peak, args):
        return {
            "kernel": case.kernel,
            **case.shape,
            "contender": contender.name,
            "role": contender.role,
            "flops": contender.flops,
            "useful_flops": case.useful_flops,
            "ideal_ms": case.useful_flops / peak / 1e9,
            "status": "ok",
            "ms": kernel_ms[contender.name],
            "peak_gb": 1.0,
            "step_extra_gb": 0.5,
        }

    seconds = {"reference": 3.0, "ours-eager": 2.0, "ours": 1.5, "ours-fp8": 1.2}

    def bench_path(name, pool, device):
        if (pool.stage, name) in overrun:
            time.sleep(60)  # the step's alarm stops it
        run = {
            "seconds": seconds[name],
            "steps": 3,
            "check_loss": 11.9,
            "tokens_per_s": 1000 / seconds[name],
            "mfu": 0.1 / seconds[name],
        }
        return run if name == "reference" else {**run, "transforms": {"compile": name != "ours-eager", "fp8": True}}

    def bench_embedding(ours, reference, loads, warm, device):
        return {
            name: {
                "inputs": 32,
                "ours_per_s": 100.0,
                "reference_per_s": 40.0,
                "speedup_vs_reference": 2.5,
                "cosine_min": 0.9995,
            }
            for name in loads
        }

    monkeypatch.setattr(gpu_quick.fused_kernels, "bf16_matmul_peak_tflops", lambda: 800.0)
    monkeypatch.setattr(gpu_quick.fused_kernels, "measure", measure)
    monkeypatch.setattr(
        gpu_quick.train,
        "stage_pool",
        lambda stage, *a: types.SimpleNamespace(stage=stage, tokens=1000, useful_flops=1e15),
    )
    monkeypatch.setattr(gpu_quick.train, "bench_path", bench_path)
    reference = types.SimpleNamespace(path=types.SimpleNamespace(attention="flash_varlen_varlen"))
    monkeypatch.setattr(
        gpu_quick.embed, "embedders", lambda *a, **k: (types.SimpleNamespace(batch_tokens=16384), reference)
    )
    monkeypatch.setattr(gpu_quick.embed, "our_attention", lambda ours: "varlen")
    monkeypatch.setattr(
        gpu_quick.embed,
        "workloads",
        lambda *a, **k: {w: ([], []) for w in ("realistic", "text", "image", "page", "interleaved")},
    )
    monkeypatch.setattr(gpu_quick.embed, "bench_embedding", bench_embedding)
    return overrun


def test_the_gpu_run_s_steps_summaries_and_table_with_stand_in_measurements(stand_ins, tmp_path):
    """The GPU-only orchestration on stand-in measurements: every step and summary is filled and the README
    table renders it."""
    from bench import table

    args = types.SimpleNamespace(tiny=False, budget_s=60.0, out=tmp_path / "quick-3b-h100.json")
    gpu_quick.run_steps(gpu_quick.QuickRun(args, gpu_quick.torch.device("cpu"), tmp_path))
    steps = json.loads(args.out.read_text())["results"]
    assert all(p["status"] == "ok" for step in steps.values() for p in step["parts"].values()), steps
    assert steps["kernel"]["summary"][0]["speedup_vs_liger_all_rows"] == 3.0
    assert steps["cpt"]["summary"]["speedup_vs_reference"] == {"ours-eager": 1.5}
    assert steps["extras"]["summary"]["speedup_vs_reference"] == {"ours": 2.0, "ours-fp8": 2.5}
    assert steps["embed"]["parts"]["models"]["our_attention"] == "varlen"
    text = table.render(tmp_path)
    assert (
        "| kernel | masked-LM loss, ms (12,800 rows, 5,120 masked) | 5.00 | 15.00 | 3.00x | "
        "Liger on the masked rows: 6.00 ms |" in text
    )
    assert "| cl | stage 2, tokens/s | 500 (5.0% MFU) | 333 (3.3% MFU) | 1.50x | loss 0.0e+00 rel. |" in text
    assert "| embed | page, inputs/s | 100.0 | 40.0 | 2.50x | cosine >= 0.99950 |" in text
    assert "| extras | stage 1 with compile + FP8, tokens/s | 833 (8.3% MFU) | 333 (3.3% MFU) | 2.50x |" in text


def test_ours_runs_first_and_each_ratio_is_written_as_its_reference_run_lands(stand_ins, monkeypatch, tmp_path):
    """A reference run past its step's box costs the step's ratio, never our figure; a ratio is in the JSON from
    the write that brings its reference run."""
    stand_ins.add(("cpt", "reference"))
    monkeypatch.setitem(gpu_quick.BUDGETS, "cpt", 2.0)
    args = types.SimpleNamespace(tiny=False, budget_s=60.0, out=tmp_path / "quick-3b-h100.json")
    written = []
    save = gpu_quick.QuickRun.save

    def kept(run):
        save(run)
        written.append(json.loads(args.out.read_text())["results"])

    monkeypatch.setattr(gpu_quick.QuickRun, "save", kept)
    gpu_quick.run_steps(gpu_quick.QuickRun(args, gpu_quick.torch.device("cpu"), tmp_path))
    cpt = written[-1]["cpt"]
    assert list(cpt["parts"]) == ["samples", "ours-eager", "reference"]
    assert cpt["parts"]["ours-eager"]["status"] == "ok" and cpt["parts"]["ours-eager"]["tokens_per_s"] == 500
    assert cpt["parts"]["reference"]["status"].startswith("stopped: the step's time was up")
    first = next(w["cl"] for w in written if "reference" in w.get("cl", {}).get("parts", {}))
    assert first["summary"]["speedup_vs_reference"] == {"ours-eager": 1.5}


def test_the_full_runs_commands_are_time_boxed_and_their_failures_reported():
    """--full (bench/run_gpu.sh): each part a child process, killed when the box ends, a failed one reported."""
    import functools
    import sys

    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    parts = [
        ("fails", functools.partial(gpu_quick.run_command, [sys.executable, "-c", "raise SystemExit(3)"])),
        ("sleeps", functools.partial(gpu_quick.run_command, sleeper)),
        ("after", functools.partial(gpu_quick.run_command, [sys.executable, "-c", "pass"])),
    ]
    start = time.monotonic()
    results = gpu_quick.run_parts(parts, time.monotonic() + 5.0, lambda r: None)
    assert time.monotonic() - start < 30
    assert results["fails"]["status"].startswith("failed: CalledProcessError") and "3" in results["fails"]["status"]
    assert results["sleeps"]["status"].startswith("stopped: the step's time was up")
    assert results["after"]["status"] == "skipped: the step's time was up"
    names = [name for name, _ in gpu_quick.full_parts("all", "h100")]
    assert names == ["kernel tests", "fused kernels", "training", "embedding", "pytest-benchmark suite"]
    assert [name for name, _ in gpu_quick.full_parts("train", "h100")] == ["training"]
