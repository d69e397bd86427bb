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
    "MMSFTConfig": "training.config",
    "MMSFTTrainer": "training.sft",
    "ModalityProfile": "model.modality",
    "profile_dataset": "model.modality",
    "token_modality": "model.modality",
    "TargetPlan": "model.targets",
    "resolve_targets": "model.targets",
    "TOWERS": "model.towers",
    "TowerMap": "model.towers",
    "map_towers": "model.towers",
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
    from .model.modality import ModalityProfile, profile_dataset, token_modality
    from .model.targets import TargetPlan, resolve_targets
    from .model.towers import TOWERS, TowerMap, map_towers
    from .training.config import MMSFTConfig
    from .training.sft import MMSFTTrainer


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mm_trainer' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
