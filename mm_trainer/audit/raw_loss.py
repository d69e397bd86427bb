"""The training loss as the model returned it, for the audit: before transformers' `logging_nan_inf_filter`.

With that filter on (the default) a NaN or infinite step loss is replaced, in the logged mean, by the mean of the
finite ones, so `log_history` can show a diverged run with a normal loss. [`RawLoss`] sums the same per-step
values the Trainer sums (`training_step`'s return) without the filter, on the device (no host sync per step), and
turns them into one logged value per logging window with the Trainer's own arithmetic (sum / optimizer steps, mean
over processes): equal to the logged `loss` whenever every step was finite, NaN / infinite when one was not.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch


class RawLoss:
    """Per-logging-window mean of the unfiltered training loss.

    Attributes:
        history: `{"step": optimizer step, "loss": value}` per logged window (value may be `nan` / `inf`).
    """

    def __init__(self) -> None:
        self.history: list[dict[str, Any]] = []
        self._sum: torch.Tensor | None = None
        self._steps = 0

    def add(self, loss: torch.Tensor, optimizer_step_done: bool) -> None:
        """Add one micro-batch's loss (`training_step`'s return); `optimizer_step_done` on its last micro-batch."""
        value = loss.detach()
        if self._sum is None or self._sum.device != value.device:
            self._sum = torch.zeros((), dtype=torch.float32, device=value.device)
        self._sum += value
        self._steps += int(bool(optimizer_step_done))

    def flush(self, step: int, mean_over_processes: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """Close the logging window at optimizer `step` (call on every process at the Trainer's loss logs)."""
        if self._sum is None or self._steps == 0:
            return
        total = self._sum if mean_over_processes is None else mean_over_processes(self._sum)
        self.history.append({"step": int(step), "loss": float(total.item()) / self._steps})
        self._sum = None
        self._steps = 0

    def non_finite_steps(self) -> list[int]:
        """Logged steps whose window held a NaN or infinite loss."""
        return [h["step"] for h in self.history if not math.isfinite(h["loss"])]

    def state_dict(self) -> dict[str, Any]:
        """JSON-ready history (non-finite values as strings), for checkpoints."""
        return {"history": [{"step": h["step"], "loss": _json_float(h["loss"])} for h in self.history]}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore what [`state_dict`] saved (`None`: a checkpoint without it; the history restarts)."""
        history = (state or {}).get("history") or []
        if not isinstance(history, list):
            raise TypeError(f"raw_loss.history is a {type(history).__name__}")
        self.history = [{"step": int(h["step"]), "loss": float(h["loss"])} for h in history]


def _json_float(value: float) -> float | str:
    return value if math.isfinite(value) else str(value)
