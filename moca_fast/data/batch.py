"""PackedBatch: the one currency between data and model — many sequences concatenated, no padding.

Everything data-dependent (positions, vision windows, where image tokens sit, masked rows) is computed on the
CPU by `pack_sequences` so the model's forward needs no host synchronisation.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .positions import VisionLayout, vision_layout
from .processor import EncodedSequence


@dataclass
class PackedBatch:
    """S sequences, T tokens, I images, P patches (4 per merged image token).

    input_ids [T]; cu_seqlens [S+1] int32 sequence bounds; max_seqlen; position_ids [3, T] M-RoPE (t, h, w);
    pixel_values [P, 1176]; image_grid_thw [I, 3]; image_token_index [P/4] rows of image tokens in T;
    vision: the tower's window order and varlen bounds. Stage fields (None when unused):
    mlm_index/mlm_labels [M]: masked text rows and their original ids;
    mae_index [K] masked image-token rows, mae_targets [K*4, 1176] their original patches,
    mae_cu_seqlens [S+1] / mae_max_seqlen: how many masked rows each sequence holds (the MAE layer's queries).
    """

    input_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    position_ids: torch.Tensor
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor
    image_token_index: torch.Tensor
    vision: VisionLayout
    sample_ids: tuple[str, ...] = ()
    mlm_index: torch.Tensor | None = None
    mlm_labels: torch.Tensor | None = None
    mae_index: torch.Tensor | None = None
    mae_targets: torch.Tensor | None = None
    mae_cu_seqlens: torch.Tensor | None = None
    mae_max_seqlen: int = 0
    padding: bool = False  # a stand-in filling a rank's last round of an epoch: it runs, its loss weight is zero

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    @property
    def num_sequences(self) -> int:
        return self.cu_seqlens.numel() - 1

    def to(self, device, non_blocking: bool = False) -> PackedBatch:
        return map_tensors(self, lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> PackedBatch:
        return map_tensors(self, lambda t: t.pin_memory())


def map_tensors(obj, fn):
    """Apply `fn` to every tensor of a (nested) dataclass, returning a new one."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if dataclasses.is_dataclass(obj):
        return dataclasses.replace(
            obj, **{f.name: map_tensors(getattr(obj, f.name), fn) for f in dataclasses.fields(obj)}
        )
    return obj


def pack_sequences(
    sequences: list[EncodedSequence],
    image_token_id: int,
    *,
    spatial_merge_size: int = 2,
    window_size: int = 112,
    patch_size: int = 14,
) -> PackedBatch:
    """Concatenate encoded sequences into one PackedBatch, validating each; errors name the sample."""
    if not sequences:
        raise ValueError("cannot pack an empty list of sequences")
    unit = spatial_merge_size**2
    for seq in sequences:
        validate_sequence(seq, image_token_id, unit)
    lengths = torch.tensor([len(s) for s in sequences])
    starts = (lengths.cumsum(0) - lengths).tolist()
    input_ids = torch.cat([s.input_ids for s in sequences])
    grids = torch.cat([s.image_grid_thw.reshape(-1, 3) for s in sequences]).to(torch.long)
    stage = {}
    if _all_or_none(sequences, "mlm_positions"):
        stage["mlm_index"] = torch.cat([s.mlm_positions + o for s, o in zip(sequences, starts)])
        stage["mlm_labels"] = torch.cat([s.mlm_labels for s in sequences])
    if _all_or_none(sequences, "mae_positions"):
        stage["mae_index"] = torch.cat([s.mae_positions + o for s, o in zip(sequences, starts)])
        stage["mae_targets"] = torch.cat([s.mae_targets for s in sequences])
        counts = torch.tensor([s.mae_positions.numel() for s in sequences])
        stage["mae_cu_seqlens"] = torch.nn.functional.pad(counts.cumsum(0), (1, 0)).to(torch.int32)
        stage["mae_max_seqlen"] = int(counts.max())
    return PackedBatch(
        input_ids=input_ids,
        cu_seqlens=torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32),
        max_seqlen=int(lengths.max()),
        position_ids=torch.cat([s.position_ids for s in sequences], dim=1),
        pixel_values=torch.cat([s.pixel_values for s in sequences]),
        image_grid_thw=grids,
        image_token_index=torch.nonzero(input_ids == image_token_id).flatten(),
        vision=vision_layout(grids, spatial_merge_size, window_size, patch_size),
        sample_ids=tuple(s.sample_id for s in sequences),
        **stage,
    )


def _all_or_none(sequences: list[EncodedSequence], name: str) -> bool:
    present = [getattr(s, name) is not None for s in sequences]
    if any(present) and not all(present):
        lacking = [s.sample_id for s, p in zip(sequences, present) if not p]
        raise ValueError(f"samples {lacking[:5]} lack {name} while others in the batch have it")
    return all(present)


def validate_sequence(seq: EncodedSequence, image_token_id: int, merge_unit: int = 4) -> None:
    """Raise ValueError naming the sample when its tokens, patches, grids and positions disagree."""
    name = f"sample {seq.sample_id}"
    if seq.input_ids.ndim != 1 or seq.input_ids.numel() == 0:
        raise ValueError(f"{name}: empty sequence")
    if seq.position_ids.shape != (3, seq.input_ids.numel()):
        raise ValueError(
            f"{name}: position_ids {tuple(seq.position_ids.shape)} do not match "
            f"{seq.input_ids.numel()} tokens (expected (3, {seq.input_ids.numel()}))"
        )
    grids = seq.image_grid_thw.reshape(-1, 3)
    n_patches = int(grids.prod(-1).sum())
    if seq.pixel_values.shape[0] != n_patches:
        raise ValueError(f"{name}: {seq.pixel_values.shape[0]} patch rows but the image grids need {n_patches}")
    n_image_tokens = int((seq.input_ids == image_token_id).sum())
    if n_image_tokens * merge_unit != n_patches:
        raise ValueError(
            f"{name}: token/patch count mismatch: {n_image_tokens} image tokens need "
            f"{n_image_tokens * merge_unit} patches, got {n_patches}"
        )
