"""bench/reference_path.py computes what our engine computes: the same losses and gradients in both stages on the
same samples and weights (fp32, tiny model), with its attention on each CPU-testable backend (torch's varlen_attn
through the CPU oracle of its op, SDPA over segments), and its batching follows the reference (cost buckets,
padding)."""

import pytest
import torch

from bench.reference_path import MAX_COST, PAD_MULTIPLE, ReferencePath, cost_buckets, pad_sequences, sample_cost
from moca_fast.config import ModelSpec
from moca_fast.data.batch import pack_sequences
from moca_fast.data.masking import apply_mae, apply_mlm
from moca_fast.data.tokens import IMAGE_PLACEHOLDER as P
from moca_fast.integrations.transformers import to_transformers
from moca_fast.model.heads import MaeHead, mlm_loss
from moca_fast.model.loading import convert_key
from moca_fast.model.moca import MocaModel
from moca_fast.model.pooling import embed_pool
from moca_fast.model.tiny import tiny_hf_config
from moca_fast.trainers.cl import contrastive_loss


@pytest.fixture
def model(tokenizer):
    torch.manual_seed(3)
    return MocaModel(ModelSpec.from_hf_config(tiny_hf_config(tokenizer)), attention_backend="sdpa").init_weights()


def _grads(params) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in params if p.grad is not None}


def _grads_by_hf_name(model) -> dict[str, torch.Tensor]:
    return {convert_key(name, "nested", to_ours=False): grad for name, grad in _grads(model.named_parameters()).items()}


def _assert_same_grads(ours: dict, reference: dict, names):
    for name in names:
        scale = reference[name].abs().max()
        assert scale > 0, name
        torch.testing.assert_close(ours[name], reference[name], rtol=0, atol=2e-4 * scale, msg=name)


def test_stage1_loss_and_gradients_equal_ours(model, processor, make_image, attention_backend):
    g = torch.Generator().manual_seed(0)
    proc = processor
    sequences = []
    for i, (text, images) in enumerate(
        [
            (f"{P}a caption of the picture with a few words", [make_image(90, 120)]),
            ("a text-only document that is a little longer than the others, words and more words", []),
            (f"interleaved {P} text and {P} images", [make_image(60, 60), make_image(140, 84)]),
        ]
    ):
        seq = apply_mlm(
            proc.encode(text, images, f"doc{i}"),
            mask_token_id=proc.mask_token_id,
            special_ids=proc.special_ids,
            rate=0.4,
            generator=g,
        )
        sequences.append(apply_mae(seq, image_token_id=proc.image_token_id, rate=0.5, generator=g))
    # A stage-1 head as the reference's checkpoints store it (mae_decoder.*, mae_proj.*), random: ours loads it
    # through the name table and computes in the same output layout, or the losses and gradients below differ.
    tensors = {
        k: torch.randn_like(v) * 0.02 + (v if "norm" in k else 0)
        for k, v in MaeHead.from_middle_layer(model).reference_state_dict().items()
    }
    mae = MaeHead.from_reference(model, tensors)
    reference = ReferencePath(
        to_transformers(model).train(), activation_checkpointing=True, attention_backend=attention_backend
    ).with_mae(tensors)
    assert reference.attention == f"flash_varlen_{attention_backend}"  # varlen, as flash_attention_2 runs it

    batch = pack_sequences(sequences, proc.image_token_id)
    hidden = model(batch)
    ours_mlm, ours_mae = mlm_loss(model, hidden, batch), mae(hidden, batch, "sdpa")
    (ours_mlm + 0.1 * ours_mae).backward()
    padded = pad_sequences(sequences, tokenizer_pad(proc))
    assert padded.input_ids.shape[1] % PAD_MULTIPLE == 0 and (padded.attention_mask == 0).any()
    loss, ref_mlm, ref_mae = reference.cpt_loss(padded)
    loss.backward()

    torch.testing.assert_close(ref_mlm, ours_mlm, rtol=1e-5, atol=0)
    torch.testing.assert_close(ref_mae, ours_mae, rtol=1e-5, atol=0)
    _assert_same_grads(
        _grads_by_hf_name(model),
        _grads(reference.hf.named_parameters()),
        [
            "model.language_model.embed_tokens.weight",
            "model.language_model.layers.0.mlp.up_proj.weight",
            "model.visual.blocks.0.attn.qkv.weight",
            "model.visual.merger.mlp.0.weight",
        ],
    )
    _assert_same_grads(
        _grads(mae.named_parameters()),
        {
            **_grads(("layer." + n, p) for n, p in reference.mae_layer.named_parameters()),
            **_grads(("proj." + n, p) for n, p in reference.mae_proj.named_parameters()),
        },
        ["layer.self_attn.q_proj.weight", "layer.mlp.down_proj.weight", "proj.weight", "proj.bias"],
    )


