"""Training dynamics from the Trainer's `log_history` and the tower telemetry: loss, gradient-norm band, spikes.

Rules (fixed, so that audits of different runs compare):

- **Loss trend** needs at least [`MIN_POINTS_FOR_TREND`] logged losses; it compares the mean of the first
  quarter of the logged losses with the mean of the last quarter. Fewer points: no trend is claimed.
- **Spikes**: a logged value is a spike when it is at least [`LOSS_SPIKE_FACTOR`] (loss) or
  [`GRAD_SPIKE_FACTOR`] (gradient norms) times the median of the up to [`SPIKE_WINDOW`] finite values logged
  before it, once at least [`SPIKE_MIN_HISTORY`] of them exist (so the early growth of LoRA gradients, whose B
  starts at zero, is not taken for a spike).
- **Early divergence**: within the first [`EARLY_POINTS`] logged points, a gradient norm at least
  [`EARLY_DIVERGENCE_FACTOR`] times the first positive one logged (the spike rule cannot see these: it needs
  [`SPIKE_MIN_HISTORY`] earlier points). Read on the Trainer's total norm, or on the per-tower norms when the
  Trainer logged none.
- **Band**: min, 10th percentile, median, 90th percentile and max of the finite values.

Aggregation (the same in `audit.json`, the audit's plots and `mm-trainer compare`): every gradient norm is the
value of the optimizer step at which it was logged (the Trainer's `grad_norm` and the telemetry's
`grad_norm/<tower>` alike, before clipping), not a mean over the logging window: see [`GRAD_NORM_AGGREGATION`].
The loss is the Trainer's logged mean over the logging window, taken before transformers' `logging_nan_inf_filter`
when mm-trainer recorded it ([`~mm_trainer.audit.raw_loss`]), so a NaN step shows as NaN.
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
EARLY_POINTS = 10
EARLY_DIVERGENCE_FACTOR = 1000.0

GRAD_NORM_AGGREGATION = "value at the logged optimizer step, before clipping"
"""How every gradient-norm point is aggregated, as labelled in the audit, its plots and `mm-trainer compare`."""

LOSS_AGGREGATION = "mean over the logging window, before logging_nan_inf_filter"
"""How every loss point is aggregated (when mm-trainer recorded the unfiltered loss; else as the Trainer logged it)."""


_NON_FINITE = ("nan", "inf", "-inf")


def series(history: Iterable[Mapping[str, Any]], key: str) -> list[tuple[int, float]]:
    """`(step, value)` of every history entry that holds `key` (in log order)."""
    out = []
    for entry in history:
        value = entry.get(key)
        if isinstance(value, str) and value in _NON_FINITE:  # a checkpoint's JSON keeps NaN / infinity as strings
            value = float(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out.append((int(entry.get("step", len(out) + 1)), float(value)))
    return out


def _percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolation percentile of an ascending list (`q` in [0, 1])."""
    pos = q * (len(sorted_values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def band(values: Iterable[float]) -> dict[str, Any] | None:
    """min / p10 / median / p90 / max of the finite values (`None` when there is none)."""
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
    """Values at least `factor` times the median of the preceding window (see the module docstring)."""
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


def early_divergence(points: list[tuple[int, float]], metric: str) -> list[dict[str, Any]]:
    """Points among the first [`EARLY_POINTS`] at least [`EARLY_DIVERGENCE_FACTOR`] times the first positive
    finite value (see the module docstring); a non-finite value there counts too."""
    found = []
    baseline = None
    for step, value in points[:EARLY_POINTS]:
        if baseline is None:
            if math.isfinite(value) and value > 0:
                baseline = value
            continue
        if not math.isfinite(value) or value >= EARLY_DIVERGENCE_FACTOR * baseline:
            found.append(
                {"metric": metric, "step": step, "value": value, "baseline": baseline, "ratio": value / baseline}
            )
    return found


def merge_raw_loss(logged: list[tuple[int, float]], raw: list[Mapping[str, Any]] | None) -> list[tuple[int, float]]:
    """The logged loss with each step's value replaced by the unfiltered one where it was recorded."""
    if not raw:
        return logged
    by_step = {int(h["step"]): float(h["loss"]) for h in raw}
    merged = [(s, by_step.pop(s, v)) for s, v in logged]
    return sorted(merged + list(by_step.items()))


def loss_summary(points: list[tuple[int, float]]) -> dict[str, Any] | None:
    """First / last / min loss, non-finite steps and the trend (`decreasing`: `None` when too few points)."""
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
    log_history: list[Mapping[str, Any]],
    telemetry_history: list[Mapping[str, Any]] | None = None,
    raw_loss: list[Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """The dynamics section of the audit.

    Args:
        log_history: `trainer.state.log_history`.
        telemetry_history: `trainer.telemetry.history` (per-tower `grad_norm/<tower>` per log), if any.
        raw_loss: `trainer.raw_loss.history` (the unfiltered loss per log), if any.

    Returns:
        `loss` (see [`loss_summary`]), `eval_loss`, `grad_norm` (band of the Trainer's total norm and,
        per tower, of the telemetry's), `learning_rate`, `spikes` and the raw `series` (for the plots).
    """
    telemetry_history = telemetry_history or []
    loss = merge_raw_loss(series(log_history, "loss"), raw_loss)
    eval_loss = series(log_history, "eval_loss")
    grad = series(log_history, "grad_norm")
    lr = series(log_history, "learning_rate")
    tower_keys = sorted({k for entry in telemetry_history for k in entry if k.startswith("grad_norm/")})
    tower_series = {k.split("/", 1)[1]: series(telemetry_history, k) for k in tower_keys}

    found = spikes(loss, LOSS_SPIKE_FACTOR, "loss") + spikes(grad, GRAD_SPIKE_FACTOR, "grad_norm")
    for tower, points in tower_series.items():
        found += spikes(points, GRAD_SPIKE_FACTOR, f"grad_norm/{tower}")
    diverged = early_divergence(grad, "grad_norm")
    if not grad:
        for tower, points in tower_series.items():
            diverged += early_divergence(points, f"grad_norm/{tower}")
    return {
        "loss": loss_summary(loss),
        "eval_loss": loss_summary(eval_loss),
        "grad_norm": {
            "total": band(v for _, v in grad),
            "per_tower": {tower: band(v for _, v in points) for tower, points in tower_series.items()},
        },
        "learning_rate": {"first": lr[0][1], "last": lr[-1][1], "max": max(v for _, v in lr)} if lr else None,
        "spikes": found,
        "early_divergence": diverged,
        "aggregation": {
            "loss": LOSS_AGGREGATION if raw_loss else "mean over the logging window, as the Trainer logged it",
            "grad_norm": GRAD_NORM_AGGREGATION,
        },
        "series": {
            "loss": loss,
            "eval_loss": eval_loss,
            "grad_norm": grad,
            **{f"grad_norm/{tower}": points for tower, points in tower_series.items()},
        },
    }
