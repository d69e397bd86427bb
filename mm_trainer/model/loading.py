"""Load a model by path without materializing the towers the data never reaches.

A text-only run releases a VLM's vision tower ([`mm_trainer.model.release`]), but when the trainer is given a model
instance, or loads one in full, the peak memory still holds the tower. Given a path or Hub id instead, mm-trainer
decides which towers it would release *before* loading (from the dataset's modality profile and the model's config,
built on the meta device) and loads through `from_pretrained` with a `device_map` that places those towers on
`"disk"`: transformers indexes their weights where they lie in the checkpoint files (it reads each tensor once on
the way and keeps none; nothing is written) and leaves their parameters on the meta device, while the language model,
the embeddings and everything else load as usual. The accelerate hooks
that the disk placement adds are removed right after the load, and
[`~mm_trainer.model.release.release_unloaded_towers`] then gives the towers the same state a release leaves.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .towers import NON_TEXT_TOWERS, map_towers

logger = logging.getLogger(__name__)

_DISK = "disk"


@dataclass
class UnloadedTowers:
    """Towers to leave unloaded in one `from_pretrained` call.

    Attributes:
        roots: `(path, tower)` of each tower root left on the meta device.
        device: The device everything else loads to (what the `device_map` asked for).
        device_map: The `device_map` given to `from_pretrained`: the user's single device per module, the towers on
            `"disk"`.
        user_device_map: The `device_map` the load would have had (restored as `hf_device_map` after it).
    """

    roots: list[tuple[str, str]]
    device: Any
    device_map: dict[str, Any] = field(default_factory=dict)
    user_device_map: Any = None


def single_device(device_map: Any) -> Any | None:
    """The one device `device_map` loads every weight to, or `None` when it spreads the model (or can't tell).

    `None` (no map) is the CPU; `"auto"` and the other strategies are one device only when at most one accelerator
    is visible.
    """
    if device_map is None:
        return "cpu"
    if isinstance(device_map, dict):
        values = set(device_map.values())
        return next(iter(values)) if len(values) == 1 and _DISK not in values else None
    if isinstance(device_map, (int, torch.device)):
        return device_map
    if isinstance(device_map, str):
        if device_map in ("auto", "balanced", "balanced_low_0", "sequential"):
            if torch.cuda.is_available():
                return 0 if torch.cuda.device_count() == 1 else None
            return "cpu"
        return device_map
    return None


def unreached_roots(meta_model: nn.Module, reached: set[str], selected: set[str]) -> list[tuple[str, str]]:
    """Vision / audio tower roots of `meta_model` whose tower the data does not reach and no one selected."""
    roots = map_towers(meta_model).roots
    return [
        (path, tower)
        for path, (tower, _why) in roots.items()
        if tower in NON_TEXT_TOWERS and tower not in reached and tower not in selected
    ]


def device_map_without(meta_model: nn.Module, roots: list[str], device: Any) -> dict[str, Any] | None:
    """A `device_map` that puts every module on `device` except the subtrees at `roots` (on `"disk"`).

    It names the siblings along the path to each root instead of a catch-all `""` (accelerate's root hook would
    otherwise try to place the towers' meta tensors). `None` when a module on such a path holds weights of its own
    (no module-level map can leave them out).
    """
    # A torch.device, not a string: bitsandbytes keeps every module mapped to the string "cpu" in full precision.
    device = torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    mapping: dict[str, Any] = {"": device}
    for root in roots:
        parts = root.split(".")
        for depth in range(len(parts)):
            parent = ".".join(parts[:depth])
            if parent not in mapping:
                continue
            module = meta_model.get_submodule(parent)
            if any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False)):
                return None
            del mapping[parent]
            prefix = parent + "." if parent else ""
            for name, _child in module.named_children():
                mapping.setdefault(prefix + name, device)
        mapping[root] = _DISK
    return mapping


def load_kwargs(unloaded: UnloadedTowers, kwargs: dict[str, Any], offload_folder: str) -> dict[str, Any]:
    """`from_pretrained` kwargs that leave `unloaded.roots` on the meta device."""
    out = {**kwargs, "device_map": unloaded.device_map, "offload_folder": offload_folder}
    qconfig = out.get("quantization_config")
    if qconfig is not None and hasattr(qconfig, "llm_int8_enable_fp32_cpu_offload"):
        # bitsandbytes refuses a "disk" entry unless CPU offload is allowed; the towers stay in full precision anyway.
        qconfig.llm_int8_enable_fp32_cpu_offload = True
    return out


def finish_load(model: nn.Module, unloaded: UnloadedTowers) -> None:
    """Undo what the disk placement added: accelerate's hooks, the `hf_device_map` and the CPU-offload flag."""
    from accelerate.hooks import remove_hook_from_module

    remove_hook_from_module(model, recurse=True)
    if unloaded.user_device_map is None:
        if hasattr(model, "hf_device_map"):
            del model.hf_device_map
    else:
        model.hf_device_map = {"": unloaded.device}
    qconfig = getattr(model.config, "quantization_config", None)
    if qconfig is not None and hasattr(qconfig, "llm_int8_enable_fp32_cpu_offload"):
        qconfig.llm_int8_enable_fp32_cpu_offload = False
    model.tie_weights()  # the hooks' weight moves may leave tied tensors as separate objects
    on_meta = [
        n
        for n, p in model.named_parameters()
        if p.is_meta and not any(n.startswith(r + ".") for r, _ in unloaded.roots)
    ]
    if on_meta:
        raise RuntimeError(
            f"mm-trainer: loading without the unreached towers left weights outside them unloaded ({on_meta[:3]}). "
            "Set `free_unreached_towers=False` to load the full model, and report this with the model id."
        )


def load_without(load: Any, model_id: str, kwargs: dict[str, Any], unloaded: UnloadedTowers) -> nn.Module:
    """`load(model_id, **kwargs)` (a `from_pretrained`-like callable) with `unloaded.roots` never materialized."""
    dispatch_log = logging.getLogger("accelerate.big_modeling")
    quiet = _DropOffloadNotice()
    dispatch_log.addFilter(quiet)  # "Some parameters are on the meta device because they were offloaded": by design
    try:
        with tempfile.TemporaryDirectory(prefix="mm-trainer-offload-") as folder:
            model = load(model_id, **load_kwargs(unloaded, kwargs, folder))
    finally:
        dispatch_log.removeFilter(quiet)
    finish_load(model, unloaded)
    logger.info("Loaded %s without its unreached tower(s) %s.", model_id, ", ".join(p for p, _ in unloaded.roots))
    return model


class _DropOffloadNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "offloaded to the" not in record.getMessage()


def plan_unloaded(
    meta_model: nn.Module, device_map: Any, reached: set[str], selected: set[str]
) -> tuple[UnloadedTowers | None, str | None]:
    """Which towers of `meta_model` to leave unloaded, or `(None, reason)` when none can be."""
    roots = unreached_roots(meta_model, reached, selected)
    if not roots:
        return None, None
    device = single_device(device_map)
    if device is None:
        return None, f"the device_map {device_map!r} spreads the model over several devices"
    mapping = device_map_without(meta_model, [p for p, _ in roots], device)
    if mapping is None:
        return None, "a module above a tower holds weights of its own"
    return UnloadedTowers(roots, device, mapping, device_map), None
