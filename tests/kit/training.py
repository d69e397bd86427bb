"""Training settings for tests: a few fast, deterministic CPU steps without saving or reporting."""

from __future__ import annotations

import os
import sys
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
    """End a launched rank: destroy the default process group (and every other), as torch asks, then leave the
    process without the interpreter's teardown (exit code 0).

    Every script under ``tests/scripts`` calls this last, once every result is written. A gloo rank that exits with
    its group alive leaves the group's worker threads to the interpreter's teardown, which can abort the process
    ("terminate called without an active exception") after a run that otherwise succeeded. Destroying the group
    first made that rarer but not impossible: in 2 of 8 two-process launches of a CI run, and in 2 of about 70 local
    ones, a rank still aborted after writing all its results (pytorch/pytorch#190489: gloo and the destructors that
    interpreter finalization runs). So the rank flushes its output and exits with `os._exit(0)`, skipping the
    finalization where the abort happens; anything a script needs is written before this call.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
