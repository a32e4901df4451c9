"""Stage-1 masking: rates within statistical bounds, special/image tokens never MLM-masked, exact MAE targets."""

import math

import torch

from moca_fast.data.batch import pack_sequences
from moca_fast.data.masking import apply_mae, apply_mlm
from moca_fast.data.tokens import IMAGE_PLACEHOLDER


def _doc(processor, make_image, n_images=2, words=60):
    text = " ".join(["the red circle is left of two blue squares"] * (words // 10))
    body = f"{text} {IMAGE_PLACEHOLDER} {text} " * n_images
    return processor.encode(body, [make_image(112, 168) for _ in range(n_images)], "doc")


def test_mlm_rate_and_eligibility(processor, make_image):
    seq = _doc(processor, make_image)
    eligible = ~torch.isin(seq.input_ids, processor.special_ids)
    n, total = int(eligible.sum()), 0
    for trial in range(20):
        g = torch.Generator().manual_seed(trial)
        out = apply_mlm(
            seq, mask_token_id=processor.mask_token_id, special_ids=processor.special_ids, rate=0.4, generator=g
        )
        assert eligible[out.mlm_positions].all()  # never a special or image token
        assert torch.equal(out.mlm_labels, seq.input_ids[out.mlm_positions])
        assert (out.input_ids[out.mlm_positions] == processor.mask_token_id).all()
        untouched = torch.ones_like(eligible)
        untouched[out.mlm_positions] = False
        assert torch.equal(out.input_ids[untouched], seq.input_ids[untouched])
        total += out.mlm_positions.numel()
    trials = 20 * n
    std = math.sqrt(trials * 0.4 * 0.6)
    assert abs(total - 0.4 * trials) < 5 * std, (total, trials)


def test_mae_targets_and_noise_exactly_at_chosen_tokens(processor, make_image):
    seq = _doc(processor, make_image, n_images=3)
    g = torch.Generator().manual_seed(3)
    out = apply_mae(seq, image_token_id=processor.image_token_id, rate=0.5, generator=g)
    image_rows = torch.nonzero(seq.input_ids == processor.image_token_id).flatten()
    per_image = (seq.image_grid_thw.prod(-1) // 4).tolist()
    assert out.mae_positions.numel() == sum(round(0.5 * n) for n in per_image)
    assert torch.isin(out.mae_positions, image_rows).all()
    units = torch.searchsorted(image_rows, out.mae_positions)  # merged-token index over the images
    rows = (units[:, None] * 4 + torch.arange(4)).flatten()
    assert torch.equal(out.mae_targets, seq.pixel_values[rows])  # the original patches
    noise = out.pixel_values[rows]
    assert torch.equal(noise, noise[:1].expand_as(noise))  # one shared noise vector
    assert not torch.equal(noise[0], seq.pixel_values[rows[0]])
    kept = torch.ones(seq.pixel_values.shape[0], dtype=torch.bool)
    kept[rows] = False
    assert torch.equal(out.pixel_values[kept], seq.pixel_values[kept])  # nothing else touched


def test_masks_are_deterministic_by_generator_and_pack_with_offsets(processor, make_image):
    seqs = [_doc(processor, make_image, n_images=k) for k in (1, 2)]

    def masked(seed):
        g = torch.Generator().manual_seed(seed)
        out = []
        for s in seqs:
            s = apply_mlm(
                s, mask_token_id=processor.mask_token_id, special_ids=processor.special_ids, rate=0.4, generator=g
            )
            out.append(apply_mae(s, image_token_id=processor.image_token_id, rate=0.5, generator=g))
        return out

    a, b = masked(5), masked(5)
    assert all(
        torch.equal(x.input_ids, y.input_ids) and torch.equal(x.pixel_values, y.pixel_values) for x, y in zip(a, b)
    )
    batch = pack_sequences(a, processor.image_token_id)
    assert torch.equal(batch.input_ids[batch.mlm_index], torch.full_like(batch.mlm_labels, processor.mask_token_id))
    assert (batch.input_ids[batch.mae_index] == processor.image_token_id).all()
    assert batch.mae_targets.shape == (4 * batch.mae_index.numel(), 1176)
    unmasked = torch.cat([s.input_ids for s in seqs])
    assert torch.equal(unmasked[batch.mlm_index], batch.mlm_labels)


def test_mae_masks_each_image_of_a_document_by_its_own_count(processor, make_image):
    """Images of different sizes: each gets round(rate * n) of its own merged tokens, none chosen twice. An index
    not offset per image would put every choice into the first image and leave the later ones unmasked."""
    seq = processor.encode(
        f"{IMAGE_PLACEHOLDER} a {IMAGE_PLACEHOLDER} b {IMAGE_PLACEHOLDER}",
        [make_image(56, 56), make_image(112, 84), make_image(84, 140)],
        "doc",
    )
    out = apply_mae(seq, image_token_id=processor.image_token_id, rate=0.5, generator=torch.Generator().manual_seed(0))
    image_rows = torch.nonzero(seq.input_ids == processor.image_token_id).flatten()
    per_image = (seq.image_grid_thw.prod(-1) // 4).tolist()
    owner = torch.repeat_interleave(torch.arange(len(per_image)), torch.tensor(per_image))
    chosen_owner = owner[torch.searchsorted(image_rows, out.mae_positions)]
    assert out.mae_positions.unique().numel() == out.mae_positions.numel()
    assert torch.bincount(chosen_owner, minlength=len(per_image)).tolist() == [round(0.5 * n) for n in per_image]
