"""Both stages learn, resume exactly, survive a crash mid-checkpoint; GradCache equals the direct gradient."""

import json

import pytest
import torch

import moca_fast.trainers.checkpoint as checkpoint
from moca_fast.data.contrastive import ContrastiveCollator, EncodedPairs
from moca_fast.data.pairs import PairDataset
from moca_fast.model.loading import load_pretrained
from moca_fast.trainers.cl import ContrastiveFinetuning, pair_subsets
from moca_fast.trainers.run import run
from moca_fast.trainers.setup import build_model, build_processor, build_tokenizer

from .conftest import cl_config, cpt_config


def _losses(records):
    return [r["loss"] for r in records]


def test_stage1_learns_and_exports_an_hf_checkpoint(tmp_path, documents):
    records = run(cpt_config(tmp_path, max_steps=24, lr=3e-3), documents=documents)
    losses = _losses(records)
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4
    assert all(r["mlm"] > 0 and r["tokens"] > 0 for r in records)
    # The reference's cost buckets put text-only documents together: such a step has no MAE term, the others do.
    assert sum(r["mae"] > 0 for r in records) >= len(records) // 2
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == list(range(1, 25)) and "tokens_per_s" in logged[0]
    model = load_pretrained(tmp_path / "final")  # the HF layout, MAE head left out
    assert model.spec.text.num_layers == 2


def test_stage2_learns(tmp_path, pair_folder):
    losses = _losses(run(cl_config(tmp_path, pair_folder, max_steps=16)))
    assert sum(losses[-4:]) / 4 < 0.7 * sum(losses[:4]) / 4


@pytest.mark.parametrize("stage", ["cpt", "cl"])
def test_resume_continues_exactly(tmp_path, documents, pair_folder, stage):
    def config(out):
        return (
            cpt_config(out, checkpoint_every=3) if stage == "cpt" else cl_config(out, pair_folder, checkpoint_every=3)
        )

    data = {"documents": documents} if stage == "cpt" else {}
    full = _losses(run(config(tmp_path / "full"), **data))
    first = _losses(run(config(tmp_path / "cut"), stop_after=5, **data))  # interrupted after step 5
    rest = _losses(run(config(tmp_path / "cut"), resume=True, **data))  # resumes from step 5's checkpoint
    assert first == full[:5]
    assert rest == full[5:]


