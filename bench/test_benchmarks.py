"""pytest-benchmark suite: training steps and embeddings, ours against the reference path.

`python -m pytest bench --benchmark-enable --benchmark-only` times them (add --benchmark-autosave and later
--benchmark-compare to guard against regressions). The CUDA cases run the real 3B shape with random weights and
skip without a GPU; the tiny CPU cases run in CI with benchmarking disabled (once each), so the suite cannot rot,
and they check that both paths compute the same losses and embeddings.
"""

import pytest
import torch

from bench import embed, train

CPU_TINY = pytest.param("tiny", "cpu", id="tiny-cpu")
CUDA_3B = pytest.param("random:3b", "cuda", id="3b-cuda", marks=pytest.mark.cuda)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return tmp_path_factory.mktemp("bench-world")


def _stage_inputs(stage: str, model: str, folder):
    """A trainer-independent step: one stage-1 micro-batch or one stage-2 group of pairs."""
    config = train.train_config(stage, model, str(folder / "pairs"))
    tokenizer = train.build_tokenizer(config)
    processor = train.build_processor(config, tokenizer)
    if stage == "cpt":
        documents = train.make_documents(64 if model != "tiny" else 8, seed=0)
        samples = train.stage1_samples(documents, processor, config)
        return (
            config,
            tokenizer,
            processor,
            documents,
            train.packed_groups(samples, config, processor.image_token_id)[0],
        )
    rows = train.pair_rows(train.make_pairs(-(-config.pairs_per_rank // 4), seed=0), folder / "pairs", seed=0)
    pairs = train.PairDataset(rows, image_dir=folder / "pairs", negative_ratio=2, seed=0)
    return config, tokenizer, processor, pairs, train.stage2_samples(pairs, processor)[: config.pairs_per_rank]


@pytest.fixture(scope="module")
def first_losses():
    """(stage, model) -> path -> the loss of its first step, from the shared initial weights on the same batch."""
    return {}


# The paths' first losses agree to fp32 rounding on the CPU, to bf16 autocast's on CUDA.
LOSS_RTOL = {"cpu": 1e-5, "cuda": 2e-2}


@pytest.mark.parametrize("model,device", [CPU_TINY, CUDA_3B])
@pytest.mark.parametrize("path", ["ours", "reference"])
@pytest.mark.parametrize("stage", ["cpt", "cl"])
def test_train_step(benchmark, world, first_losses, stage, path, model, device):
    """One training step timed; its first loss is the other path's on the same batch (checked by whichever of the
    two cases runs second)."""
    config, tokenizer, processor, data, group = _stage_inputs(stage, model, world / f"{stage}-{model}")
    device = torch.device(device)
    if path == "ours":
        config = train.train_config(stage, model, config.data, compile=device.type == "cuda")
        trainer = train.OursTrainer(config, data, tokenizer, processor, device)
    else:
        trainer = train.ReferenceTrainer(config, tokenizer, processor, device)
    inputs = trainer.prepare(group)
    first = trainer.step(inputs)  # warm-up (and compilation) outside the timing, from the initial weights
    loss = benchmark.pedantic(lambda: (trainer.step(inputs), train.synchronize(device))[0], rounds=5, warmup_rounds=1)
    assert torch.isfinite(torch.tensor([first, loss])).all()
    seen = first_losses.setdefault((stage, model), {})
    seen[path] = first
    if len(seen) == 2:
        assert seen["ours"] == pytest.approx(seen["reference"], rel=LOSS_RTOL[device.type]), seen
    trainer = None
    train.free(device)


@pytest.mark.parametrize("stage", ["cpt", "cl"])
def test_both_paths_agree_through_the_benchmark(tmp_path, stage):
    """bench/train.py's whole measurement on the tiny model: same check loss (fp32), every field reported."""
    summary = train.bench_stage(stage, "tiny", ["ours-eager", "reference"], 8, 8, tmp_path, torch.device("cpu"))
    assert summary["check_loss_rel_diff"]["ours-eager"] < 1e-5, summary
    for run in summary["paths"].values():
        assert run["steps"] >= 1 and run["tokens_per_s"] > 0
    assert summary["speedup_vs_reference"]["ours-eager"] > 0
    # Which attention each path ran; on the CPU the reference's varlen attention runs as SDPA over its segments.
    assert summary["paths"]["reference"]["attention"] == "flash_varlen_sdpa"
    assert summary["paths"]["ours-eager"]["attention"] == "sdpa"


@pytest.fixture(scope="module", params=[pytest.param(p.values, id=p.id, marks=p.marks) for p in (CPU_TINY, CUDA_3B)])
def embedders(request):
    model, device = request.param
    tiny = model == "tiny"
    pixels = (
        dict(min_pixels=4 * 28 * 28, max_pixels=64 * 28 * 28)
        if tiny
        else dict(min_pixels=embed.MIN_PIXELS, max_pixels=embed.MAX_PIXELS)
    )
    ours, reference = embed.embedders(
        model,
        torch.device(device),
        torch.float32 if tiny else torch.bfloat16,
        workers=0 if tiny else 8,
        reference_batch=4 if tiny else 16,
        **pixels,
    )
    sizes = dict(image_side=112, page_size=(120, 170)) if tiny else {}
    return ours, reference, embed.workloads(4 if tiny else 64, seed=1, **sizes), 0.99999 if tiny else 0.999


@pytest.mark.parametrize("workload", ["realistic", "text", "image", "page", "interleaved"])
@pytest.mark.parametrize("path", ["ours", "reference"])
def test_embed(benchmark, embedders, workload, path):
    ours, reference, loads, min_cosine = embedders
    inputs, cases = loads[workload]
    if path == "ours":
        vectors = benchmark.pedantic(lambda: ours.encode(inputs, convert_to_tensor=True), rounds=3, warmup_rounds=1)
        other = reference.encode(cases)
    else:
        vectors = benchmark.pedantic(lambda: reference.encode(cases), rounds=3, warmup_rounds=1)
        other = ours.encode(inputs, convert_to_tensor=True)
    cosine = torch.nn.functional.cosine_similarity(vectors.float().cpu(), other.float().cpu(), dim=-1)
    assert cosine.min() >= min_cosine, cosine


def test_colqwen_benchmark_runs_and_both_paths_agree(tmp_path):
    """bench/embed.py --colqwen's measurement at two inputs per workload: every field, vectors equal (it raises
    otherwise)."""
    results = embed.bench_colqwen(tmp_path, n=2, warm=1, colpali_batch=2, image_side=112)
    assert set(results) == {"query", "image"}
    for r in results.values():
        assert r["ours_per_s"] > 0 and r["colpali_per_s"] > 0 and r["ratio_ours_to_colpali"] > 0
        assert r["max_abs_difference"] <= 1e-4 and r["tokens"] > 0


def test_padding_rows_cost_compute_but_leave_the_loss_alone(world):
    """ours-padded: every row topped up to the batch's multiple of 32 by pad-only segments, same stage-1 loss."""
    config, tokenizer, processor, documents, group = _stage_inputs("cpt", "tiny", world / "padding")
    padded = train.with_padding_rows(group, tokenizer.pad_token_id)
    length = -(-max(len(s) for s in group) // 32) * 32
    assert sum(len(s) for s in padded) == length * len(group) and length * len(group) > sum(len(s) for s in group)
    losses = []
    for g in (group, padded):
        trainer = train.OursTrainer(config, documents, tokenizer, processor, torch.device("cpu"))
        losses.append(trainer.step(trainer.prepare(g)))
    assert abs(losses[0] - losses[1]) <= 1e-6 * abs(losses[0]), losses
