"""Audit a saved PEFT LoRA adapter from its files alone (`adapter_config.json` + weights), no base model needed.

What the files can tell:

- An adapter whose update `B @ A` is exactly zero (`lora_B` all zero, or `lora_A` all zero for embedding
  LoRA) changes nothing: it is **dead**, whatever its init.
- An adapter with `lora_A` but no `lora_B` (or the reverse) in its weights is **missing** (dead: PEFT would
  load the absent factor at its init value, so the saved training is not all there).
- An adapter holding NaN or infinity is listed in `non_finite`; the audit then fails (exit 1) whatever the statuses.
- Under an init whose product starts at zero (`init_lora_weights` `True`, `"gaussian"`, `"eva"`) an adapter
  whose product is non-zero has moved, i.e. **trained**.
- Under the other inits (PiSSA, OLoRA, LoftQ, CorDA, orthogonal, LoRA-GA, `False`) A and B start non-zero, so a
  non-zero adapter may or may not have trained: **unverified**, unless the folder holds the `audit.json` mm-trainer
  wrote at training time, whose per-module status (from fingerprints taken at init) is then used.

Towers come from the module names ([`~mm_trainer.model.towers.tower_from_name`]).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..model.peft_names import module_of_key
from ..model.towers import TOWERS, tower_from_name
from ..utils.checkpoints import list_checkpoints
from .naming import group_names
from .serving import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from .status import DEAD_STATUSES

ZERO_PRODUCT_INITS: tuple[Any, ...] = (True, "gaussian", "eva")
"""`init_lora_weights` values under which `B @ A` is zero at init."""

ADAPTER_WEIGHTS_BIN = "adapter_model.bin"
MAX_CONFIG_BYTES = 64 * 2**20
"""Largest `adapter_config.json` / `audit.json` read (real ones are a few KB / a few hundred KB)."""


class AdapterDirError(ValueError):
    """The path is not a usable PEFT LoRA adapter (the message says what is missing and what to pass instead)."""


def _find_dir(path: Path) -> Path:
    try:
        path.stat()
    except OSError as err:
        if path.is_symlink():
            raise AdapterDirError(f"{path} is a broken or looping symbolic link ({err.strerror}).") from err
        raise AdapterDirError(f"{path} does not exist.") from err
    if path.is_file():
        path = path.parent
    if not path.is_dir():
        raise AdapterDirError(f"{path} is not a directory or a file in one.")
    if not (path / ADAPTER_CONFIG).is_file():
        checkpoints = list_checkpoints(path)
        hint = f" It holds checkpoints; pass one of them, e.g. {checkpoints[-1]}." if checkpoints else ""
        raise AdapterDirError(
            f"{path} has no {ADAPTER_CONFIG}: not a PEFT adapter folder (save one with "
            f"`model.save_pretrained(dir)` or `trainer.save_model(dir)`).{hint}"
        )
    return path


def read_json_file(file: Path, what: str = "JSON") -> Any:
    """The JSON in `file`, refusing files over [`MAX_CONFIG_BYTES`] and nesting Python cannot parse.

    Raises:
        AdapterDirError: Unreadable, too large, not UTF-8, not JSON or nested too deeply; the message names the file.
    """
    try:
        size = file.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise AdapterDirError(f"{file} is {size:,} bytes, too large for {what} (limit {MAX_CONFIG_BYTES:,}).")
        return json.loads(file.read_text(encoding="utf-8"))
    except AdapterDirError:
        raise
    except RecursionError as err:
        raise AdapterDirError(f"{file} is not readable {what}: nested too deeply") from err
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise AdapterDirError(f"{file} is not readable {what}: {err}") from err


def _load_config(path: Path) -> dict[str, Any]:
    config = read_json_file(path / ADAPTER_CONFIG)
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
        except (SafetensorError, OSError, ValueError, RuntimeError, MemoryError) as err:
            raise AdapterDirError(f"{path / ADAPTER_WEIGHTS} cannot be read: {err}") from err
    if (path / ADAPTER_WEIGHTS_BIN).is_file():
        try:
            return torch.load(path / ADAPTER_WEIGHTS_BIN, map_location="cpu", weights_only=True)
        except Exception as err:
            raise AdapterDirError(f"{path / ADAPTER_WEIGHTS_BIN} cannot be read: {err}") from err
    raise AdapterDirError(f"{path} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS} (or {ADAPTER_WEIGHTS_BIN}).")


def _training_audit(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """mm-trainer's `audit.json` beside the adapter, and why it was not used (`None`: used, or absent)."""
    from .auditor import AUDIT_JSON

    file = path / AUDIT_JSON
    if not file.exists() and not file.is_symlink():
        return None, None
    try:
        audit = read_json_file(file, "JSON")
    except AdapterDirError as err:
        return None, f"{err}; statuses come from the weights alone"
    if not isinstance(audit, dict) or audit.get("kind") != "training":
        return None, f"{file} is not an mm-trainer training audit; statuses come from the weights alone"
    modules = audit.get("modules")
    if not isinstance(modules, list) or not all(
        isinstance(m, dict) and isinstance(m.get("name"), str) and isinstance(m.get("status"), str) for m in modules
    ):
        return None, f"{file} has no valid `modules` list; statuses come from the weights alone"
    reasons = audit.get("reasons")
    reasons = reasons if isinstance(reasons, list) else []
    kept = [r for r in reasons if isinstance(r, dict) and all(isinstance(r.get(k), str) for k in ("level", "message"))]
    return {**audit, "reasons": kept}, None


