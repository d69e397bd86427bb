"""Parameter counts of the audit: nominal vs effective trainable parameters, per tower, 4-bit layers unpacked."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn

from ..model.adapters import LoraAdapter
from ..model.figures import param_count
from ..model.layers import is_4bit_weight
from ..model.peft_names import strip_peft_prefix
from ..model.towers import TOWERS, TowerMap
from .status import ModuleAudit


def other_trainable(model: nn.Module, adapters: Iterable[LoraAdapter]) -> dict[str, nn.Parameter]:
    """Trainable parameters that are not an adapter's A or B (`modules_to_save`, trainable tokens, biases),
    by name in the base model.

    A and B are told apart by name ([`~mm_trainer.model.adapters.LoraAdapter.param_names`]), not by object: FSDP2
    replaces every parameter object when the model is prepared.
    """
    adapters = list(adapters)
    lora_names = {n for a in adapters for n in a.param_names if n}
    lora_ids = {id(p) for a in adapters if not all(a.param_names) for p in (a.lora_A, a.lora_B)}
    out: dict[str, nn.Parameter] = {}
    for name, p in model.named_parameters():
        name = strip_peft_prefix(name)
        if p.requires_grad and name not in lora_names and id(p) not in lora_ids:
            out[name] = p
    return out


def param_summary(
    model: nn.Module,
    tower_map: TowerMap,
    modules: list[ModuleAudit],
    other: Mapping[str, nn.Parameter],
    other_moved: Mapping[str, bool],
) -> dict[str, Any]:
    """The `params` section of the audit.

    The figures are defined in [`~mm_trainer.model.figures`]: `nominal_trainable` counts every trainable parameter
    (what PEFT's `print_trainable_parameters` shows); `effective_trainable` only those that learned: adapters with
    status `trained` and other trainable parameters that moved since init (all of them when the init record was
    lost). `base_params` per tower is the tower map's count (the start-up plan shows the same number);
    `base_params_4bit` the part of it in bitsandbytes 4-bit weights now.

    Args:
        model: The (PEFT-wrapped) model.
        tower_map: Tower map of the base model.
        modules: The adapters' audits.
        other: Other trainable parameters by name (see [`other_trainable`]).
        other_moved: Per name in `other`, whether it moved since init (missing: unknown).
    """
    per_tower: dict[str, dict[str, int]] = {}

    def row(tower: str) -> dict[str, int]:
        return per_tower.setdefault(
            tower,
            {
                "adapters": 0,
                "trained": 0,
                "dead": 0,
                "nominal_trainable": 0,
                "effective_trainable": 0,
                "base_params": 0,
                "base_params_4bit": 0,
            },
        )

    for m in modules:
        r = row(m.tower)
        r["adapters"] += 1
        r["nominal_trainable"] += m.params
        if m.status == "trained":
            r["trained"] += 1
            r["effective_trainable"] += m.params
        else:
            r["dead"] += 1

    other_rows = []
    for name, p in other.items():
        tower = tower_map.tower_of(name)
        moved = other_moved.get(name)
        n = param_count(p)
        r = row(tower)
        r["nominal_trainable"] += n
        if moved is not False:
            r["effective_trainable"] += n
        other_rows.append({"name": name, "tower": tower, "params": n, "moved": moved})

    for tower, n in tower_map.base_params.items():
        row(tower)["base_params"] += n
    for name, p in model.named_parameters():
        if not p.requires_grad and is_4bit_weight(p):
            row(tower_map.tower_of(name))["base_params_4bit"] += param_count(p)

    ordered = {t: per_tower[t] for t in TOWERS if t in per_tower}
    nominal = sum(r["nominal_trainable"] for r in ordered.values())
    effective = sum(r["effective_trainable"] for r in ordered.values())
    lora_nominal = sum(m.params for m in modules)
    lora_effective = sum(m.params for m in modules if m.status == "trained")
    return {
        "nominal_trainable": nominal,
        "effective_trainable": effective,
        "effective_share": effective / nominal if nominal else 0.0,
        "lora_nominal": lora_nominal,
        "lora_effective": lora_effective,
        "dead_lora": lora_nominal - lora_effective,
        "dead_share": (lora_nominal - lora_effective) / lora_nominal if lora_nominal else 0.0,
        "base_params": sum(r["base_params"] for r in ordered.values()),
        "base_params_4bit": sum(r["base_params_4bit"] for r in ordered.values()),
        "other_trainable": other_rows,
        "per_tower": ordered,
    }
