"""What ends a run early without losing work: SIGTERM/SIGINT (finish the step, save, exit non-zero) and a
non-finite loss or gradient norm (stop before the update, naming the step and its samples, or skip it)."""

from __future__ import annotations

import signal
import threading

import torch

from ..parallel.distributed import all_reduce_sum, world_size


class TrainingStopped(RuntimeError):
    """The run stopped before its end on purpose; `exit_code` is what the command returns."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


class StopSignals:
    """While active, SIGTERM and SIGINT only record a request, which `requested` reports once every rank has
    finished the current step (schedulers send SIGTERM some time before they kill a job). A second SIGINT
    interrupts at once, as Ctrl-C normally does. Handlers are installed only in the main thread."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, device: torch.device):
        self.device, self.received, self._previous = device, 0, {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def requested(self) -> int:
        """The signal that asks this run to stop (0: none); every rank gets the same answer."""
        if world_size() > 1:
            anyone = int(all_reduce_sum(torch.tensor([int(self.received != 0)], device=self.device)).item())
            return (self.received or int(signal.SIGTERM)) if anyone else 0
        return self.received

    @staticmethod
    def exit_code(signum: int) -> int:
        return 128 + signum  # what a shell reports for a process ended by that signal


def nonfinite_problem(step: int, loss: float, grad_norm: float, sample_ids: list[str]) -> str:
    shown = ", ".join(sample_ids[:8]) + (f" and {len(sample_ids) - 8} more" if len(sample_ids) > 8 else "")
    return f"step {step}: non-finite loss {loss} / gradient norm {grad_norm} on the samples [{shown}]"


NONFINITE_ADVICE = (
    "the update was not applied and nothing from this step was saved. Lower the learning rate, check "
    "those samples, or set skip_nonfinite: true to skip such steps (counted)"
)
