"""Evaluation metrics shipped with the package, loadable offline by path with `evaluate.load`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

METRICS_DIR = Path(__file__).resolve().parent


def metric_path(name: str) -> str:
    """Path of a shipped metric script, for `evaluate.load(path)` (`evaluate.load("name")` needs the Hub)."""
    path = METRICS_DIR / name / f"{name}.py"
    if not path.is_file():
        available = sorted(p.name for p in METRICS_DIR.iterdir() if (p / f"{p.name}.py").is_file())
        raise ValueError(f"No shipped metric {name!r}; available: {available}.")
    return str(path)


def load_metric(name: str) -> Any:
    """`evaluate.load` of a metric shipped with mm_trainer, by path, so it works without the Hub."""
    import evaluate

    return evaluate.load(metric_path(name))
