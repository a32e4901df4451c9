"""The README's performance section is exactly what bench/table.py makes of the committed results."""

import json

from bench import table
from bench.report import README, report, with_section


def test_readme_table_is_generated_from_the_committed_results():
    readme = README.read_text()
    assert with_section(readme, table.BEGIN, table.END, table.render()) == readme, "run: python -m bench.table"


def test_gpu_results_become_rows_and_lift_the_pending_note(tmp_path):
    pending = table.render(tmp_path)
    assert "GPU figures are pending" in pending
    run = {
        "seconds": 2.0,
        "steps": 4,
        "check_loss": 11.9,
        "last_loss": 11.7,
        "max_memory_gb": 41.25,
        "tokens_per_s": 123456.0,
        "mfu": 0.4321,
    }
    train = report(
        "training steps",
        "cpu",
        shapes={"size": "3b"},
        results={
            "cpt": {
                "tokens": 1,
                "useful_flops": 1.0,
                "paths": {"ours": run, "reference": {**run, "tokens_per_s": 50000.0}},
                "speedup_vs_reference": {"ours": 2.469},
                "check_loss_rel_diff": {"ours": 0.0031},
            }
        },
    )
    embed = report(
        "embedding",
        "cpu",
        shapes={},
        results={
            "page": {
                "inputs": 8,
                "ours_per_s": 310.5,
                "reference_per_s": 90.25,
                "speedup_vs_reference": 3.44,
                "cosine_min": 0.99931,
                "cosine_mean": 0.9998,
            }
        },
    )
    (tmp_path / "train-3b-h100.json").write_text(json.dumps(train))
    (tmp_path / "embed-3b-h100.json").write_text(json.dumps(embed))
    text = table.render(tmp_path)
    assert "GPU figures are pending" not in text
    assert "| cpt | ours | 123,456 | 43.2% | 41.2 | 2.47x | 3.1e-03 rel. |" in text
    assert "| page | 310.5 | 90.2 | 3.44x | 0.99931 |" in text
    assert "train-3b-h100.json" in text and "embed-3b-h100.json" in text


def test_quick_run_becomes_rows_with_stopped_parts_said_so(tmp_path):
    kernel = {"kernel": "masked_lm_ce", "tokens": 12800, "masked_rows": 5120}
    run = {"status": "ok", "seconds": 2.0, "check_loss": 11.9, "tokens_per_s": 60000.0, "mfu": 0.41}
    steps = {
        "kernel": {
            "parts": {
                "moca_fast": {**kernel, "status": "ok", "ms": 5.0},
                "liger_all_rows": {**kernel, "status": "ok", "ms": 15.0},
                "liger_masked_rows": {**kernel, "status": "out of memory"},
            }
        },
        "cpt": {
            "parts": {"reference": {**run, "seconds": 3.0, "tokens_per_s": 40000.0, "mfu": 0.27}, "ours-eager": run}
        },
        "cl": {"parts": {"reference": run, "ours-eager": {"status": "stopped: the step's time was up after 99 s"}}},
        "embed": {
            "parts": {
                "text": {
                    "status": "ok",
                    "ours_per_s": 900.0,
                    "reference_per_s": 300.0,
                    "speedup_vs_reference": 3.0,
                    "cosine_min": 0.99991,
                }
            }
        },
        "extras": {
            "parts": {
                "ours": {**run, "seconds": 1.5, "check_loss": 11.8},
                "ours-fp8": {**run, "transforms": {"compile": True, "fp8": False}},
            }
        },
    }
    (tmp_path / "quick-3b-h100.json").write_text(json.dumps(report("quick", "cpu", shapes={}, results=steps)))
    text = table.render(tmp_path)
    assert "GPU figures are pending" not in text
    assert (
        "| kernel | masked-LM loss, ms (12,800 rows, 5,120 masked) | 5.00 | 15.00 | 3.00x | Liger: out of memory |"
        in text
    )
    assert "| cpt | stage 1, tokens/s | 60,000 (41.0% MFU) | 40,000 (27.0% MFU) | 1.50x | loss 0.0e+00 rel. |" in text
    assert "| cl | stage 2, tokens/s | stopped: the step's time was up after 99 s |" in text
    assert "| embed | text, inputs/s | 900.0 | 300.0 | 3.00x | cosine >= 0.99991 |" in text
    assert "| embed | page, inputs/s | not run |" in text
    assert "| extras | stage 1 with compile, tokens/s | 60,000 (41.0% MFU) | 40,000 (27.0% MFU) | 2.00x |" in text
    assert (
        "| extras | stage 1 with compile + FP8, tokens/s | 60,000 (41.0% MFU) | 40,000 (27.0% MFU) | 1.50x | "
        "loss 0.0e+00 rel.; fp8 was off |" in text
    )


def test_work_counts_become_rows_and_keep_the_gpu_note(tmp_path):
    paths = {
        path: {
            "forwards": forwards,
            "flops": {"total": total * 1e12, "backbone": total * 1e12},
            "rows": {"decoder_tokens": tokens},
        }
        for path, forwards, total, tokens in (("ours", 2, 100.0, 1000), ("reference", 6, 128.0, 1390))
    }
    pool = {"sequences": 8, "text_only": 2, "single_image": 5, "several_images": 1, "tokens": 1000, "image_tokens": 800}
    work = report(
        "work",
        "cpu",
        shapes={},
        results={
            "realistic": {
                "cl": {"pool": pool, "useful_flops": 9e13, "paths": paths, "reference_over_ours": {"flops": 1.28}}
            }
        },
    )
    (tmp_path / "work-3b.json").write_text(json.dumps(work))
    text = table.render(tmp_path)
    assert "GPU figures are pending" in text  # a count is no GPU figure
    assert "| cl | TFLOP, total | 100.0 | 128.0 | 1.28x |" in text
    assert "| cl | decoder tokens (padding included) | 1,000 | 1,390 | 1.39x |" in text
    assert "| cl | forwards | 2 | 6 | 3.00x |" in text
    assert (
        "realistic cl: 8 sequences (2 text-only, 5 with one image, 1 with several), 1,000 tokens of which 800 "
        "image" in text
    )
    assert "Ours / reference FLOPs: realistic pool cl 0.78x." in text
