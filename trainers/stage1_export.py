"""A stage-1 step checkpoint turned into a model folder that carries its MAE head, as the reference's stage-1
checkpoints do (`mae_decoder.*`, `mae_proj.*` beside the backbone's weights, projection rows d * 4 + p).

`moca-fast cpt --model OUT` then continues the head and `moca-fast cl --model OUT` leaves it out, as with a reference
checkpoint. It is also the way forward for step folders of moca_fast before checkpoints had a completeness marker
(not resumable now): their MAE projection is converted from the layout those versions wrote (p * 1176 + d). The
optimizer state is not carried over; a new run starts from these weights.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..model.heads import mae_state_from_patch_major, reference_names
from ..model.loading import declared_dtype, safetensors_files
from .checkpoint import FORMAT, MARKER, out_of_space_named, read_marker, verify_files

HEAD_FILE = "model-mae-head.safetensors"


def stored_format(step: Path) -> int:
    """The layout a step folder's files are in: its marker's format; before markers, trainer_state.json's (1 when
    it names none, as the versions that wrote the patch-major projection did)."""
    if (step / MARKER).is_file():
        return read_marker(step).get("format", FORMAT)
    if (step / "trainer_state.json").is_file():
        return json.loads((step / "trainer_state.json").read_text()).get("format", 1)
    raise ValueError(f"{step}: neither {MARKER} nor trainer_state.json: not a moca_fast step checkpoint")


def export_stage1(step: str | os.PathLike, output: str | os.PathLike) -> Path:
    """Write `step`'s model/ with its MAE head (extra.pt) under the reference's names into the new folder
    `output`, atomically (through `output`.tmp)."""
    step, output = Path(step), Path(output)
    if not (step / "model" / "config.json").is_file():
        raise ValueError(f"{step}: no model/config.json: not a moca_fast step checkpoint")
    if not (step / "extra.pt").is_file():
        raise ValueError(f"{step}: no extra.pt (the MAE head): a stage-2 checkpoint; its model/ is the model")
    if output.exists():
        raise ValueError(f"{output} exists; name a new folder")
    layout = stored_format(step)
    if layout not in (1, FORMAT):
        raise ValueError(f"{step}: format {layout}: written by a newer moca_fast")
    if (step / MARKER).is_file():
        verify_files(step, read_marker(step))
    head = torch.load(step / "extra.pt", weights_only=True)
    head = reference_names(mae_state_from_patch_major(head) if layout < 2 else head)
    declared = declared_dtype(json.loads((step / "model" / "config.json").read_text()))
    if declared is not None:  # stored as the backbone is
        head = {key: tensor.to(declared) for key, tensor in head.items()}

    tmp = output.with_name(output.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with out_of_space_named(tmp, f"the export of {step}"):  # no .tmp is left behind, whatever fails
        shutil.copytree(step / "model", tmp)
        files = safetensors_files(tmp)
        if files == ["model.safetensors"]:
            merged = {**load_file(tmp / "model.safetensors"), **head}
            save_file(merged, tmp / "merged.safetensors", metadata={"format": "pt"})
            os.replace(tmp / "merged.safetensors", tmp / "model.safetensors")  # never write over a file being read
        else:  # sharded: the head is one more shard in the index
            save_file(head, tmp / HEAD_FILE, metadata={"format": "pt"})
            index = json.loads((tmp / "model.safetensors.index.json").read_text())
            index["weight_map"].update(dict.fromkeys(head, HEAD_FILE))
            index.setdefault("metadata", {})["total_size"] = index.get("metadata", {}).get("total_size", 0) + sum(
                t.numel() * t.element_size() for t in head.values()
            )
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        os.replace(tmp, output)
    return output
