"""Stage-1 heads: the MAE layer on masked queries equals the whole-sequence layer then gathered; losses match
plain torch computations on materialised logits/predictions."""

import pytest
import torch
import torch.nn.functional as F

from moca_fast.data.masking import apply_mae, apply_mlm
from moca_fast.data.tokens import IMAGE_PLACEHOLDER
from moca_fast.integrations.transformers import from_transformers
from moca_fast.model.attention import Segments
from moca_fast.model.heads import MaeHead, mlm_loss
from moca_fast.model.text import text_rotary

from .conftest import pack


@pytest.fixture
def masked_batch(processor, make_image):
    g = torch.Generator().manual_seed(0)
    seqs = []
    for i, sizes in enumerate([[(112, 84)], [], [(56, 56), (140, 112)]]):
        text = "words " + " and ".join([IMAGE_PLACEHOLDER] * len(sizes)) + " more words"
        seq = processor.encode(text, [make_image(*s) for s in sizes], f"s{i}")
        seq = apply_mlm(
            seq, mask_token_id=processor.mask_token_id, special_ids=processor.special_ids, rate=0.4, generator=g
        )
        seqs.append(apply_mae(seq, image_token_id=processor.image_token_id, rate=0.5, generator=g))
    return pack(seqs, processor)


def test_mae_layer_on_masked_queries_equals_whole_sequence_then_gather(hf_model, masked_batch, attention_backend):
    """Queries on the masked rows only (their own bounds) against keys of whole documents, forward and backward,
    equal the layer over every row then gathered, computed with SDPA (the per-document oracle)."""
    model = from_transformers(hf_model)
    head = MaeHead.from_middle_layer(model)
    hidden = model(masked_batch).detach()
    h1 = hidden.clone().requires_grad_()
    restricted = head.features(h1, masked_batch, attention_backend)
    h2 = hidden.clone().requires_grad_()
    cos, sin = text_rotary(model.spec.text, masked_batch.position_ids)
    whole = Segments.build(masked_batch.cu_seqlens, masked_batch.max_seqlen, masked_batch.num_tokens, "sdpa")
    full = head.layer(h2, cos, sin, whole)[masked_batch.mae_index]
    torch.testing.assert_close(restricted, full, rtol=0, atol=1e-5)
    weights = torch.randn_like(full)
    grads1 = torch.autograd.grad((restricted * weights).sum(), [h1, *head.layer.parameters()])
    grads2 = torch.autograd.grad((full * weights).sum(), [h2, *head.layer.parameters()])
    for a, b in zip(grads1, grads2):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_mae_head_initialised_from_middle_layer(hf_model):
    model = from_transformers(hf_model)
    head = MaeHead.from_middle_layer(model)
    middle = model.language_model.layers[model.spec.text.num_layers // 2]
    for (name, a), b in zip(head.layer.state_dict().items(), middle.state_dict().values()):
        assert torch.equal(a, b), name
    assert head.proj.out_features == 4 * 1176


def test_losses_match_materialised_torch(hf_model, masked_batch):
    model = from_transformers(hf_model)
    head = MaeHead.from_middle_layer(model)
    hidden = model(masked_batch)
    logits = hidden[masked_batch.mlm_index].double() @ model.lm_head.weight.double().T
    expected_mlm = F.cross_entropy(logits, masked_batch.mlm_labels)
    torch.testing.assert_close(mlm_loss(model, hidden, masked_batch).double(), expected_mlm, rtol=1e-5, atol=1e-6)
    features = head.features(hidden, masked_batch, "sdpa")
    predictions = F.linear(features.double(), head.proj.weight.double(), head.proj.bias.double())
    # The reference's layout, einops "b (d p) -> (b p) d": output d * 4 + p is value d of patch p.
    patches = predictions.reshape(features.shape[0], -1, 4).transpose(1, 2).reshape(-1, 1176)
    expected_mae = F.mse_loss(patches, masked_batch.mae_targets.double())
    torch.testing.assert_close(head(hidden, masked_batch, "sdpa").double(), expected_mae, rtol=1e-5, atol=1e-6)


def test_mae_head_on_a_pack_without_images(hf_model, processor, attention_backend):
    """A stage-1 micro-batch of text only: the MAE layer has no queries; its loss is 0, every head parameter
    still takes part in the backward (zero gradients), as FSDP needs."""
    g = torch.Generator().manual_seed(0)
    seqs = [
        apply_mlm(
            processor.encode(text, [], f"t{i}"),
            mask_token_id=processor.mask_token_id,
            special_ids=processor.special_ids,
            rate=0.4,
            generator=g,
        )
        for i, text in enumerate(["only words here", "and some more words"])
    ]
    batch = pack(
        [apply_mae(s, image_token_id=processor.image_token_id, rate=0.5, generator=g) for s in seqs], processor
    )
    assert batch.mae_index.numel() == 0
    model = from_transformers(hf_model, attention_backend=attention_backend)
    head = MaeHead.from_middle_layer(model)
    loss = head(model(batch), batch, attention_backend)
    loss.backward()
    assert loss.item() == 0.0
    for name, param in head.named_parameters():
        assert param.grad is not None and not param.grad.any(), name
