"""The README's performance section is exactly what bench/table.py makes of the committed results."""

import json

import table
from report import report


def test_readme_table_is_generated_from_the_committed_results():
    readme = table.README.read_text()
    assert table.readme_with_table(readme, table.render()) == readme, "run: python bench/table.py"


def test_gpu_results_become_rows_and_lift_the_pending_note(tmp_path):
    pending = table.render(tmp_path)
    assert "GPU figures are pending" in pending
    run = {"seconds": 2.0, "steps": 4, "check_loss": 11.9, "last_loss": 11.7, "max_memory_gb": 41.25,
           "tokens_per_s": 123456.0, "mfu": 0.4321}
    train = report("training steps", "cpu", shapes={"size": "3b"}, results={"cpt": {
        "tokens": 1, "useful_flops": 1.0, "paths": {"ours": run, "reference": {**run, "tokens_per_s": 50000.0}},
        "speedup_vs_reference": {"ours": 2.469}, "check_loss_rel_diff": {"ours": 0.0031}}})
    embed = report("embedding", "cpu", shapes={}, results={"page": {
        "inputs": 8, "ours_per_s": 310.5, "reference_per_s": 90.25, "speedup_vs_reference": 3.44,
        "cosine_min": 0.99931, "cosine_mean": 0.9998}})
    (tmp_path / "train-3b-h100.json").write_text(json.dumps(train))
    (tmp_path / "embed-3b-h100.json").write_text(json.dumps(embed))
    text = table.render(tmp_path)
    assert "GPU figures are pending" not in text
    assert "| cpt | ours | 123,456 | 43.2% | 41.2 | 2.47x | 3.1e-03 rel. |" in text
    assert "| page | 310.5 | 90.2 | 3.44x | 0.99931 |" in text
    assert "train-3b-h100.json" in text and "embed-3b-h100.json" in text
