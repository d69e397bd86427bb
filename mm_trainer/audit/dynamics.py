"""Training dynamics from the Trainer's ``log_history`` and the tower telemetry: loss, gradient-norm band, spikes.

Rules (fixed, so that audits of different runs compare):

- **Loss trend** needs at least :data:`MIN_POINTS_FOR_TREND` logged losses; it compares the mean of the first
  quarter of the logged losses with the mean of the last quarter. Fewer points: no trend is claimed.
- **Spikes**: a logged value is a spike when it is at least :data:`LOSS_SPIKE_FACTOR` (loss) or
  :data:`GRAD_SPIKE_FACTOR` (gradient norms) times the median of the up to :data:`SPIKE_WINDOW` finite values logged
  before it, once at least :data:`SPIKE_MIN_HISTORY` of them exist (so the early growth of LoRA gradients, whose B
  starts at zero, is not taken for a spike).
- **Band**: min, 10th percentile, median, 90th percentile and max of the finite values.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping
from typing import Any

MIN_POINTS_FOR_TREND = 8
SPIKE_WINDOW = 10
SPIKE_MIN_HISTORY = 5
LOSS_SPIKE_FACTOR = 1.5
GRAD_SPIKE_FACTOR = 5.0


def series(history: Iterable[Mapping[str, Any]], key: str) -> list[tuple[int, float]]:
    """``(step, value)`` of every history entry that holds ``key`` (in log order)."""
    out = []
    for entry in history:
        if key in entry and isinstance(entry[key], (int, float)) and not isinstance(entry[key], bool):
            out.append((int(entry.get("step", len(out) + 1)), float(entry[key])))
    return out


def _percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolation percentile of an ascending list (``q`` in [0, 1])."""
    pos = q * (len(sorted_values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def band(values: Iterable[float]) -> dict[str, Any] | None:
    """min / p10 / median / p90 / max of the finite values (``None`` when there is none)."""
    finite = sorted(v for v in values if math.isfinite(v))
    if not finite:
        return None
    return {
        "min": finite[0],
        "p10": _percentile(finite, 0.1),
        "median": _percentile(finite, 0.5),
        "p90": _percentile(finite, 0.9),
        "max": finite[-1],
        "points": len(finite),
    }


def spikes(points: list[tuple[int, float]], factor: float, metric: str) -> list[dict[str, Any]]:
    """Values at least ``factor`` times the median of the preceding window (see the module docstring)."""
    found = []
    previous: list[float] = []
    for step, value in points:
        window = previous[-SPIKE_WINDOW:]
        if len(window) >= SPIKE_MIN_HISTORY and math.isfinite(value):
            baseline = statistics.median(window)
            if baseline > 0 and value >= factor * baseline:
                found.append(
                    {"metric": metric, "step": step, "value": value, "baseline": baseline, "ratio": value / baseline}
                )
        if math.isfinite(value):
            previous.append(value)
    return found


def loss_summary(points: list[tuple[int, float]]) -> dict[str, Any] | None:
    """First / last / min loss, non-finite steps and the trend (``decreasing``: ``None`` when too few points)."""
    if not points:
        return None
    finite = [(s, v) for s, v in points if math.isfinite(v)]
    out: dict[str, Any] = {
        "points": len(points),
        "first": points[0][1],
        "last": points[-1][1],
        "first_step": points[0][0],
        "last_step": points[-1][0],
        "non_finite_steps": [s for s, v in points if not math.isfinite(v)],
        "decreasing": None,
    }
    if finite:
        min_step, min_value = min(finite, key=lambda p: p[1])
        out.update(min=min_value, min_step=min_step)
    if len(finite) >= MIN_POINTS_FOR_TREND:
        quarter = len(finite) // 4
        first = statistics.fmean(v for _, v in finite[:quarter])
        last = statistics.fmean(v for _, v in finite[-quarter:])
        out.update(first_quarter_mean=first, last_quarter_mean=last, decreasing=last < first)
    return out


def training_dynamics(
    log_history: list[Mapping[str, Any]], telemetry_history: list[Mapping[str, Any]] | None = None
) -> dict[str, Any]:
    """The dynamics section of the audit.

    Args:
        log_history: ``trainer.state.log_history``.
        telemetry_history: ``trainer.telemetry.history`` (per-tower ``grad_norm/<tower>`` per log), if any.

    Returns:
        ``loss`` (see :func:`loss_summary`), ``eval_loss``, ``grad_norm`` (band of the Trainer's total norm and,
        per tower, of the telemetry's), ``learning_rate``, ``spikes`` and the raw ``series`` (for the plots).
    """
    telemetry_history = telemetry_history or []
    loss = series(log_history, "loss")
    eval_loss = series(log_history, "eval_loss")
    grad = series(log_history, "grad_norm")
    lr = series(log_history, "learning_rate")
    tower_keys = sorted({k for entry in telemetry_history for k in entry if k.startswith("grad_norm/")})
    tower_series = {k.split("/", 1)[1]: series(telemetry_history, k) for k in tower_keys}

    found = spikes(loss, LOSS_SPIKE_FACTOR, "loss") + spikes(grad, GRAD_SPIKE_FACTOR, "grad_norm")
    for tower, points in tower_series.items():
        found += spikes(points, GRAD_SPIKE_FACTOR, f"grad_norm/{tower}")
    return {
        "loss": loss_summary(loss),
        "eval_loss": loss_summary(eval_loss),
        "grad_norm": {
            "total": band(v for _, v in grad),
            "per_tower": {tower: band(v for _, v in points) for tower, points in tower_series.items()},
        },
        "learning_rate": {"first": lr[0][1], "last": lr[-1][1], "max": max(v for _, v in lr)} if lr else None,
        "spikes": found,
        "series": {
            "loss": loss,
            "eval_loss": eval_loss,
            "grad_norm": grad,
            **{f"grad_norm/{tower}": points for tower, points in tower_series.items()},
        },
    }
