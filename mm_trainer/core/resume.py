"""What a resume must find unchanged, and reading a checkpoint's `mm_trainer_state.json` safely.

A resumed run continues the checkpoint's adapters and optimizer state. It must therefore build the same adapters
(kept targets, PEFT method, LoRA rank / alpha / DoRA / rsLoRA) and train them the same way (IMoD on or off,
quantization). A mismatch is refused before the Trainer loads anything, with one sentence saying what differs and
how to proceed, instead of PEFT's size-mismatch trace or a silently mixed run.

Checkpoints of an mm-trainer before [`SETTINGS_KEY`] existed (and of plain TRL) are compared on what their files
still tell: `adapter_config.json` (method, rank, alpha), the state's `modality_balance` entry (IMoD) and
`quantization.json` (4-bit base).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

STATE_FILE = "mm_trainer_state.json"
"""Per-save file with what a resumed run needs: the plan's kept targets, the telemetry history, the init record."""

SETTINGS_KEY = "run_settings"
"""Key of the settings a resume compares, in `mm_trainer_state.json`."""

_ADAPTER_FIELDS = ("peft_type", "r", "lora_alpha", "use_dora", "use_rslora")
_MAX_STATE_BYTES = 512 * 2**20


class CheckpointStateError(ValueError):
    """A checkpoint's `mm_trainer_state.json` is unreadable or of the wrong shape (the message gives the fix)."""


class ResumeMismatchError(ValueError):
    """This run's settings differ from the checkpoint's in something a resume cannot change."""


def corrupt_state(checkpoint: Path, detail: str) -> CheckpointStateError:
    """The error for an unusable state file: names the file and the two ways on."""
    return CheckpointStateError(
        f"{checkpoint / STATE_FILE} is unreadable ({detail}). Resume from an earlier checkpoint, or start a fresh "
        f"run; to resume from this checkpoint anyway, delete {STATE_FILE} (the telemetry history and the audit's "
        "init record then restart from the resume)."
    )


def read_state(checkpoint: Path) -> dict[str, Any] | None:
    """The checkpoint's `mm_trainer_state.json` (`None` when absent), with the type of every entry checked.

    Raises:
        CheckpointStateError: The file cannot be read, is not JSON, or an entry has the wrong type.
    """
    path = checkpoint / STATE_FILE
    if not path.exists():
        return None
    try:
        if path.stat().st_size > _MAX_STATE_BYTES:
            raise corrupt_state(checkpoint, f"{path.stat().st_size} bytes, more than a state file can hold")
        state = json.loads(path.read_text(encoding="utf-8"))
    except CheckpointStateError:
        raise
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise corrupt_state(checkpoint, f"{type(err).__name__}: {err}") from err
    if not isinstance(state, dict):
        raise corrupt_state(checkpoint, f"a JSON {type(state).__name__}, not an object")
    expected: dict[str, tuple[type, ...]] = {
        "kept_targets": (list,),
        "released_towers": (list,),
        "telemetry": (dict,),
        "audit_init": (dict,),
        "modality_balance": (dict,),
        "raw_loss": (dict,),
        SETTINGS_KEY: (dict,),
        "global_step": (int,),
    }
    for key, types in expected.items():
        value = state.get(key)
        if value is not None and not isinstance(value, types):
            raise corrupt_state(checkpoint, f"`{key}` is a {type(value).__name__}")
    if state.get("kept_targets") is not None and not all(isinstance(t, str) for t in state["kept_targets"]):
        raise corrupt_state(checkpoint, "`kept_targets` holds something other than module names")
    telemetry = state.get("telemetry") or {}
    for key, types in (("history", (list,)), ("nonzero_steps", (dict,)), ("fired", (list,))):
        if key in telemetry and not isinstance(telemetry[key], types):
            raise corrupt_state(checkpoint, f"`telemetry.{key}` is a {type(telemetry[key]).__name__}")
    if not all(isinstance(h, dict) for h in telemetry.get("history", [])):
        raise corrupt_state(checkpoint, "`telemetry.history` holds something other than objects")
    record = state.get("audit_init") or {}
    adapters = record.get("adapters", {})
    if not isinstance(adapters, dict) or not all(
        isinstance(v, list) and len(v) == 2 and all(isinstance(f, dict) for f in v) for v in adapters.values()
    ):
        raise corrupt_state(checkpoint, "`audit_init.adapters` is not a map of [A, B] fingerprints")
    return state


