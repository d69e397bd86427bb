"""mm-trainer: multimodal LoRA fine-tuning on top of TRL.

`MMSFTTrainer` is a drop-in `SFTTrainer` that derives LoRA targets from what the data reaches, and `MMSFTConfig` its
`SFTConfig`. `MMTrainerMixin` attaches the same core ([`~mm_trainer.core.run.MultimodalCore`]) to any TRL trainer,
and `MultimodalArguments` holds the fields every mm-trainer config adds. Names are imported lazily so that the
command line starts fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "AuditFailedError": "audit",
    "audit_adapter_dir": "audit",
    "MMSFTConfig": "training.config",
    "MultimodalArguments": "training.config",
    "MMSFTTrainer": "training.sft",
    "MMTrainerMixin": "training.mixin",
    "MultimodalCore": "core.run",
    "UnseenModalityError": "core.batch_guard",
    "ReleasedTowerError": "model.release",
    "ModalityProfile": "model.modality",
    "profile_dataset": "model.modality",
    "token_modality": "model.modality",
    "TargetPlan": "model.targets",
    "resolve_targets": "model.targets",
    "TOWERS": "model.towers",
    "TowerMap": "model.towers",
    "map_towers": "model.towers",
    "load_quantized_base": "quant",
}

__all__ = [
    "TOWERS",
    "AuditFailedError",
    "MMSFTConfig",
    "MMSFTTrainer",
    "MMTrainerMixin",
    "ModalityProfile",
    "MultimodalArguments",
    "MultimodalCore",
    "ReleasedTowerError",
    "TargetPlan",
    "TowerMap",
    "UnseenModalityError",
    "audit_adapter_dir",
    "load_quantized_base",
    "map_towers",
    "profile_dataset",
    "resolve_targets",
    "token_modality",
]

if TYPE_CHECKING:  # pragma: no cover
    from .audit import AuditFailedError, audit_adapter_dir
    from .core.batch_guard import UnseenModalityError
    from .core.run import MultimodalCore
    from .model.modality import ModalityProfile, profile_dataset, token_modality
    from .model.release import ReleasedTowerError
    from .model.targets import TargetPlan, resolve_targets
    from .model.towers import TOWERS, TowerMap, map_towers
    from .quant import load_quantized_base
    from .training.config import MMSFTConfig, MultimodalArguments
    from .training.mixin import MMTrainerMixin
    from .training.sft import MMSFTTrainer


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mm_trainer' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