def test_crash_during_checkpoint_write_keeps_the_previous_one(tmp_path, documents, monkeypatch):
    run(cpt_config(tmp_path, max_steps=4, checkpoint_every=2), documents=documents, stop_after=2)
    assert checkpoint.complete_checkpoints(tmp_path / "checkpoints")[-1].name == "step-0000002"
    real = checkpoint.save_pretrained

    def crash(model, path, state_dict=None):
        real(model, path, state_dict)
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(checkpoint, "save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        run(cpt_config(tmp_path, max_steps=4, checkpoint_every=2), documents=documents, resume=True)
    monkeypatch.undo()
    # An exception in the write (unlike a kill, tests/trainers/test_faults.py) removes the half-written folder.
    assert not (tmp_path / "checkpoints" / "step-0000004.tmp").exists()
    assert checkpoint.complete_checkpoints(tmp_path / "checkpoints")[-1].name == "step-0000002"
    records = run(cpt_config(tmp_path, max_steps=4, checkpoint_every=2), documents=documents, resume=True)
    assert [r["step"] for r in records] == [3, 4]


def test_grad_cache_gradients_equal_the_direct_computation(tmp_path, pair_folder):
    def gradients(grad_cache_tokens):
        config = cl_config(tmp_path, pair_folder, grad_cache_tokens=grad_cache_tokens)
        tokenizer = build_tokenizer(config)
        processor = build_processor(config, tokenizer)
        model = build_model(config, tokenizer, torch.device("cpu"))
        pairs = PairDataset(pair_subsets(config.data), negative_ratio=2)
        stage = ContrastiveFinetuning(config, model, processor, torch.device("cpu"), 0, 1, pairs=pairs)
        encoded = EncodedPairs(pairs, processor)
        batch = ContrastiveCollator(processor, grad_cache_tokens)([encoded[(0, i)] for i in range(8)])
        loss = stage.train_step(batch)["loss"]
        return loss, len(batch.chunks), {n: p.grad.clone() for n, p in model.named_parameters()}

    direct_loss, one, direct = gradients(None)
    cached_loss, many, cached = gradients(96)
    assert one == 1 and many > 3  # GradCache really split the batch
    assert abs(direct_loss - cached_loss) <= 1e-6
    scale = max(g.abs().max().item() for g in direct.values())
    for name, grad in direct.items():
        assert (grad - cached[name]).abs().max().item() <= 1e-5 * max(1.0, scale), name


def _reference_stage1_checkpoint(path, config):
    """A stage-1 checkpoint as the reference saves it: the backbone (4.x flat keys) and, in the same safetensors,
    its MAE head as `mae_decoder.*` / `mae_proj.*`; returns the head's tensors."""
    from safetensors.torch import load_file, save_file

    from moca_fast.model.heads import MaeHead
    from moca_fast.model.loading import save_pretrained

    tokenizer = build_tokenizer(config)
    model = build_model(config, tokenizer, torch.device("cpu"))
    save_pretrained(model, path)
    tokenizer.save_pretrained(path)
    head = {k: torch.randn_like(v) for k, v in MaeHead.from_middle_layer(model).reference_state_dict().items()}
    save_file({**load_file(path / "model.safetensors"), **head}, path / "both.safetensors", metadata={"format": "pt"})
    (path / "both.safetensors").replace(path / "model.safetensors")  # never write over a file being read
    return head


def test_reference_stage1_checkpoint_continues_in_both_stages(tmp_path, documents, pair_folder, caplog):
    from moca_fast.trainers.cpt import ContinualPretraining

    head = _reference_stage1_checkpoint(tmp_path / "ref", cpt_config(tmp_path / "unused"))
    config = cpt_config(tmp_path / "cpt", model=str(tmp_path / "ref"), tokenizer=None, max_steps=2)
    tokenizer = build_tokenizer(config)
    model = build_model(config, tokenizer, torch.device("cpu"))
    stage = ContinualPretraining(
        config, model, build_processor(config, tokenizer), torch.device("cpu"), 0, 1, documents=documents
    )
    continued = stage.mae.reference_state_dict()  # stage 1 continues the reference's head as it was saved
    assert continued.keys() == head.keys() and all(torch.equal(continued[k], head[k]) for k in head)
    assert len(run(config, documents=documents)) == 2
    with caplog.at_level("INFO"):  # stage 2 leaves the head out and says so
        records = run(cl_config(tmp_path / "cl", pair_folder, model=str(tmp_path / "ref"), tokenizer=None, max_steps=2))
    assert len(records) == 2 and "its stage-1 MAE head (" in caplog.text and "left out" in caplog.text


def test_a_stage1_step_exports_with_its_head_also_from_before_checkpoint_markers(tmp_path, documents, capsys):
    """`moca-fast export-stage1` on a step folder of this version, and on one as moca_fast wrote them before
    checkpoint.json (no marker, trainer_state.json without a format, the MAE projection patch-major): a model
    folder in the reference's stage-1 form whose head is the trained one, which stage 1 continues."""
    import shutil

    from moca_fast.cli import main
    from moca_fast.model.heads import MaeHead
    from moca_fast.model.loading import read_mae_head
    from moca_fast.trainers.cpt import initial_mae_head

    run(cpt_config(tmp_path / "run", max_steps=2, checkpoint_every=2), documents=documents)
    step = tmp_path / "run" / "checkpoints" / "step-0000002"
    trained = torch.load(step / "extra.pt", weights_only=True)
    old = tmp_path / "old-step"
    shutil.copytree(step, old)
    (old / checkpoint.MARKER).unlink()
    (old / "trainer_state.json").write_text(json.dumps({"step": 2, "epoch": 0, "position": 2}))
    patch_major = {
        k: v.reshape(-1, 4, *v.shape[1:]).transpose(0, 1).reshape(v.shape) if k.startswith("proj.") else v
        for k, v in trained.items()
    }  # rows d * 4 + p back to p * 1176 + d
    assert not torch.equal(patch_major["proj.weight"], trained["proj.weight"])
    torch.save(patch_major, old / "extra.pt")
    config = cpt_config(tmp_path / "unused")
    model = build_model(config, build_tokenizer(config), torch.device("cpu"))
    for source, out in [(step, tmp_path / "now"), (old, tmp_path / "then")]:
        assert main(["export-stage1", str(source), str(out)]) == 0
        assert MaeHead.from_reference(model, read_mae_head(out)).state_dict().keys() == trained.keys()
        continued = initial_mae_head(model, str(out)).state_dict()
        assert all(torch.equal(continued[k], trained[k]) for k in trained), out
    assert (
        len(
            run(
                cpt_config(tmp_path / "again", model=str(tmp_path / "then"), tokenizer=None, max_steps=1),
                documents=documents,
            )
        )
        == 1
    )
    for args, message in [
        ([str(old), str(tmp_path / "then")], "exists; name a new folder"),
        ([str(tmp_path / "run" / "final"), str(tmp_path / "x")], "not a moca_fast step checkpoint"),
    ]:
        with pytest.raises(SystemExit):
            main(["export-stage1", *args])
        assert message in capsys.readouterr().err


def test_checkpoints_hold_the_declared_dtype_and_the_processor_and_resume_exactly(tmp_path, documents):
    """Started from a checkpoint whose config declares bfloat16 (as Qwen's does): each checkpoint's model/ and
    final/ hold bf16 weights with the tokenizer, processor settings and sentence-transformers files beside them;
    the fp32 master weights beside it keep resume exact."""
    from safetensors.torch import load_file

    from moca_fast.data.processor import saved_settings
    from moca_fast.model.loading import save_pretrained

    source = tmp_path / "source"
    base = cpt_config(tmp_path / "unused")
    tokenizer = build_tokenizer(base)
    model = build_model(base, tokenizer, torch.device("cpu"))
    model.spec.hf_config["dtype"] = "bfloat16"
    save_pretrained(model, source)
    tokenizer.save_pretrained(source)

    def config(out):
        return cpt_config(out, model=str(source), tokenizer=None, checkpoint_every=2, max_steps=4)

    full = _losses(run(config(tmp_path / "full"), documents=documents))
    first = _losses(run(config(tmp_path / "cut"), documents=documents, stop_after=2))
    rest = _losses(run(config(tmp_path / "cut"), documents=documents, resume=True))
    assert first + rest == full
    step = tmp_path / "cut" / "checkpoints" / "step-0000002"
    assert {t.dtype for t in load_file(step / "model" / "model.safetensors").values()} == {torch.bfloat16}
    assert {t.dtype for t in load_file(step / "master" / "model.safetensors").values()} == {torch.float32}
    final = tmp_path / "full" / "final"
    assert json.loads((final / "config.json").read_text())["dtype"] == "bfloat16"
    assert saved_settings(final) == {"min_pixels": 3136, "max_pixels": 3136, "max_length": 256}
    assert (final / "modules.json").is_file() and (final / "tokenizer.json").is_file()