def _zero_product_init(init: Any) -> bool:
    return any(
        init is v or (isinstance(init, str) and isinstance(v, str) and init.lower() == v) for v in ZERO_PRODUCT_INITS
    )


def audit_adapter_dir(path: str | Path) -> dict[str, Any]:
    """Audit the PEFT LoRA adapter in `path` (a folder, or a file in it).

    Returns:
        `path`, `adapter_config` (r, alpha, init, targets), `source` (`"training_audit"` when mm-trainer's
        `audit.json` gave the statuses, else `"weights"`), `training_verdict`, `modules` (`name`,
        `tower`, `params`, `status`: `trained` / `dead` / `unverified` or a training-audit status,
        `dead`, `reason`, norms), `towers` (per tower counts and parameters), `params` (`nominal`,
        `effective`, `dead`, `other`: non-LoRA trainable tensors such as `modules_to_save`, counted as
        effective; `saved_base`: frozen base weights PEFT saved along, not counted), `dead_groups` (tower -> `[pattern, count]`) and `clean`.

    Raises:
        AdapterDirError: Missing files, unreadable files, or not a LoRA adapter.
    """
    folder = _find_dir(Path(path))
    config = _load_config(folder)
    tensors = _load_tensors(folder)
    by_module, other_params, saved_base = _group_by_module(folder, tensors)
    training, training_note = _training_audit(folder)
    recorded = {m["name"]: m for m in training["modules"]} if training else {}
    init = config.get("init_lora_weights", True)
    modules = [_judge_module(name, entry, recorded.get(name), init) for name, entry in by_module.items()]
    towers = _tower_rows(modules)
    lora = sum(m["params"] for m in modules)
    dead_lora = sum(m["params"] for m in modules if m["dead"])
    dead_groups: dict[str, list[list[Any]]] = {}
    for tower in towers:
        names = [m["name"] for m in modules if m["dead"] and m["tower"] == tower]
        if names:
            dead_groups[tower] = [[p, n] for p, n in group_names(names)]
    non_finite = [m["name"] for m in modules if not m["finite"]]
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
        "missing": [m["name"] for m in modules if m["status"] == "missing"],
        "non_finite": non_finite,
        "unverified": [m["name"] for m in modules if m["status"] == "unverified"],
        "dead_groups": dead_groups,
        "training_audit_note": training_note,
        "clean": not any(m["dead"] for m in modules) and not non_finite,
    }


def _group_by_module(folder: Path, tensors: Any) -> tuple[dict[str, dict[str, Any]], int, int]:
    """The LoRA tensors of each adapted module (`params`, `a`, `b`), and the element counts of the other trainable
    tensors (`modules_to_save`, trainable tokens) and of the frozen base weights PEFT saved along."""
    import torch

    if not isinstance(tensors, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()
    ):
        raise AdapterDirError(f"{folder}: the adapter weights are not a map of tensor names to tensors.")
    by_module: dict[str, dict[str, Any]] = {}
    other_params = saved_base = 0
    for key, tensor in tensors.items():
        module = module_of_key(key)
        if module is None:
            # `.base_layer.` keys are frozen base weights PEFT saves along (`save_embedding_layers`); the rest
            # (`modules_to_save`, trainable tokens) was trained in full.
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
    return by_module, other_params, saved_base


def _judge_module(name: str, entry: dict[str, Any], recorded: dict[str, Any] | None, init: Any) -> dict[str, Any]:
    """One adapted module's audit row from its weights and, when present, the training audit's status for it."""
    import torch

    a, b = entry["a"], entry["b"]
    finite = all(bool(torch.isfinite(t).all()) for t in (a, b) if t is not None and t.is_floating_point())
    no_op = (a is not None and not bool(torch.count_nonzero(a))) or (
        b is not None and not bool(torch.count_nonzero(b))
    )
    if a is None or b is None:
        status = "missing"
        reason = (
            f"the weights hold lora_{'A' if a is not None else 'B'} but no lora_{'B' if a is not None else 'A'}: "
            "the adapter is incomplete (PEFT would load the absent factor at its init value)"
        )
    elif no_op:
        status, reason = "dead", "B @ A is exactly zero: the adapter changes nothing"
        if recorded is not None and recorded["status"] in DEAD_STATUSES:
            status, reason = recorded["status"], recorded["reason"]
    elif recorded is not None:
        status, reason = recorded["status"], recorded["reason"]
    elif _zero_product_init(init):
        status, reason = "trained", f"B @ A is non-zero and started at zero (init_lora_weights={init!r})"
    else:
        status = "unverified"
        reason = (
            f"init_lora_weights={init!r} starts with B @ A != 0, so the weights alone cannot tell whether it "
            "trained (mm-trainer's audit.json would)"
        )
    if not finite:
        reason += "; holds NaN or infinity"
    return {
        "name": name,
        "tower": tower_from_name(name),
        "params": entry["params"],
        "status": status,
        "dead": status in ("dead", "missing") or status in DEAD_STATUSES,
        "finite": finite,
        "reason": str(reason),
        "norm_a": _norm(a),
        "norm_b": _norm(b),
    }


def _tower_rows(modules: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Per tower: adapted modules, dead and unverified ones, nominal and effective LoRA parameters."""
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
    return {t: towers[t] for t in TOWERS if t in towers}


def _norm(tensor: Any) -> float | str | None:
    """Frobenius norm in float64 (no overflow for finite float32 weights); `"nan"` / `"inf"` as strings."""
    if tensor is None:
        return None
    import math

    import torch

    value = float(torch.linalg.vector_norm(tensor.double()))
    return value if math.isfinite(value) else str(value)
