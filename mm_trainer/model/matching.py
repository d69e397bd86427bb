"""Which modules and parameters PEFT adapts for a config: PEFT's own matching, called before PEFT wraps the model.

Target resolution ([`~mm_trainer.model.targets.resolve_targets`]) must start from exactly what PEFT would adapt:
`"all-linear"` is expanded by PEFT, module paths are matched by PEFT's matcher (regex, suffix,
`layers_to_transform`, `exclude_modules`), and a config without `target_modules` gets PEFT's defaults for the model
type. Only `target_parameters` matching is mirrored (PEFT does it inside its injection; see
[`~mm_trainer.upstream.UPSTREAM`]). Per-expert linears of a mixture of experts are grouped by their block.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from ..upstream import peft_all_linear, peft_default_target_modules, peft_target_module_exists
from .layers import is_linear

ALL_LINEAR = "all-linear"


def expand_all_linear(model: nn.Module, peft_config: Any) -> Any:
    """A shallow copy of `peft_config` whose `"all-linear"` is expanded to module paths by PEFT itself.

    PEFT documents `target_modules="all-linear"` as every `nn.Linear` / `Conv1D` module except the output layer of a
    `PreTrainedModel` (and, for `task_type="SEQ_CLS"` models without one, the classifier head). Other configs are
    returned as they are. `tests/test_targets.py` checks the expansion against the modules PEFT adapts.
    """
    targets = getattr(peft_config, "target_modules", None)
    if not (isinstance(targets, str) and targets.lower() == ALL_LINEAR):
        return peft_config
    return peft_all_linear(peft_config, model)


def with_default_targets(model: nn.Module, peft_config: Any) -> Any:
    """`peft_config` with PEFT's default `target_modules` for the model type filled in when none are set."""
    if getattr(peft_config, "target_modules", None) is not None or getattr(peft_config, "target_parameters", None):
        return peft_config
    default = _default_targets(model)
    if default is None:
        raise ValueError(
            f"`target_modules` is not set and PEFT has no default targets for model type "
            f"{getattr(getattr(model, 'config', None), 'model_type', '?')!r}. Set `target_modules`, e.g. "
            '`"all-linear"` or `["q_proj", "v_proj"]`.'
        )
    filled = copy.copy(peft_config)
    filled.target_modules = set(default)
    return filled


def matched_modules(model: nn.Module, peft_config: Any) -> list[str]:
    """Paths of the modules PEFT would adapt for `peft_config` on `model`, in model order.

    The matching is PEFT's own (`check_target_module_exists`: full-path regex, exact path
    or `.suffix`, `layers_to_transform` / `layers_pattern`, `exclude_modules`, `modules_to_save`), after
    `"all-linear"` is expanded as PEFT does ([`expand_all_linear`]). When `target_modules` is unset, PEFT's
    default targets for the model type are used, falling back to those of its text model (PEFT itself knows few
    multimodal model types).
    """
    config = expand_all_linear(model, with_default_targets(model, peft_config))
    if getattr(config, "target_modules", None) is None:
        return []  # target_parameters only
    return [name for name, _ in model.named_modules() if name and peft_target_module_exists(config, name)]


def matched_parameters(model: nn.Module, peft_config: Any) -> list[str]:
    """`module.parameter` keys that `peft_config.target_parameters` selects, with PEFT's rule (the key, or a
    `.suffix` of it, is listed), each parameter taken on the lowest module that holds it."""
    targets = getattr(peft_config, "target_parameters", None)
    if not targets:
        return []
    wanted = set(targets)
    keys = []
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            key = f"{module_name}.{param_name}" if module_name else param_name
            if key in wanted or any(key.endswith(f".{t}") for t in wanted):
                keys.append(key)
    return keys


def expert_groups(model: nn.Module) -> dict[str, str]:
    """Linear layers of per-expert `ModuleList`s, each mapped to its MoE block (the list's parent module).

    A list of at least two modules of one class is a set of experts when it is named so (`experts`) or when its
    parent holds a router: a module whose 2-D `weight` has one row per list entry (`gate`: hidden -> experts). A
    stack of decoder layers has no such sibling, so its layers are never grouped.
    """
    groups: dict[str, str] = {}
    modules = dict(model.named_modules())
    for path, module in modules.items():
        if not isinstance(module, nn.ModuleList) or len(module) < 2 or len({type(m) for m in module}) != 1:
            continue
        parent_path, _, leaf = path.rpartition(".")
        parent = modules.get(parent_path, model)
        routed = any(
            c is not module and getattr(c, "weight", None) is not None and c.weight.dim() == 2
            and int(c.weight.shape[0]) == len(module)
            for c in parent.children()
        )  # fmt: skip
        if "expert" not in leaf.lower() and not routed:
            continue
        for sub, child in module.named_modules():
            if sub and is_linear(child):
                groups[f"{path}.{sub}"] = parent_path
    return groups


def _default_targets(model: nn.Module) -> list[str] | None:
    mapping = peft_default_target_modules()
    config = getattr(model, "config", None)
    types = [getattr(config, "model_type", None)]
    get_text = getattr(config, "get_text_config", None)
    if callable(get_text):
        types.append(getattr(get_text(), "model_type", None))
    for model_type in types:
        if model_type in mapping:
            return list(mapping[model_type])
    return None
