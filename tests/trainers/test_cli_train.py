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


def test_set_overrides_are_typed_by_the_config():
    from moca_fast.config import parse_overrides

    values = parse_overrides(["lr=1e-4", "grad_accum=8", "mask_duplicates=false", "grad_cache_tokens=null",
                              "tasks=t2i, vqa", "betas=0.9,0.95", "tokenizer=/some/dir", "max_steps=none"])
    assert values == {"lr": 1e-4, "grad_accum": 8, "mask_duplicates": False, "grad_cache_tokens": None,
                      "tasks": ("t2i", "vqa"), "betas": (0.9, 0.95), "tokenizer": "/some/dir", "max_steps": None}
    assert type(values["lr"]) is float and type(values["grad_accum"]) is int
    for bad, message in [("learning_rate=1", "unknown config key"), ("grad_accum=2.5", "expected an integer"),
                         ("compile=maybe", "expected true or false"), ("lr", "expected key=value"),
                         ("betas=0.9", "expected 2 comma-separated values")]:
        with pytest.raises(ValueError, match=message):
            parse_overrides([bad])


def test_set_reaches_the_config_and_bad_keys_stop_the_command(tmp_path, capsys):
    from moca_fast.config import load_train_config, parse_overrides

    config = load_train_config(str(CONFIGS / "tiny-cl.yaml"), parse_overrides(["temperature=0.1", "tasks=vqa"]))
    assert config.temperature == 0.1 and config.tasks == ("vqa",)
    with pytest.raises(SystemExit):
        main(["cl", "--config", str(CONFIGS / "tiny-cl.yaml"), "--set", "temprature=0.1"])
    assert "--set temprature: unknown config key" in capsys.readouterr().err


def test_a_used_output_dir_needs_resume_or_overwrite_and_a_nan_stops_with_one_line(tmp_path, documents, capsys):
    docs = write_documents(documents, tmp_path / "docs", "dataset")
    args = ["cpt", "--config", str(CONFIGS / "tiny-cpt.yaml"), "--data", str(docs), "--output-dir", str(tmp_path / "o"),
            "--max-steps", "2"]
    assert main(args) == 0
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2 and "already holds a run" in capsys.readouterr().err
    bad = tmp_path / "exploding.yaml"
    bad.write_text((CONFIGS / "tiny-cpt.yaml").read_text().replace("lr: 2.0e-3", "lr: 1.0e+6"))
    assert main(["cpt", "--config", str(bad), *args[3:], "--overwrite"]) == 1
    err = capsys.readouterr().err
    assert "moca-fast cpt: stopped: step 2: non-finite loss" in err and "Traceback" not in err


def test_stage2_recipe_takes_the_tokenizer_of_its_model(checkpoint):
    """The README's stage-2 recipe, verbatim but for --model: the tokenizer (with its <|mask|> id) comes from the
    model directory, as stage 1's final/ carries it; the recipe names no placeholder path."""
    from moca_fast.config import load_train_config
    from moca_fast.data.tokenizer import load_tokenizer
    from moca_fast.trainers.setup import build_tokenizer

    for recipe in ("qwen25vl-3b-cl.yaml", "qwen25vl-7b-cl.yaml"):
        config = load_train_config(str(CONFIGS / recipe), {"model": str(checkpoint)})
        assert build_tokenizer(config).get_vocab() == load_tokenizer(checkpoint).get_vocab()


def test_a_wrong_model_or_tokenizer_is_a_one_line_error(tmp_path, capsys, checkpoint):
    missing = tmp_path / "runs" / "qwen25vl-3b-cpt" / "final"
    with pytest.raises(SystemExit) as stop:
        main(["cl", "--config", str(CONFIGS / "qwen25vl-3b-cl.yaml"), "--model", str(missing), "--data",
              str(tmp_path)])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"moca-fast cl: error: model {missing}: no such directory (expected a local Qwen2.5-VL checkpoint directory)"]

    weights_only = tmp_path / "weights-only"
    weights_only.mkdir()
    (weights_only / "config.json").write_bytes((Path(checkpoint) / "config.json").read_bytes())
    from moca_fast.config import load_train_config
    from moca_fast.trainers.setup import build_tokenizer

    config = load_train_config(str(CONFIGS / "qwen25vl-3b-cl.yaml"), {"model": str(weights_only)})
    with pytest.raises(FileNotFoundError, match=r"weights-only: no tokenizer files .*name a tokenizer directory"):
        build_tokenizer(config)
    with pytest.raises(FileNotFoundError, match=r"^tokenizer /nowhere: no such directory$"):
        build_tokenizer(load_train_config(str(CONFIGS / "qwen25vl-3b-cl.yaml"),
                                          {"model": str(weights_only), "tokenizer": "/nowhere"}))
