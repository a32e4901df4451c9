"""The GPU paths import and run where `datasets` (and dill, multiprocess, pandas, xxhash) is not installed, as on the
lent GPU machine: only reading stage-1/2 data from files imports it."""

CODE = """
import importlib.util
import tempfile
from pathlib import Path

import torch

assert importlib.util.find_spec("datasets") is None  # the blocker holds
try:
    import datasets
except ImportError:
    pass
else:
    raise AssertionError("datasets imported")

import moca_fast.embed, moca_fast.eval.vidore, moca_fast.trainers.cpt, moca_fast.trainers.cl
from bench import embed, fused_kernels, train

ours, reference = embed.embedders("tiny", torch.device("cpu"), torch.float32, workers=0, reference_batch=4,
                                  min_pixels=4 * 28 * 28, max_pixels=16 * 28 * 28)
inputs, cases = embed.workloads(2, seed=0, image_side=56, page_size=(56, 80))["interleaved"]
cosine = torch.nn.functional.cosine_similarity(ours.encode(inputs, convert_to_tensor=True), reference.encode(cases))
assert cosine.min() > 0.9999, cosine
with tempfile.TemporaryDirectory() as folder:  # stage 2 from pairs in memory: one training step of each path
    summary = train.bench_stage("cl", "tiny", ["ours-eager", "reference"], 4, 4, Path(folder), torch.device("cpu"))
assert summary["check_loss_rel_diff"]["ours-eager"] < 1e-5, summary
print("ran without datasets")
"""


def test_embedding_and_stage2_training_run_without_datasets(run_without_datasets):
    done = run_without_datasets(CODE)
    assert done.returncode == 0 and "ran without datasets" in done.stdout, done.stderr[-3000:]


def test_reading_a_file_without_datasets_is_a_one_line_error_naming_it(run_without_datasets, tmp_path):
    """Rows in memory need no `datasets` (above); reading a file does, and without it the error names the file and
    what to install, on its last line, instead of an import failure deep in a reader."""
    (tmp_path / "t.jsonl").write_text('{"qry": "q", "qry_image_path": "", "pos_text": "p", "pos_image_path": ""}\n')
    rows = str(tmp_path / "t.jsonl")
    done = run_without_datasets(f"from moca_fast.data.pairs import PairDataset\nPairDataset({{'t': {rows!r}}})")
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode != 0 and last.startswith(f"ImportError: {rows}: "), done.stderr[-3000:]
    assert "pip install datasets" in last
