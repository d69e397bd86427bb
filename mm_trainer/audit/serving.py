"""Serving-clean save: drop the adapters that never trained from the saved adapter, and name only the trained
modules in `adapter_config.json`, so that serving engines which reject LoRA on vision towers load it."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..model.peft_names import module_of_key
from ..utils.atomic import atomic_write_bytes, atomic_write_text

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def strip_untrained(adapter_dir: Path, modules: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Rewrite the adapter in `adapter_dir` without the adapters whose status is not `trained`.

    Only adapters whose update `B @ A` is exactly zero (`no_op`) are stripped: removing them changes no output.
    An untrained adapter with a non-zero product (a PiSSA / OLoRA / LoftQ start, whose init was also subtracted
    from the base weights) is kept, and listed, because removing it would change the model. Files are replaced
    atomically; when nothing would remain, nothing is changed.

    Args:
        adapter_dir: A directory written by `PeftModel.save_pretrained`.
        modules: The audit's `modules` entries (`name`, `status`, `no_op`).

    Returns:
        What was done: `stripped` and `kept_untrained` module names, `target_modules` written, or `skipped`
        with the reason.
    """
    from safetensors import safe_open
    from safetensors.torch import save

    weights, config_path = adapter_dir / ADAPTER_WEIGHTS, adapter_dir / ADAPTER_CONFIG
    if not weights.is_file() or not config_path.is_file():
        return {"skipped": f"no {ADAPTER_WEIGHTS} / {ADAPTER_CONFIG} in {adapter_dir} (save with safetensors)"}
    untrained = [m for m in modules if m["status"] != "trained"]
    strip = {m["name"] for m in untrained if m.get("no_op")}
    kept_untrained = [m["name"] for m in untrained if m["name"] not in strip]
    keep = [m["name"] for m in modules if m["name"] not in strip]
    if not strip:
        return {"stripped": [], "kept_untrained": kept_untrained, "target_modules": None}
    if not keep:
        return {"skipped": "no adapter trained: the adapter is saved unchanged"}

    with safe_open(str(weights), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys() if module_of_key(k) not in strip}  # noqa: SIM118 (safe_open is not iterable)
    config = json.loads(config_path.read_text())
    config["target_modules"] = sorted(keep)
    # Each file atomically (temp + fsync + rename); the weights first: a kill between the two leaves the stripped
    # weights with the full target list, which PEFT loads with zero-product adapters for the stripped modules.
    atomic_write_bytes(weights, save(tensors, metadata=metadata))
    atomic_write_text(config_path, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return {"stripped": sorted(strip), "kept_untrained": kept_untrained, "target_modules": sorted(keep)}
