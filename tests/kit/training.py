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


def end_process_group() -> None:
    """End a launched rank as torch asks: destroy the default process group (and every other) before exit.

    Every script under ``tests/scripts`` calls this last. A gloo rank that exits with its group alive leaves the
    group's worker threads to the interpreter's teardown, which can abort the process ("terminate called without an
    active exception") after a run that otherwise succeeded. No-op when no group exists (one process).
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
