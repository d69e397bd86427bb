"""Audit a saved PEFT LoRA adapter from its files alone (``adapter_config.json`` + weights), no base model needed.

What the files can tell:

- An adapter whose update ``B @ A`` is exactly zero (``lora_B`` all zero, or ``lora_A`` all zero for embedding
  LoRA) changes nothing: it is **dead**, whatever its init.
- Under an init whose product starts at zero (``init_lora_weights`` ``True``, ``"gaussian"``, ``"eva"``) an adapter
  whose product is non-zero has moved, i.e. **trained**.
- Under the other inits (PiSSA, OLoRA, LoftQ, CorDA, orthogonal, LoRA-GA, ``False``) A and B start non-zero, so a
  non-zero adapter may or may not have trained: **unverified**, unless the folder holds the ``audit.json`` mm-trainer
  wrote at training time, whose per-module status (from fingerprints taken at init) is then used.

Towers come from the module names (:func:`~mm_trainer.towers.tower_from_name`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..towers import TOWERS, tower_from_name
from .naming import group_names
from .serving import ADAPTER_CONFIG, ADAPTER_WEIGHTS, module_of_key
from .status import DEAD_STATUSES

ZERO_PRODUCT_INITS: tuple[Any, ...] = (True, "gaussian", "eva")
"""``init_lora_weights`` values under which ``B @ A`` is zero at init."""

ADAPTER_WEIGHTS_BIN = "adapter_model.bin"


class AdapterDirError(ValueError):
    """The path is not a usable PEFT LoRA adapter (the message says what is missing and what to pass instead)."""


def _find_dir(path: Path) -> Path:
    if path.is_file():
        path = path.parent
    if not path.exists():
        raise AdapterDirError(f"{path} does not exist.")
    if not (path / ADAPTER_CONFIG).is_file():
        checkpoints = sorted(
            path.glob("checkpoint-*"),
            key=lambda p: int(p.name.split("-")[-1]) if p.name.split("-")[-1].isdigit() else -1,
        )
        hint = f" It holds checkpoints; pass one of them, e.g. {checkpoints[-1]}." if checkpoints else ""
        raise AdapterDirError(
            f"{path} has no {ADAPTER_CONFIG}: not a PEFT adapter folder (save one with "
            f"`model.save_pretrained(dir)` or `trainer.save_model(dir)`).{hint}"
        )
    return path


def _load_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads((path / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise AdapterDirError(f"{path / ADAPTER_CONFIG} is not readable JSON: {err}") from err
    if not isinstance(config, dict):
        raise AdapterDirError(f"{path / ADAPTER_CONFIG} does not hold a JSON object.")
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise AdapterDirError(
            f"{path} holds a {config.get('peft_type') or 'non-PEFT'} adapter (peft_type in {ADAPTER_CONFIG}); "
            "mm-trainer audit reads LoRA adapters only."
        )
    return config


def _load_tensors(path: Path) -> dict[str, Any]:
    import torch

    if (path / ADAPTER_WEIGHTS).is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path / ADAPTER_WEIGHTS))
        except (SafetensorError, OSError, ValueError) as err:
            raise AdapterDirError(f"{path / ADAPTER_WEIGHTS} cannot be read: {err}") from err
    if (path / ADAPTER_WEIGHTS_BIN).is_file():
        try:
            return torch.load(path / ADAPTER_WEIGHTS_BIN, map_location="cpu", weights_only=True)
        except Exception as err:
            raise AdapterDirError(f"{path / ADAPTER_WEIGHTS_BIN} cannot be read: {err}") from err
    raise AdapterDirError(f"{path} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS} (or {ADAPTER_WEIGHTS_BIN}).")


def _training_audit(path: Path) -> dict[str, Any] | None:
    from .auditor import AUDIT_JSON

    file = path / AUDIT_JSON
    if not file.is_file():
        return None
    try:
        audit = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return audit if isinstance(audit, dict) and audit.get("kind") == "training" and "modules" in audit else None


def _zero_product_init(init: Any) -> bool:
    return any(
        init is v or (isinstance(init, str) and isinstance(v, str) and init.lower() == v) for v in ZERO_PRODUCT_INITS
    )


def audit_adapter_dir(path: str | Path) -> dict[str, Any]:
    """Audit the PEFT LoRA adapter in ``path`` (a folder, or a file in it).

    Returns:
        ``path``, ``adapter_config`` (r, alpha, init, targets), ``source`` (``"training_audit"`` when mm-trainer's
        ``audit.json`` gave the statuses, else ``"weights"``), ``training_verdict``, ``modules`` (``name``,
        ``tower``, ``params``, ``status``: ``trained`` / ``dead`` / ``unverified`` or a training-audit status,
        ``dead``, ``reason``, norms), ``towers`` (per tower counts and parameters), ``params`` (``nominal``,
        ``effective``, ``dead``, ``other``: non-LoRA trainable tensors such as ``modules_to_save``, counted as
        effective; ``saved_base``: frozen base weights PEFT saved along, not counted), ``dead_groups`` (tower -> ``[pattern, count]``) and ``clean``.

    Raises:
        AdapterDirError: Missing files, unreadable files, or not a LoRA adapter.
    """
    import torch

    folder = _find_dir(Path(path))
    config = _load_config(folder)
    tensors = _load_tensors(folder)
    init = config.get("init_lora_weights", True)
    zero_start = _zero_product_init(init)

    by_module: dict[str, dict[str, Any]] = {}
    other_params = saved_base = 0
    for key, tensor in tensors.items():
        module = module_of_key(key)
        if module is None:
            # ``.base_layer.`` keys are frozen base weights PEFT saves along (``save_embedding_layers``); the rest
            # (``modules_to_save``, trainable tokens) was trained in full.
            if ".base_layer." in key:
                saved_base += tensor.numel()
            else:
                other_params += tensor.numel()
            continue
        entry = by_module.setdefault(module, {"params": 0, "a": None, "b": None})
        entry["params"] += tensor.numel()
        if ".lora_A" in key or ".lora_embedding_A" in key:
            entry["a"] = tensor
        elif ".lora_B" in key or ".lora_embedding_B" in key:
            entry["b"] = tensor
    if not by_module:
        raise AdapterDirError(f"{folder} holds no LoRA tensors (no lora_A / lora_B keys in its weights).")

    training = _training_audit(folder)
    trained_status = {m["name"]: m for m in training["modules"]} if training else {}
    modules = []
    for name, entry in by_module.items():
        a, b = entry["a"], entry["b"]
        a_zero = a is not None and not bool(torch.count_nonzero(a))
        b_zero = b is not None and not bool(torch.count_nonzero(b))
        no_op = a_zero or b_zero
        recorded = trained_status.get(name)
        if no_op:
            status, reason = "dead", "B @ A is exactly zero: the adapter changes nothing"
            if recorded is not None and recorded["status"] in DEAD_STATUSES:
                status, reason = recorded["status"], recorded["reason"]
        elif recorded is not None:
            status, reason = recorded["status"], recorded["reason"]
        elif zero_start:
            status, reason = "trained", f"B @ A is non-zero and started at zero (init_lora_weights={init!r})"
        else:
            status = "unverified"
            reason = (
                f"init_lora_weights={init!r} starts with B @ A != 0, so the weights alone cannot tell whether it "
                "trained (mm-trainer's audit.json would)"
            )
        modules.append(
            {
                "name": name,
                "tower": tower_from_name(name),
                "params": entry["params"],
                "status": status,
                "dead": status == "dead" or status in DEAD_STATUSES,
                "reason": reason,
                "norm_a": float(torch.linalg.vector_norm(a.float())) if a is not None else None,
                "norm_b": float(torch.linalg.vector_norm(b.float())) if b is not None else None,
            }
        )

    towers: dict[str, dict[str, int]] = {}
    for m in modules:
        row = towers.setdefault(m["tower"], {"modules": 0, "dead": 0, "unverified": 0, "nominal": 0, "effective": 0})
        row["modules"] += 1
        row["nominal"] += m["params"]
        if m["dead"]:
            row["dead"] += 1
        else:
            row["effective"] += m["params"]
            row["unverified"] += m["status"] == "unverified"
    towers = {t: towers[t] for t in TOWERS if t in towers}
    lora = sum(m["params"] for m in modules)
    dead_lora = sum(m["params"] for m in modules if m["dead"])
    dead_groups: dict[str, list[list[Any]]] = {}
    for tower in towers:
        names = [m["name"] for m in modules if m["dead"] and m["tower"] == tower]
        if names:
            dead_groups[tower] = [[p, n] for p, n in group_names(names)]
    return {
        "kind": "adapter",
        "path": str(folder),
        "adapter_config": {
            k: config.get(k)
            for k in ("r", "lora_alpha", "init_lora_weights", "use_dora", "target_modules", "modules_to_save")
        }
        | {"base_model_name_or_path": config.get("base_model_name_or_path")},
        "source": "training_audit" if training else "weights",
        "training_verdict": (
            {
                "verdict": training.get("verdict"),
                "reasons": training.get("reasons", []),
                "step": training.get("global_step"),
            }
            if training
            else None
        ),
        "modules": modules,
        "towers": towers,
        "params": {
            "nominal": lora + other_params,
            "effective": lora - dead_lora + other_params,
            "lora_nominal": lora,
            "lora_effective": lora - dead_lora,
            "dead": dead_lora,
            "other": other_params,
            "saved_base": saved_base,
        },
        "dead": [m["name"] for m in modules if m["dead"]],
        "unverified": [m["name"] for m in modules if m["status"] == "unverified"],
        "dead_groups": dead_groups,
        "clean": not any(m["dead"] for m in modules),
    }
