"""Build the audit of a training run as one JSON-ready dict (written to ``audit.json``)."""

from __future__ import annotations

import datetime as _dt
import enum
import math
import platform
import traceback
from collections.abc import Callable, Mapping
from importlib import metadata
from typing import Any

from .dynamics import training_dynamics
from .params import other_trainable, param_summary
from .record import InitRecord
from .status import module_audits, status_counts
from .verdict import decide

AUDIT_FORMAT = 1
"""Version of the ``audit.json`` layout."""

_PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "datasets", "safetensors")


def versions() -> dict[str, str | None]:
    """Versions of Python, mm-trainer and the libraries the run used (``None`` for one not installed)."""
    from .. import __version__

    out: dict[str, str | None] = {"python": platform.python_version(), "mm_trainer": __version__}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    out["platform"] = platform.platform()
    return out


def jsonable(value: Any) -> Any:
    """``value`` with tensors, sets, tuples, paths and numpy scalars made JSON-ready; NaN / infinity become the
    strings ``"nan"`` / ``"inf"`` / ``"-inf"`` (strict JSON has no such numbers)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, enum.Enum):
        return jsonable(value.value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted(jsonable(v) for v in value)
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        return jsonable(tolist())
    return str(value)


def adapter_config_summary(model: Any, adapter_name: str = "default") -> dict[str, Any] | None:
    """The PEFT config fields that shape the adapters (rank, alpha, init scheme, targets)."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, Mapping) or adapter_name not in configs:
        return None
    cfg = configs[adapter_name]
    keys = (
        "peft_type",
        "r",
        "lora_alpha",
        "lora_dropout",
        "init_lora_weights",
        "use_rslora",
        "use_dora",
        "bias",
        "target_modules",
        "modules_to_save",
        "base_model_name_or_path",
    )
    out = {k: getattr(cfg, k, None) for k in keys}
    out["peft_type"] = str(getattr(out["peft_type"], "value", out["peft_type"]))
    return jsonable(out)


def training_summary(args: Any, state: Any) -> dict[str, Any]:
    """The training arguments an audit reader needs to judge the dynamics."""
    keys = (
        "learning_rate",
        "weight_decay",
        "optim",
        "lr_scheduler_type",
        "warmup_steps",
        "max_grad_norm",
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "num_train_epochs",
        "max_steps",
        "seed",
        "bf16",
        "fp16",
        "gradient_checkpointing",
        "max_length",
        "quantization",
        "imod",
    )
    out = {k: getattr(args, k, None) for k in keys}
    out["world_size"] = getattr(args, "world_size", 1)
    out["global_step"] = state.global_step
    out["epoch"] = state.epoch
    return jsonable(out)


def run_sections(sections: Mapping[str, Callable[[], Mapping[str, Any]]]) -> dict[str, Any]:
    """Call every registered feature section; one that raises is reported as ``{"error": ...}``, not fatal."""
    out: dict[str, Any] = {}
    for name, build in sections.items():
        try:
            out[name] = jsonable(build())
        except Exception as err:  # a feature's bug must not cost the rest of the audit
            out[name] = {"error": "".join(traceback.format_exception_only(type(err), err)).strip()}
    return out


def build_audit(trainer: Any, record: InitRecord) -> dict[str, Any]:
    """The audit of ``trainer``'s run as it stands now.

    Args:
        trainer: An :class:`~mm_trainer.MMSFTTrainer` (reads ``adapters``, ``telemetry``, ``state``, ``args``,
            ``target_plan``, ``modality_profile``, ``tower_map``, ``released_towers``, ``audit_sections``).
        record: Fingerprints of the trainable weights at init.

    Returns:
        The audit (see ``audit.json`` in the README): ``verdict``, ``reasons``, ``params``, ``modules``,
        ``status_counts``, ``dynamics``, ``targets``, ``modality``, ``adapter_config``, ``training``, ``model``,
        ``released_towers``, ``sections``, ``versions``.
    """
    telemetry = trainer.telemetry
    fired = set(telemetry.fired) if telemetry is not None else set()
    nonzero = dict(telemetry.nonzero_steps) if telemetry is not None else {}
    model = trainer.model
    modules = module_audits(trainer.adapters, record.compare(trainer.adapters), fired, nonzero)
    others = other_trainable(model, trainer.adapters)
    params = param_summary(
        model,
        trainer.tower_map,
        modules,
        others,
        record.compare_other(others),
        trainer.released_towers,
    )
    raw_loss = getattr(trainer, "raw_loss", None)
    dynamics = training_dynamics(
        trainer.state.log_history,
        telemetry.history if telemetry is not None else [],
        raw_loss.history if raw_loss is not None else None,
    )
    sections = run_sections(trainer.audit_sections)
    missing = [a.name for a in trainer.adapters if a.name not in record.adapters]
    verdict, reasons = decide(modules, params, dynamics, sections, trainer.state.global_step, record.lost, missing)
    plan = trainer.target_plan
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    audit = {
        "format_version": AUDIT_FORMAT,
        "kind": "training",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "verdict": verdict,
        "reasons": reasons,
        "global_step": trainer.state.global_step,
        "params": params,
        "status_counts": status_counts(modules),
        "modules": [m.to_dict() for m in modules],
        "dynamics": dynamics,
        "targets": plan.to_dict() if plan is not None else None,
        "modality": trainer.modality_profile.to_dict(),
        "adapter_config": adapter_config_summary(model),
        "training": training_summary(trainer.args, trainer.state),
        "model": {
            "class": type(base).__name__,
            "name_or_path": getattr(getattr(base, "config", None), "_name_or_path", None),
            "towers": trainer.tower_map.to_dict(),
        },
        "released_towers": [r.to_dict() for r in trainer.released_towers],
        "init_record": {"restored_on_resume": record.restored, "lost": record.lost},
        "sections": sections,
        "versions": versions(),
    }
    return jsonable(audit)
