"""Checkpoint loading in both transformers key layouts (tied and untied heads) and saving in the HF layout."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from moca_fast.integrations.transformers import make_bidirectional
from moca_fast.model.loading import KEY_LAYOUTS, convert_key, detect_layout, load_pretrained, save_pretrained
from moca_fast.model.tiny import tiny_hf_config

from .conftest import bidirectional_hf_model, hf_hidden, pack


def _hf_lm(tokenizer, tied: bool):
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(11 if tied else 12)
    return bidirectional_hf_model(
        tiny_hf_config(tokenizer, tie_word_embeddings=tied), Qwen2_5_VLForConditionalGeneration
    )


def _rewrite(src, dst, layout):
    """A copy of a checkpoint with its keys rewritten into `layout` (flat: 4.x, nested: 5.x in-memory names)."""
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    state = load_file(src / "model.safetensors")
    source = detect_layout(state)
    rewritten = {convert_key(convert_key(k, source), layout, to_ours=False): v for k, v in state.items()}
    assert detect_layout(rewritten) == layout
    save_file(rewritten, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def _assert_same_hidden(ours, hf_model, sequences, processor):
    with torch.no_grad():
        hidden = ours(pack(sequences, processor))
    inner = hf_model.model
    for i, seq in enumerate(sequences):
        start = sum(len(s) for s in sequences[:i])
        ref = hf_hidden(inner, seq, processor.image_token_id)
        assert (hidden[start : start + len(seq)] - ref).abs().max().item() <= 1e-4, seq.sample_id


@pytest.mark.parametrize("tied", [True, False])
def test_load_both_layouts_tied_and_untied(tmp_path, tokenizer, processor, mixed_sequences, tied):
    hf_model = _hf_lm(tokenizer, tied)
    saved = _saved(hf_model, tmp_path / "saved")
    for directory in (_rewrite(saved, tmp_path / "flat", "flat"), _rewrite(saved, tmp_path / "nested", "nested")):
        ours = load_pretrained(directory).eval()
        _assert_same_hidden(ours, hf_model, mixed_sequences[:2], processor)
        torch.testing.assert_close(ours.lm_head.weight, hf_model.lm_head.weight, rtol=0, atol=0)
        assert (ours.lm_head.weight is ours.language_model.embed_tokens.weight) == tied


@pytest.mark.parametrize("tied", [True, False])
def test_saved_checkpoint_loads_in_transformers_and_back(tmp_path, tokenizer, processor, mixed_sequences, tied):
    from transformers import Qwen2_5_VLForConditionalGeneration

    ours = load_pretrained(_saved(_hf_lm(tokenizer, tied), tmp_path / "src")).eval()
    save_pretrained(ours, tmp_path / "ours")
    keys = load_file(tmp_path / "ours" / "model.safetensors").keys()
    assert "model.embed_tokens.weight" in keys and ("lm_head.weight" in keys) != tied  # the flat 4.x layout
    hf_model = make_bidirectional(Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "ours").eval())
    _assert_same_hidden(ours, hf_model, mixed_sequences, processor)
    again = load_pretrained(tmp_path / "ours")
    for (name, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


def test_sharded_save_round_trips(tmp_path, tokenizer, monkeypatch):
    import moca_fast.model.loading as loading

    ours = load_pretrained(_saved(_hf_lm(tokenizer, False), tmp_path / "src"))
    monkeypatch.setattr(loading, "SHARD_BYTES", 64 * 1024)
    save_pretrained(ours, tmp_path / "sharded")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    again = load_pretrained(tmp_path / "sharded")
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), again.state_dict().values()))


def test_bad_checkpoints_raise_clear_errors(tmp_path, tokenizer):
    src = _saved(_hf_lm(tokenizer, False), tmp_path / "src")
    state = load_file(src / "model.safetensors")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((src / "config.json").read_text())
    state = {convert_key(convert_key(k, detect_layout(state)), "nested", to_ours=False): v for k, v in state.items()}
    missing = {k: v for k, v in state.items() if "layers.1.mlp.up_proj" not in k}
    save_file(missing, broken / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing keys \['language_model.layers.1.mlp.up_proj.weight'\]"):
        load_pretrained(broken)
    wrong = dict(state)
    wrong["model.language_model.norm.weight"] = torch.ones(3)
    save_file(wrong, broken / "model.safetensors")
    with pytest.raises(ValueError, match=r"language_model.norm.weight has shape \(3,\)"):
        load_pretrained(broken)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_pretrained(tmp_path / "nowhere")


def test_key_table_round_trips_every_layout():
    for layout, pairs in KEY_LAYOUTS.items():
        for theirs, _ours in pairs:
            key = theirs + "x.weight"
            assert convert_key(convert_key(key, layout), layout, to_ours=False) == key


def _saved(hf_model, path):
    hf_model.save_pretrained(path)
    return path


def test_transformers_loads_a_saved_checkpoint_bidirectional_with_our_hidden_states(
    tmp_path, tokenizer, processor, mixed_sequences
):
    """No make_bidirectional here: `is_causal: false` in the saved text config alone makes transformers' model
    bidirectional, with and without padding (fp32, 1e-5)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    ours = load_pretrained(_saved(_hf_lm(tokenizer, True), tmp_path / "src")).eval()
    ours.spec.hf_config["text_config"].pop("is_causal", None)  # as a causal Qwen2.5-VL starting point has it
    save_pretrained(ours, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["text_config"]["is_causal"] is False
    hf_model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        hidden = ours(pack(mixed_sequences, processor))
    starts = [sum(len(s) for s in mixed_sequences[:i]) for i in range(len(mixed_sequences))]
    for seq, start in zip(mixed_sequences, starts):
        ref = hf_hidden(hf_model.model, seq, processor.image_token_id)
        assert (hidden[start : start + len(seq)] - ref).abs().max().item() <= 1e-5, seq.sample_id
    text = [s for s in mixed_sequences if not s.pixel_values.shape[0]] + [processor.encode("a short one", [], "short")]
    length = max(len(s) for s in text)
    ids = torch.full((len(text), length), tokenizer.pad_token_id)
    mask = torch.zeros(len(text), length, dtype=torch.long)
    for row, seq in enumerate(text):
        ids[row, : len(seq)], mask[row, : len(seq)] = seq.input_ids, 1
    with torch.no_grad():
        padded = hf_model.model(input_ids=ids, attention_mask=mask, mm_token_type_ids=torch.zeros_like(ids))
        packed = ours(pack(text, processor))
    assert (padded.last_hidden_state[0, : len(text[0])] - packed[: len(text[0])]).abs().max().item() <= 1e-5
    assert (padded.last_hidden_state[1, : len(text[1])] - packed[len(text[0]) :]).abs().max().item() <= 1e-5


def test_weights_are_saved_in_the_dtype_the_config_declares(tmp_path, tokenizer):
    ours = load_pretrained(_saved(_hf_lm(tokenizer, False), tmp_path / "src"))
    assert save_pretrained(ours, tmp_path / "as-is") == torch.float32  # no dtype declared: the weights' own
    assert json.loads((tmp_path / "as-is" / "config.json").read_text())["dtype"] == "float32"
    ours.spec.hf_config["dtype"] = "bfloat16"  # as Qwen2.5-VL's config.json declares
    assert save_pretrained(ours, tmp_path / "bf16") == torch.bfloat16
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    saved = load_file(tmp_path / "bf16" / "model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    again = load_pretrained(tmp_path / "bf16")
    for (name, a), b in zip(ours.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a.to(torch.bfloat16).float(), b), name
    assert save_pretrained(ours, tmp_path / "fp32", dtype=torch.float32) == torch.float32  # explicit wins


def test_processor_settings_travel_with_the_checkpoint(tmp_path, tokenizer):
    """The tokenizer (mask token included) and transformers' image processor config, read back by transformers'
    Auto classes (what AutoProcessor assembles; its video processor needs torchvision) and by moca_fast."""
    from transformers import AutoImageProcessor, AutoTokenizer

    from moca_fast.data.processor import Processor, saved_settings

    Processor(tokenizer, min_pixels=4 * 784, max_pixels=16 * 784, max_length=300).save_pretrained(tmp_path)
    assert saved_settings(tmp_path) == {"min_pixels": 4 * 784, "max_pixels": 16 * 784, "max_length": 300}
    image_processor = AutoImageProcessor.from_pretrained(tmp_path)
    assert (image_processor.size.shortest_edge, image_processor.size.longest_edge) == (4 * 784, 16 * 784)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.mask_token == "<|mask|>" and loaded.model_max_length == 300
    assert saved_settings(tmp_path / "nowhere") == {}
    qwen = tmp_path / "qwen"  # the image processor of Qwen2.5-VL-*-Instruct: not the budget a MoCa model needs
    qwen.mkdir()
    (qwen / "preprocessor_config.json").write_text(json.dumps({"min_pixels": 3136, "max_pixels": 12845056}))
    assert saved_settings(qwen) == {}


def test_auto_processor_loads_a_saved_checkpoint(tmp_path, tokenizer):
    pytest.importorskip("torchvision", reason="Qwen2.5-VL's AutoProcessor builds a video processor: torchvision")
    from transformers import AutoProcessor

    from moca_fast.data.processor import Processor

    ours = load_pretrained(_saved(_hf_lm(tokenizer, True), tmp_path / "src"))
    save_pretrained(ours, tmp_path / "ours")
    Processor(tokenizer, min_pixels=4 * 784, max_pixels=16 * 784).save_pretrained(tmp_path / "ours")
    processor = AutoProcessor.from_pretrained(tmp_path / "ours")
    assert processor.image_processor.size.longest_edge == 16 * 784


def test_loading_and_saving_need_no_integration():
    """model/ sits below integrations/: loading and saving a checkpoint import nothing of moca_fast.integrations."""
    code = (
        "import sys, moca_fast.model.loading; "
        "print(sorted(m for m in sys.modules if m.startswith('moca_fast.integrations')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
