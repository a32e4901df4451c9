"""`moca-fast cpt` then `moca-fast cl` from its checkpoint (MAE weights left behind), through the YAML recipes."""

import json
from pathlib import Path

import pytest

from moca_fast.cli import main
from moca_fast.data.synthetic import write_documents

from .conftest import nonfinite_gradients_at

CONFIGS = Path(__file__).parents[2] / "configs"


def test_cpt_then_cl_from_its_checkpoint(tmp_path, documents, pair_folder):
    docs = write_documents(documents, tmp_path / "docs", "dataset")
    assert (
        main(
            [
                "cpt",
                "--config",
                str(CONFIGS / "tiny-cpt.yaml"),
                "--data",
                str(docs),
                "--output-dir",
                str(tmp_path / "cpt"),
                "--max-steps",
                "3",
            ]
        )
        == 0
    )
    assert (tmp_path / "cpt" / "final" / "config.json").is_file()
    assert (
        main(
            [
                "cl",
                "--config",
                str(CONFIGS / "tiny-cl.yaml"),
                "--model",
                str(tmp_path / "cpt" / "final"),
                "--data",
                str(pair_folder),
                "--output-dir",
                str(tmp_path / "cl"),
                "--max-steps",
                "3",
                "--set",
                "pairs_per_rank=8",
            ]
        )
        == 0
    )  # the recipe's 32 is more than one task's 16 pairs here
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

    values = parse_overrides(
        [
            "lr=1e-4",
            "grad_accum=8",
            "mask_duplicates=false",
            "grad_cache_tokens=null",
            "tasks=t2i, vqa",
            "betas=0.9,0.95",
            "tokenizer=/some/dir",
            "max_steps=none",
        ]
    )
    assert values == {
        "lr": 1e-4,
        "grad_accum": 8,
        "mask_duplicates": False,
        "grad_cache_tokens": None,
        "tasks": ("t2i", "vqa"),
        "betas": (0.9, 0.95),
        "tokenizer": "/some/dir",
        "max_steps": None,
    }
    assert type(values["lr"]) is float and type(values["grad_accum"]) is int
    for bad, message in [
        ("learning_rate=1", "unknown config key"),
        ("grad_accum=2.5", "expected an integer"),
        ("compile=maybe", "expected true or false"),
        ("lr", "expected key=value"),
        ("betas=0.9", "expected 2 comma-separated values"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_overrides([bad])


def test_set_reaches_the_config_and_bad_keys_stop_the_command(tmp_path, capsys):
    from moca_fast.config import load_train_config, parse_overrides

    config = load_train_config(str(CONFIGS / "tiny-cl.yaml"), parse_overrides(["temperature=0.1", "tasks=vqa"]))
    assert config.temperature == 0.1 and config.tasks == ("vqa",)
    with pytest.raises(SystemExit):
        main(["cl", "--config", str(CONFIGS / "tiny-cl.yaml"), "--set", "temprature=0.1"])
    assert "--set temprature: unknown config key" in capsys.readouterr().err


def test_a_used_output_dir_needs_resume_or_overwrite_and_a_nan_stops_with_one_line(
    tmp_path, documents, capsys, monkeypatch
):
    docs = write_documents(documents, tmp_path / "docs", "dataset")
    args = [
        "cpt",
        "--config",
        str(CONFIGS / "tiny-cpt.yaml"),
        "--data",
        str(docs),
        "--output-dir",
        str(tmp_path / "o"),
        "--max-steps",
        "2",
    ]
    assert main(args) == 0
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2 and "already holds a run" in capsys.readouterr().err
    nonfinite_gradients_at(monkeypatch, {2})
    assert main([*args, "--overwrite"]) == 1
    err = capsys.readouterr().err
    assert "moca-fast cpt: stopped: step 2: non-finite loss" in err and "Traceback" not in err


def one_line_error(capsys, argv) -> str:
    """The command's error: exit code 2 and one line on stderr (logging aside), no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("moca-fast")]
    assert exit_info.value.code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize(
    "assignment, expected",
    [
        ("mlm_rate=1.7", "mlm_rate=1.7 (command line): out of range, allowed > 0 and < 1"),
        ("mlm_rate=1.5", "mlm_rate=1.5 (command line): out of range, allowed > 0 and < 1"),
        ("dtype=float64", "dtype='float64' (command line): should be 'bfloat16', 'float16' or 'float32'"),
        ("lr=-1", "lr=-1.0 (command line): out of range, allowed > 0 and <= 1"),
        ("lr=1e39", "lr=1e+39 (command line): out of range, allowed > 0 and <= 1"),
        ("lr=nan", "lr=nan (command line): should be a finite number"),
        ("grad_accum=0", "grad_accum=0 (command line): out of range, allowed >= 1"),
        ("clip_grad_norm=-1", "clip_grad_norm=-1.0 (command line): out of range, allowed > 0"),
        ("checkpoint_every=0", "checkpoint_every=0 (command line): out of range, allowed >= 1"),
        ("betas=0.9,1.5", "betas[1]=1.5 (command line): should be less than 1"),
        ("temperature=0.1", "temperature (command line) is a cl key: a cpt run does not use it"),
        ("stage=cl", "stage=cl (command line): the stage is the command's, here 'cpt'; run `moca-fast cl` instead"),
    ],
)
def test_bad_config_values_are_one_line_errors_naming_key_value_and_range(capsys, tmp_path, assignment, expected):
    line = one_line_error(
        capsys,
        ["cpt", "--config", str(CONFIGS / "tiny-cpt.yaml"), "--output-dir", str(tmp_path / "o"), "--set", assignment],
    )
    assert line == f"moca-fast cpt: error: {expected}"
    assert not (tmp_path / "o").exists()  # refused before anything ran


def test_named_overrides_take_the_same_path_as_set(capsys, tmp_path):
    common = ["cpt", "--config", str(CONFIGS / "tiny-cpt.yaml")]
    named = one_line_error(capsys, [*common, "--max-steps", "0"])
    assert named == one_line_error(capsys, [*common, "--set", "max_steps=0"])
    assert named.endswith("max_steps=0 (command line): out of range, allowed >= 1")
    assert one_line_error(capsys, [*common, "--max-steps", "two"]).endswith(
        "max_steps=two (command line): expected an integer"
    )


def test_the_other_stages_keys_and_bad_yaml_files_are_one_line_errors(capsys, tmp_path):
    path = tmp_path / "c.yaml"
    for text, expected in [
        ((CONFIGS / "tiny-cl.yaml").read_text() + "mlm_rate: 0.3\n", f"mlm_rate ({path}) is a cpt key: a cl run"),
        (
            (CONFIGS / "tiny-cl.yaml").read_text().replace("temperature: 0.05", "temperature: -1"),
            f"temperature=-1 ({path}): out of range, allowed > 0",
        ),
        ("stage: cl\nmodel: [unclosed\n", f"{path}: not valid YAML at line 3, column 1"),
        ("- stage: cl\n- model: tiny\n", f"{path}: expected a mapping of config keys (key: value lines), got a list"),
        ("stage: cl\nmodel: tiny\n", f"{path}: missing config keys ['data', 'output_dir']"),
    ]:
        path.write_text(text)
        assert one_line_error(capsys, ["cl", "--config", str(path)]).startswith(f"moca-fast cl: error: {expected}")


def test_a_config_a_command_builds_from_its_options_reports_in_one_line():
    """The demo builds its TrainConfigs from --steps: `demo --steps 0 600` is a one-line error too."""
    from moca_fast.cli import error_line
    from moca_fast.config import TrainConfig

    with pytest.raises(ValueError) as info:
        TrainConfig(stage="cpt", model="tiny", data="x", output_dir="y", max_steps=0)
    assert error_line(info.value) == "max_steps=0 (from the command's options): out of range, allowed >= 1"


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
        main(["cl", "--config", str(CONFIGS / "qwen25vl-3b-cl.yaml"), "--model", str(missing), "--data", str(tmp_path)])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"moca-fast cl: error: model {missing}: no such directory (expected a local Qwen2.5-VL checkpoint directory)"
    ]

    weights_only = tmp_path / "weights-only"
    weights_only.mkdir()
    (weights_only / "config.json").write_bytes((Path(checkpoint) / "config.json").read_bytes())
    from moca_fast.config import load_train_config
    from moca_fast.trainers.setup import build_tokenizer

    config = load_train_config(str(CONFIGS / "qwen25vl-3b-cl.yaml"), {"model": str(weights_only)})
    with pytest.raises(FileNotFoundError, match=r"weights-only: no tokenizer files .*name a tokenizer directory"):
        build_tokenizer(config)
    with pytest.raises(FileNotFoundError, match=r"^tokenizer /nowhere: no such directory$"):
        build_tokenizer(
            load_train_config(
                str(CONFIGS / "qwen25vl-3b-cl.yaml"), {"model": str(weights_only), "tokenizer": "/nowhere"}
            )
        )