def tokenizer_pad(processor) -> int:
    return processor.tokenizer.pad_token_id


def test_stage2_loss_and_gradients_equal_ours(model, processor, make_image, attention_backend):
    proc = processor
    queries = [
        proc.encode(
            f"{P}Represent the given image with the following question: what is it?\n", [make_image(80, 100)], "q0"
        ),
        proc.encode("Find me an everyday image that matches the given caption: two dots\n", [], "q1"),
        proc.encode("a plain query", [], "q2"),
    ]
    positives = [
        proc.encode("an answer", [], "p0"),
        proc.encode(f"{P}Represent the given image.\n", [make_image(70, 70)], "p1"),
        proc.encode("the positive text of the third query, longer than the rest", [], "p2"),
    ]
    negatives = [proc.encode(f"negative {i} {'words ' * i}", [], f"n{i}") for i in range(6)]
    temperature = 0.03
    reference = ReferencePath(
        to_transformers(model).train(), activation_checkpointing=True, attention_backend=attention_backend
    )

    class Roles:  # what contrastive_loss reads of a ContrastiveBatch
        num_pairs, num_negatives, duplicate_ids = 3, 2, None

    batch = pack_sequences(queries + positives + negatives, proc.image_token_id)
    ours_loss = contrastive_loss(embed_pool(model(batch), batch.cu_seqlens), Roles, temperature, mask_duplicates=False)
    ours_loss.backward()
    pad = tokenizer_pad(proc)
    ref_loss = reference.cl_loss(
        pad_sequences(queries, pad), pad_sequences(positives, pad), pad_sequences(negatives, pad), temperature
    )
    ref_loss.backward()

    torch.testing.assert_close(ref_loss, ours_loss, rtol=1e-5, atol=0)
    _assert_same_grads(
        _grads_by_hf_name(model),
        _grads(reference.hf.named_parameters()),
        [
            "model.language_model.embed_tokens.weight",
            "model.language_model.layers.1.self_attn.k_proj.weight",
            "model.visual.blocks.1.mlp.down_proj.weight",
        ],
    )


def test_cost_buckets_group_similar_costs_under_the_budget():
    costs = [5, 300, 40, 1280, 700, 41, 300, 9]
    buckets = cost_buckets(costs, budget=700)
    assert sorted(i for b in buckets for i in b) == list(range(len(costs)))
    for bucket in buckets:
        assert len(bucket) == 1 or sum(costs[i] for i in bucket) <= 700
    assert sorted(sorted(costs[i] for i in b) for b in buckets) == [[5, 9, 40, 41, 300, 300], [700], [1280]]


def test_sample_cost_counts_images_four_times_and_caps(processor, make_image):
    seq = processor.encode(f"three words {P}", [make_image(56, 56)], "s")
    image_tokens = int((seq.input_ids == processor.image_token_id).sum())
    assert sample_cost(seq, processor.image_token_id) == len(seq) - image_tokens + 4 * image_tokens + 2
    long = processor.encode("word " * 2000, [], "long")
    assert sample_cost(long, processor.image_token_id) == MAX_COST
