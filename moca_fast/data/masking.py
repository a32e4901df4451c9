"""Stage-1 masking of one encoded sequence: masked-language modelling on text and masked patches on images.

MLM: each non-special text token is replaced by `<|mask|>` with probability `rate` (default 0.4); labels are
the original ids, only there. MAE: in every image, round(rate * n) of its n merged tokens (default 0.5) are
chosen; their 4 patches are replaced by one Gaussian noise vector shared by the whole sequence and the
original patches kept as targets. Both are seeded by an explicit generator, so a sample's masks depend only
on (seed, epoch, sample index), never on worker scheduling.
"""

from __future__ import annotations

import dataclasses

import torch

from .processor import EncodedSequence


def apply_mlm(
    seq: EncodedSequence, *, mask_token_id: int, special_ids: torch.Tensor, rate: float, generator: torch.Generator
) -> EncodedSequence:
    """Replace text tokens by the mask id; records `mlm_positions` (in the sequence) and `mlm_labels`."""
    eligible = ~torch.isin(seq.input_ids, special_ids)
    chosen = eligible & (torch.rand(seq.input_ids.shape, generator=generator) < rate)
    positions = torch.nonzero(chosen).flatten()
    input_ids = seq.input_ids.clone()
    input_ids[positions] = mask_token_id
    return dataclasses.replace(
        seq, input_ids=input_ids, mlm_positions=positions, mlm_labels=seq.input_ids[positions].clone()
    )


def apply_mae(
    seq: EncodedSequence, *, image_token_id: int, rate: float, generator: torch.Generator, merge_unit: int = 4
) -> EncodedSequence:
    """Noise the patches of round(rate * n) merged tokens per image; records `mae_positions` and `mae_targets`.

    `mae_positions` are token rows in the sequence (where the MAE head reads hidden states); `mae_targets`
    [4K, 1176] are the original patch rows of those tokens, 4 consecutive rows per token.
    """
    per_image = (seq.image_grid_thw.prod(-1) // merge_unit).tolist()
    chosen, first = [], 0
    for n in per_image:
        k = round(rate * n)
        chosen.append(first + torch.randperm(n, generator=generator)[:k].sort().values)
        first += n
    units = torch.cat(chosen) if chosen else torch.zeros(0, dtype=torch.long)  # merged-token index over images
    rows = (units.unsqueeze(1) * merge_unit + torch.arange(merge_unit)).flatten()
    pixel_values = seq.pixel_values.clone()
    targets = seq.pixel_values[rows].clone()
    if rows.numel():
        noise = torch.randn(seq.pixel_values.shape[1], generator=generator)
        pixel_values[rows] = noise.to(pixel_values.dtype)
    image_rows = torch.nonzero(seq.input_ids == image_token_id).flatten()
    return dataclasses.replace(seq, pixel_values=pixel_values, mae_positions=image_rows[units], mae_targets=targets)
