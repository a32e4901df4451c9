"""bench/work.py on the tiny model: every count present and consistent with what each path is configured to do."""

import json

import pytest

from bench import work
from bench.fused_kernels import LM_HEAD_GEMMS


@pytest.fixture(scope="module")
def counted(tmp_path_factory):
    out = tmp_path_factory.mktemp("work")
    work.main(
        [
            "--sizes",
            "tiny",
            "--warm",
            "4",
            "--pool",
            "12",
            "--cpu-pool",
            "4",
            "--cpu-repeats",
            "2",
            "--out-dir",
            str(out),
        ]
    )
    return json.loads((out / "work-tiny.json").read_text())


def test_both_pools_are_counted_and_cpu_time_beside(counted):
    assert list(counted["results"]) == ["realistic", "uniform"]
    realistic, uniform = (counted["results"][pool]["cpt"]["pool"] for pool in ("realistic", "uniform"))
    assert realistic["tokens"] != uniform["tokens"]  # other samples, not the same pool twice
    for stage, c in counted["cpu_time"].items():
        assert c["threads"] == 1 and c["model"] == "tiny" and len(c["cpu_seconds"]["ours"]) == 2
        assert c["reference_over_ours"] == pytest.approx(
            c["median_cpu_seconds"]["reference"] / c["median_cpu_seconds"]["ours"]
        )
        assert c["flops_reference_over_ours"] > 1, stage


def test_the_same_samples_cost_the_reference_more(counted):
    assert counted["device"].startswith("cpu") and counted["shapes"]["pool"] == 12
    for stage, summary in [(s, r) for pool in counted["results"].values() for s, r in pool.items()]:
        ours, reference = summary["paths"]["ours"], summary["paths"]["reference"]
        for key in ("real_tokens", "vision_patches"):  # the same samples on both sides
            assert ours["rows"][key] == reference["rows"][key] > 0, (stage, key)
        assert ours["rows"]["decoder_tokens"] == ours["rows"]["real_tokens"]  # packing: no padding
        assert reference["rows"]["decoder_tokens"] > ours["rows"]["decoder_tokens"]
        assert reference["rows"]["decoder_tokens"] % 32 == 0  # every padded batch is a multiple of 32 long
        assert summary["useful_flops"] <= ours["flops"]["total"] < reference["flops"]["total"]
        assert ours["flops"]["total"] == pytest.approx(sum(v for k, v in ours["flops"].items() if k != "total"))
        assert summary["reference_over_ours"]["flops"] == pytest.approx(
            reference["flops"]["total"] / ours["flops"]["total"]
        )


@pytest.mark.parametrize("pool", ["realistic", "uniform"])
def test_stage1_heads_run_where_each_path_runs_them(counted, pool):
    summary = counted["results"][pool]["cpt"]
    ours, reference = summary["paths"]["ours"], summary["paths"]["reference"]
    assert (
        reference["rows"]["lm_head_rows"]
        == reference["rows"]["mae_layer_queries"]
        == reference["rows"]["decoder_tokens"]
    )  # Liger and the MAE layer over every padded position
    assert 0 < ours["rows"]["lm_head_rows"] < ours["rows"]["real_tokens"]  # the masked rows only
    assert 0 < ours["rows"]["mae_layer_queries"] < ours["rows"]["real_tokens"]
    # The LM head per row: ours 4 logit GEMMs (recompute in backward), Liger 3.
    per_row = {
        path: summary["paths"][path]["flops"]["lm_head"] / summary["paths"][path]["rows"]["lm_head_rows"]
        for path in ("ours", "reference")
    }
    assert per_row["ours"] / per_row["reference"] == pytest.approx(LM_HEAD_GEMMS["moca_fast"] / LM_HEAD_GEMMS["liger"])
    assert ours["flops"]["mae_projection"] == reference["flops"]["mae_projection"]  # chosen rows on both sides
    assert 0 < ours["flops"]["recompute"] < ours["flops"]["backbone"] / 3  # blocks only, once


@pytest.mark.parametrize("pool", ["realistic", "uniform"])
def test_stage2_is_one_packed_forward_against_three_padded(counted, pool):
    summary = counted["results"][pool]["cl"]
    ours, reference = summary["paths"]["ours"], summary["paths"]["reference"]
    assert ours["forwards"] == ours["steps"] and reference["forwards"] == 3 * reference["steps"]
    # Packing keeps every sequence's attention to itself: our forward + backward is exactly the useful work,
    # which bench/train.py counts one sequence at a time.
    assert ours["flops"]["backbone"] == pytest.approx(summary["useful_flops"], rel=1e-12)


def test_the_readme_table_renders_the_counts(counted, tmp_path):
    from bench import table

    (tmp_path / "work-tiny.json").write_text(json.dumps(counted))
    text = table.render(tmp_path)
    rows = counted["results"]["realistic"]["cpt"]["paths"]
    expected = (
        f"| cpt | LM-head rows | {rows['ours']['rows']['lm_head_rows']:,} | "
        f"{rows['reference']['rows']['lm_head_rows']:,} |"
    )
    assert expected in text and "| cl | forwards |" in text and "work-tiny.json" in text
    assert "CPU time, not GPU" in text and "realistic: ours" in text and "uniform: ours" in text
