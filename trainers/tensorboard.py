"""TensorBoard logging of the training metrics (config `tensorboard: true`; needs the tensorboard package): every
numeric value of each logged step as the scalar `train/<name>`, under output_dir/tensorboard."""

from __future__ import annotations

import os


class TensorBoardWriter:
    def __init__(self, log_dir: str | os.PathLike):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:
            raise ImportError(
                "tensorboard: true needs the tensorboard package: pip install 'moca-fast[tensorboard]'"
            ) from error
        self.writer = SummaryWriter(str(log_dir))

    def log(self, record: dict) -> None:
        for name, value in record.items():
            if name != "step" and isinstance(value, (int, float)):
                self.writer.add_scalar(f"train/{name}", value, record["step"])

    def close(self) -> None:
        self.writer.close()
