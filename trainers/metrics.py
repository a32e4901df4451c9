"""Training metrics: FLOPs of a packed batch (vision tower counted), MFU, JSON lines and a progress bar."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from moca_fast.config import ModelSpec

log = logging.getLogger(__name__)

# Dense bf16 tensor-core peaks (TFLOP/s) by device-name fragment; MFU is reported only where one is known.
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "L40S": 362.0, "B200": 2250.0}


def device_peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for key, tflops in BF16_PEAK_TFLOPS.items() if key in name), None)


def _attention_flops(cu_seqlens: torch.Tensor, width: int) -> float:
    """QK^T and AV over every segment: 4 * len^2 * width per layer, forward."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).double()
    return 4.0 * float((lengths**2).sum()) * width


def forward_flops(spec: ModelSpec, batch) -> float:
    """Matmul FLOPs of one forward of the backbone over a PackedBatch (text decoder + vision tower)."""
    t, v = spec.text, spec.vision
    kv = t.num_kv_heads * t.head_dim
    text_linear = t.hidden_size * (t.hidden_size + 2 * kv) + t.hidden_size**2 + 3 * t.hidden_size * t.intermediate_size
    flops = 2.0 * batch.num_tokens * text_linear * t.num_layers
    flops += t.num_layers * _attention_flops(batch.cu_seqlens.cpu(), t.hidden_size)
    patches = batch.pixel_values.shape[0]
    if patches:
        vision_linear = 4 * v.hidden_size**2 + 3 * v.hidden_size * v.intermediate_size
        flops += 2.0 * patches * (v.patch_dim * v.hidden_size + vision_linear * v.depth)
        merged = v.hidden_size * v.merge_unit
        flops += 2.0 * patches / v.merge_unit * (merged * merged + merged * v.out_hidden_size)
        n_full = len(v.fullatt_block_indexes)
        flops += n_full * _attention_flops(batch.vision.cu_seqlens.cpu(), v.hidden_size)
        flops += (v.depth - n_full) * _attention_flops(batch.vision.cu_window_seqlens.cpu(), v.hidden_size)
    return flops


class MetricsLogger:
    """Appends one JSON object per logged step to `path` and drives a tqdm progress bar (rank 0 only). The values'
    tokens and FLOPs are the whole job's; `peak_flops` is then the job's peak (one device's x ranks)."""

    def __init__(self, path: str | Path | None, total_steps: int, initial_step: int = 0, enabled: bool = True,
                 peak_flops: float | None = None):
        self.enabled = enabled
        self.peak_flops = peak_flops
        self.path = Path(path) if path is not None and enabled else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._bar = None
        if enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=initial_step, desc="train", dynamic_ncols=True)
        self._last = time.perf_counter()

    def log(self, step: int, values: dict) -> dict:
        """Add tokens/s, MFU (when the device peak is known) and memory to `values`; write and display."""
        now = time.perf_counter()
        seconds, self._last = now - self._last, now
        record = {"step": step, **values, "seconds": round(seconds, 4)}
        if "tokens" in values and seconds > 0:
            record["tokens_per_s"] = round(values["tokens"] / seconds, 1)
        if "flops" in values and seconds > 0 and self.peak_flops:
            record["mfu"] = round(values["flops"] / seconds / self.peak_flops, 4)
        if torch.cuda.is_available():
            record["max_memory_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
        if self.enabled:
            if self.path is not None:
                with self.path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
            shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in record.items()
                     if k in ("loss", "mlm", "mae", "tokens_per_s", "mfu", "max_memory_gb")}
            self._bar.set_postfix(shown, refresh=False)
            self._bar.update(1)
        return record

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
