"""Training settings for tests: a few fast, deterministic CPU steps without saving or reporting."""

from __future__ import annotations

from pathlib import Path
from typing import Any

FAST_CPU_TRAINING: dict[str, Any] = {
    "max_steps": 3,
    "per_device_train_batch_size": 2,
    "learning_rate": 1e-2,
    "logging_steps": 1,
    "report_to": "none",
    "save_strategy": "no",
    "use_cpu": True,
    "seed": 7,
    "disable_tqdm": True,
    "bf16": False,  # TRL defaults to bf16 autocast, which would blur the 1e-5 logit comparisons
}
"""The settings every trainer test starts from (override any of them per test)."""


def training_args(output_dir: str | Path, config_cls: type | None = None, **overrides: Any) -> Any:
    """``config_cls`` (default ``MMSFTConfig``) for :data:`FAST_CPU_TRAINING` plus ``overrides``, writing to ``output_dir``."""
    if config_cls is None:
        from mm_trainer import MMSFTConfig as config_cls
    return config_cls(output_dir=str(output_dir), **{**FAST_CPU_TRAINING, **overrides})
