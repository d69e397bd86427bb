"""mm-trainer: multimodal LoRA fine-tuning on top of TRL.

``MMSFTTrainer`` is a drop-in ``SFTTrainer`` that derives LoRA targets from what the data reaches, and
``MMSFTConfig`` its ``SFTConfig``. Names are imported lazily so that the command line starts fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "AuditFailedError": "audit",
    "audit_adapter_dir": "audit",
    "MMSFTConfig": "config",
    "MMSFTTrainer": "trainer",
    "ModalityProfile": "modality",
    "profile_dataset": "modality",
    "token_modality": "modality",
    "TargetPlan": "targets",
    "resolve_targets": "targets",
    "TOWERS": "towers",
    "TowerMap": "towers",
    "map_towers": "towers",
}

__all__ = [
    "TOWERS",
    "AuditFailedError",
    "MMSFTConfig",
    "MMSFTTrainer",
    "ModalityProfile",
    "TargetPlan",
    "TowerMap",
    "audit_adapter_dir",
    "map_towers",
    "profile_dataset",
    "resolve_targets",
    "token_modality",
]

if TYPE_CHECKING:  # pragma: no cover
    from .audit import AuditFailedError, audit_adapter_dir
    from .config import MMSFTConfig
    from .modality import ModalityProfile, profile_dataset, token_modality
    from .targets import TargetPlan, resolve_targets
    from .towers import TOWERS, TowerMap, map_towers
    from .trainer import MMSFTTrainer


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mm_trainer' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
