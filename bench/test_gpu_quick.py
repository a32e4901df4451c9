"""bench/gpu_quick.py: its time box, and its --tiny run end to end on the CPU where `datasets` is not installed,
with no CPU timing in what it writes or prints."""

import json
import re
import time

import pytest

import gpu_quick


def test_a_part_past_its_deadline_is_stopped_and_the_rest_skipped():
    landed = []

    def slow():
        time.sleep(30)
        return {}

    def broken():
        raise ValueError("bad sample 7")

    parts = [("fast", lambda: {"x": 1}), ("broken", broken), ("slow", slow), ("after", lambda: {"x": 2})]
    start = time.monotonic()
    results = gpu_quick.run_parts(parts, time.monotonic() + 1.0, lambda r: landed.append(dict(r)))
    assert time.monotonic() - start < 10
    assert results["fast"]["status"] == "ok" and results["fast"]["x"] == 1
    assert results["broken"]["status"] == "failed: ValueError: bad sample 7"
    assert results["slow"]["status"].startswith("stopped: the step's time was up")
    assert results["after"]["status"] == "skipped: the step's time was up"
    assert [list(r) for r in landed] == [["fast"], ["fast", "broken"], ["fast", "broken", "slow"],
                                         ["fast", "broken", "slow", "after"]]  # written as each part lands


def test_timings_are_never_reported_from_the_cpu():
    result = {"seconds": 1.5, "check_loss": 2.0, "paths": {"ours": {"tokens_per_s": 10.0, "steps": 3}},
              "speedup_vs_reference": {"ours": 2.0}, "rows": [{"ms": 0.1, "flops": 5.0}]}
    scrubbed = gpu_quick.not_measured(result)
    assert scrubbed == {"seconds": gpu_quick.NOT_MEASURED, "check_loss": 2.0,
                        "paths": {"ours": {"tokens_per_s": gpu_quick.NOT_MEASURED, "steps": 3}},
                        "speedup_vs_reference": gpu_quick.NOT_MEASURED,
                        "rows": [{"ms": gpu_quick.NOT_MEASURED, "flops": 5.0}]}


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
    done = run_without_datasets(f"import runpy, sys\nsys.argv = ['bench/gpu_quick.py', '--tiny', '--out', {str(out)!r}]\n"
                                "runpy.run_path('bench/gpu_quick.py', run_name='__main__')")
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
