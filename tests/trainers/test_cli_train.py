"""`moca-fast cpt` then `moca-fast cl` from its checkpoint (MAE weights left behind), through the YAML recipes."""

import json
from pathlib import Path

import pytest

from moca_fast.cli import main
from moca_fast.data.synthetic import write_documents

CONFIGS = Path(__file__).parents[2] / "configs"


def test_cpt_then_cl_from_its_checkpoint(tmp_path, documents, pair_folder):
    docs = write_documents(documents, tmp_path / "docs", "dataset")
    assert main(["cpt", "--config", str(CONFIGS / "tiny-cpt.yaml"), "--data", str(docs),
                 "--output-dir", str(tmp_path / "cpt"), "--max-steps", "3"]) == 0
    assert (tmp_path / "cpt" / "final" / "config.json").is_file()
    assert main(["cl", "--config", str(CONFIGS / "tiny-cl.yaml"), "--model", str(tmp_path / "cpt" / "final"),
                 "--data", str(pair_folder), "--output-dir", str(tmp_path / "cl"), "--max-steps", "3"]) == 0
    records = [json.loads(line) for line in (tmp_path / "cl" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]


def test_every_recipe_parses():
    from moca_fast.config import load_train_config

    for path in sorted(CONFIGS.glob("*.yaml")):
        config = load_train_config(str(path))
        assert config.stage in path.stem


def test_wrong_stage_and_unknown_keys_are_clear_errors(tmp_path):
    with pytest.raises(SystemExit):
        main(["cl", "--config", str(CONFIGS / "tiny-cpt.yaml")])
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage: cpt\nmodel: tiny\ndata: x\noutput_dir: y\nlearning_rate: 1\n")
    from moca_fast.config import load_train_config

    with pytest.raises(ValueError, match=r"unknown config keys \['learning_rate'\]"):
        load_train_config(str(bad))