def run_settings(model: Any, args: Any) -> dict[str, Any]:
    """The settings of this run that a resume compares (see the module docstring)."""
    configs = getattr(model, "peft_config", None) or {}
    config = configs.get("default") if isinstance(configs, dict) else None
    adapter = {k: _plain(getattr(config, k, None)) for k in _ADAPTER_FIELDS} if config is not None else None
    return {
        "adapter": adapter,
        "imod": bool(getattr(args, "imod", False)),
        "quantization": getattr(args, "quantization", None),
    }


def _plain(value: Any) -> Any:
    value = getattr(value, "value", value)  # PeftType enum
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def checkpoint_settings(checkpoint: Path, state: dict[str, Any] | None) -> dict[str, Any]:
    """The checkpoint's settings: from the state when it records them, else from its other files."""
    saved = (state or {}).get(SETTINGS_KEY)
    out: dict[str, Any] = dict(saved) if isinstance(saved, dict) else {}
    if "adapter" not in out:
        try:
            config = json.loads((checkpoint / "adapter_config.json").read_text(encoding="utf-8"))
            out["adapter"] = {k: config.get(k) for k in _ADAPTER_FIELDS} if isinstance(config, dict) else None
        except (OSError, ValueError, RecursionError):
            out["adapter"] = None
    if "imod" not in out and state is not None:
        balance = state.get("modality_balance")
        out["imod"] = isinstance(balance, dict) and balance.get("imod") is not None
    if "quantization" not in out and state is not None:
        try:
            record = json.loads((checkpoint / "quantization.json").read_text(encoding="utf-8"))
            out["quantization"] = record.get("mode") if isinstance(record, dict) else None
        except FileNotFoundError:
            out["quantization"] = None
        except (OSError, ValueError, RecursionError):
            pass  # unknown: not compared
    return out


def _describe(field: str, value: Any) -> str:
    if field == "imod":
        return "with IMoD" if value else "without IMoD"
    if field == "quantization":
        return f"quantization={value!r}"
    return f"{field}={value!r}"


def check_settings(checkpoint: Path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse a resume whose settings differ from the checkpoint's.

    Raises:
        ResumeMismatchError: One sentence naming the first difference, both values, and how to proceed.
    """
    diffs: list[tuple[str, Any, Any]] = []
    ours, theirs = current.get("adapter") or {}, saved.get("adapter") or {}
    for key in _ADAPTER_FIELDS:
        a, b = theirs.get(key), ours.get(key)
        if key in ("use_dora", "use_rslora"):
            a, b = bool(a), bool(b)
        if key in theirs and key in ours and theirs.get(key) is not None and a != b:
            diffs.append((key, a, b))
    for key in ("imod", "quantization"):
        if key in saved and key in current and saved[key] != current[key]:
            diffs.append((key, saved[key], current[key]))
    if not diffs:
        return
    what = "; ".join(f"checkpoint {_describe(k, a)}, this run {_describe(k, b)}" for k, a, b in diffs)
    fix = ", ".join(_describe(k, a) if k in ("imod", "quantization") else f"{k}={a!r}" for k, a, _ in diffs)
    raise ResumeMismatchError(
        f"Cannot resume from {checkpoint}: it was trained with other settings ({what}); resume with the "
        f"checkpoint's settings ({fix}), or start a fresh run in another output_dir."
    )
