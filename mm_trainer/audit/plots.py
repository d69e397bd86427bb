"""Loss and per-tower gradient-norm plots of the audit (matplotlib, Agg canvas: no display, no pyplot state)."""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..utils.atomic import atomic_write_bytes
from .dynamics import GRAD_NORM_AGGREGATION

LOSS_PLOT = "audit_loss.png"
GRAD_NORM_PLOT = "audit_grad_norm.png"
"""Plot file names (they must not start with `_`: the Trainer's Hub upload skips those)."""


def _figure() -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 3.6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Any, path: Path) -> None:
    """Render `fig` as PNG and write it atomically (a kill mid-save leaves the previous file or none)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    atomic_write_bytes(path, buffer.getvalue())


def _finite(points: list[Any]) -> tuple[list[float], list[float]]:
    steps, values = [], []
    for step, value in points:
        if isinstance(value, (int, float)) and value == value and abs(value) != float("inf"):
            steps.append(step)
            values.append(value)
    return steps, values


def write_plots(dynamics: Mapping[str, Any], output_dir: Path) -> list[str]:
    """Draw the plots the logged data allows into `output_dir`; returns their file names.

    `audit_loss.png`: training (and evaluation) loss over optimizer steps. `audit_grad_norm.png`: the Trainer's
    total gradient norm and each tower's adapter gradient norm (log scale), each the value at the logged optimizer
    step, before clipping ([`~mm_trainer.audit.dynamics.GRAD_NORM_AGGREGATION`]).
    """
    from matplotlib.ticker import MaxNLocator

    written: list[str] = []
    data = dynamics.get("series") or {}
    loss = _finite(data.get("loss") or [])
    eval_loss = _finite(data.get("eval_loss") or [])
    if loss[0] or eval_loss[0]:
        fig = _figure()
        ax = fig.add_subplot()
        if loss[0]:
            ax.plot(*loss, label="train loss", marker="." if len(loss[0]) < 50 else None)
        if eval_loss[0]:
            ax.plot(*eval_loss, label="eval loss", marker="o")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.set_title("Loss")
        ax.grid(alpha=0.3)
        ax.legend()
        save_figure(fig, output_dir / LOSS_PLOT)
        written.append(LOSS_PLOT)

    grads = {k: _finite(v) for k, v in data.items() if k.startswith("grad_norm") and v}
    grads = {k: v for k, v in grads.items() if v[0]}
    if grads:
        fig = _figure()
        ax = fig.add_subplot()
        for key, (steps, values) in grads.items():
            label = "all trainable (Trainer's grad_norm)" if key == "grad_norm" else key.split("/", 1)[1]
            ax.plot(steps, values, label=label, linestyle="--" if key == "grad_norm" else "-")
        positive = [v for _, values in grads.values() for v in values if v > 0]
        if positive:
            # Log scale that still shows exact zeros (a dead tower) one decade below the smallest non-zero norm.
            ax.set_yscale("symlog", linthresh=min(positive) / 10)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("gradient norm")
        ax.set_title(f"Gradient norm per tower ({GRAD_NORM_AGGREGATION})", fontsize="medium")
        ax.grid(alpha=0.3)
        ax.legend()
        save_figure(fig, output_dir / GRAD_NORM_PLOT)
        written.append(GRAD_NORM_PLOT)
    return written
