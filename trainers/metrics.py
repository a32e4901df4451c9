"""Training metrics: FLOPs of a packed batch (vision tower counted), MFU, JSON lines and a progress bar."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from ..config import ModelSpec

log = logging.getLogger(__name__)

# Dense bf16 tensor-core peaks (TFLOP/s) by device-name fragment; MFU is reported only where one is known.
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "L40S": 362.0, "B200": 2250.0}


def device_peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for key, tflops in BF16_PEAK_TFLOPS.items() if key in name), None)


def attention_pairs(cu_seqlens: torch.Tensor) -> float:
    """(query, key) pairs of full attention within every segment: sum of len^2."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).double()
    return float((lengths**2).sum())


def _attention_flops(cu_seqlens: torch.Tensor, width: int) -> float:
    """QK^T and AV over every segment: 4 * len^2 * width per layer, forward."""
    return 4.0 * attention_pairs(cu_seqlens) * width


def decoder_layer_flops(text, queries: int, keys: int, pairs: float) -> float:
    """Matmul FLOPs of one decoder layer's forward (TextSpec `text`): q/o projections and MLP over `queries` rows,
    k/v projections over `keys` rows, attention over `pairs` (query, key) pairs. A whole packed batch: queries =
    keys = tokens, pairs = attention_pairs(cu_seqlens); the MAE layer: its masked rows against their sequences."""
    kv = text.num_kv_heads * text.head_dim
    per_query = 2 * text.hidden_size**2 + 3 * text.hidden_size * text.intermediate_size
    return 2.0 * (queries * per_query + keys * 2 * text.hidden_size * kv) + 4.0 * pairs * text.hidden_size


def forward_flops(spec: ModelSpec, batch) -> float:
    """Matmul FLOPs of one forward of the backbone over a PackedBatch (text decoder + vision tower)."""
    t, v = spec.text, spec.vision
    tokens = batch.num_tokens
    flops = t.num_layers * decoder_layer_flops(t, tokens, tokens, attention_pairs(batch.cu_seqlens.cpu()))
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

    def __init__(
        self,
        path: str | Path | None,
        total_steps: int,
        initial_step: int = 0,
        enabled: bool = True,
        peak_flops: float | None = None,
    ):
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
            shown = {
                k: (f"{v:.4g}" if isinstance(v, float) else v)
                for k, v in record.items()
                if k in ("loss", "mlm", "mae", "tokens_per_s", "mfu", "max_memory_gb")
            }
            self._bar.set_postfix(shown, refresh=False)
            self._bar.update(1)
        return record

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
