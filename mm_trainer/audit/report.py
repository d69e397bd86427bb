"""Build the audit of a training run as one JSON-ready dict (written to `audit.json`)."""

from __future__ import annotations

import datetime as _dt
import platform
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

from ..utils.jsonable import jsonable
from .dynamics import training_dynamics
from .params import other_trainable, param_summary
from .record import InitRecord
from .status import module_audits, status_counts
from .verdict import decide

AUDIT_FORMAT = 1
"""Version of the `audit.json` layout."""

_PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "datasets", "safetensors")


def versions() -> dict[str, str | None]:
    """Versions of Python, mm-trainer and the libraries the run used (`None` for one not installed)."""
    from .. import __version__

    out: dict[str, str | None] = {"python": platform.python_version(), "mm_trainer": __version__}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    out["platform"] = platform.platform()
    return out


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


def training_summary(args: Any, global_step: int, epoch: float | None) -> dict[str, Any]:
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
    out["global_step"] = global_step
    out["epoch"] = epoch
    return jsonable(out)


def run_sections(sections: Mapping[str, Callable[[], Mapping[str, Any]]]) -> dict[str, Any]:
    """Call every registered feature section; one that raises is reported as `{"error": ...}`, not fatal."""
    out: dict[str, Any] = {}
    for name, build in sections.items():
        try:
            out[name] = jsonable(build())
        except Exception as err:  # a feature's bug must not cost the rest of the audit
            out[name] = {"error": "".join(traceback.format_exception_only(type(err), err)).strip()}
    return out


@dataclass
class AuditInputs:
    """Everything the audit of a run reads, handed over explicitly (see [`build_audit`]).

    Attributes:
        model: The (PEFT-wrapped) model.
        adapters: Its LoRA adapters.
        tower_map: Tower map of the base model.
        released_towers: Records of the towers whose weights were released (`tower`, `params`, `to_dict()`).
        target_plan: The resolved targets (`None` without a plan).
        modality_profile: The training data's modality profile.
        args: The training arguments (for the training summary).
        global_step: The optimizer step the run is at.
        epoch: The epoch it is at.
        log_history: The Trainer's log history.
        fired: Adapters (by name) that ran a training forward.
        nonzero_steps: Per adapter, the optimizer steps it had a non-zero gradient in.
        telemetry_history: Per-tower gradient norms per log (`grad_norm/<tower>`).
        raw_loss_history: The unfiltered loss per log, when recorded.
        sections: Feature sections: name -> callable returning a JSON-ready dict.
    """

    model: Any
    adapters: list[Any]
    tower_map: Any
    released_towers: list[Any] = field(default_factory=list)
    target_plan: Any = None
    modality_profile: Any = None
    args: Any = None
    global_step: int = 0
    epoch: float | None = None
    log_history: list[dict[str, Any]] = field(default_factory=list)
    fired: set[str] = field(default_factory=set)
    nonzero_steps: dict[str, int] = field(default_factory=dict)
    telemetry_history: list[dict[str, Any]] = field(default_factory=list)
    raw_loss_history: list[dict[str, Any]] | None = None
    sections: Mapping[str, Callable[[], Mapping[str, Any]]] = field(default_factory=dict)


def build_audit(inputs: AuditInputs, record: InitRecord) -> dict[str, Any]:
    """The audit of a run as it stands now.

    Args:
        inputs: What the audit reads (see [`AuditInputs`]).
        record: Fingerprints of the trainable weights at init.

    Returns:
        The audit (see `audit.json` in the README): `verdict`, `reasons`, `params`, `modules`, `status_counts`,
        `dynamics`, `targets`, `modality`, `adapter_config`, `training`, `model`, `released_towers`, `sections`,
        `versions`.
    """
    model = inputs.model
    modules = module_audits(inputs.adapters, record.compare(inputs.adapters), set(inputs.fired), inputs.nonzero_steps)
    others = other_trainable(model, inputs.adapters)
    params = param_summary(
        model,
        inputs.tower_map,
        modules,
        others,
        record.compare_other(others),
    )
    dynamics = training_dynamics(inputs.log_history, inputs.telemetry_history, inputs.raw_loss_history)
    sections = run_sections(inputs.sections)
    missing = [a.name for a in inputs.adapters if a.name not in record.adapters]
    verdict, reasons = decide(modules, params, dynamics, sections, inputs.global_step, record.lost, missing)
    plan = inputs.target_plan
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    audit = {
        "format_version": AUDIT_FORMAT,
        "kind": "training",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "verdict": verdict,
        "reasons": reasons,
        "global_step": inputs.global_step,
        "params": params,
        "status_counts": status_counts(modules),
        "modules": [m.to_dict() for m in modules],
        "dynamics": dynamics,
        "targets": plan.to_dict() if plan is not None else None,
        "modality": inputs.modality_profile.to_dict(),
        "adapter_config": adapter_config_summary(model),
        "training": training_summary(inputs.args, inputs.global_step, inputs.epoch),
        "model": {
            "class": type(base).__name__,
            "name_or_path": getattr(getattr(base, "config", None), "name_or_path", None),
            "towers": inputs.tower_map.to_dict(),
        },
        "released_towers": [r.to_dict() for r in inputs.released_towers],
        "init_record": {"restored_on_resume": record.restored, "lost": record.lost},
        "sections": sections,
        "versions": versions(),
    }
    return jsonable(audit)
