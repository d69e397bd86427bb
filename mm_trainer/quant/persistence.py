"""Saving how a 4-bit base was built (`quantization.json`, LoftQ's offsets), and rebuilding it for a saved adapter."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..model.towers import map_towers
from ..upstream import trl_create_model_from_path
from ..utils.atomic import atomic_write_bytes, atomic_write_json
from .checks import quantization_method
from .layers import (
    DEFAULT_SKIP_TOWERS,
    Nf4Spec,
    checkpoint_skip_modules,
    keep_4bit_layers_trainable,
    mark_loaded_in_4bit,
    quantizable_linears,
    quantize_in_place,
    resolve_compute_dtype,
)
from .loftq import rebuild_quantized

if TYPE_CHECKING:
    from .preparation import QuantizedBase

QUANT_FILE = "quantization.json"
"""Written next to the adapter: how the 4-bit base was built (read by [`load_quantized_base`])."""

LOFTQ_OFFSETS_FILE = "loftq_offsets.safetensors"
"""LoftQ's offset factors `(A_{T-1}, B_{T-1})` per module, when `loftq_iter > 1` (after one iteration `Q` is
plain `nf4(W)` and nothing needs saving)."""


def base_record(self: QuantizedBase) -> dict[str, Any]:
    """What [`load_quantized_base`] needs to rebuild this base."""
    return {
        "format": 1,
        "mode": self.mode,
        "method": self.method,
        "spec": self.spec.to_dict(),
        "skip_towers": self.skip_towers,
        "skip_modules": self.skip_modules,
        "load_dtype": self.load_dtype,
        "base_model": self.base_model,
        "quantized_modules": self.quantized,
        "loftq": {
            "iter": self.loftq_iter,
            "offsets_file": LOFTQ_OFFSETS_FILE if _has_offsets(self) else None,
            "modules": {n: {"rank": r.rank, "scaling": r.scaling} for n, r in self.loftq.items()},
        }
        if self.loftq_iter
        else None,
    }


def _has_offsets(self: QuantizedBase) -> bool:
    return any(r.offset_A is not None for r in self.loftq.values())


def save_base(self: QuantizedBase, output_dir: str | os.PathLike[str]) -> None:
    """Write `quantization.json` (and LoftQ's offsets when `loftq_iter > 1`) into `output_dir`."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(output_dir / QUANT_FILE, base_record(self))
    if _has_offsets(self):
        from safetensors.torch import save

        tensors = {}
        for name, r in self.loftq.items():
            tensors[f"{name}.offset_A"] = r.offset_A.detach().contiguous().cpu()
            tensors[f"{name}.offset_B"] = r.offset_B.detach().contiguous().cpu()
        atomic_write_bytes(output_dir / LOFTQ_OFFSETS_FILE, save(tensors))


def load_quantized_base(
    model: str | nn.Module,
    adapter_dir: str | os.PathLike[str] | None = None,
    *,
    quant_compute_dtype: str = "float32",
    quant_skip_towers: list[str] | tuple[str, ...] = DEFAULT_SKIP_TOWERS,
    **model_init_kwargs: Any,
) -> nn.Module:
    """The 4-bit base an adapter trained with `MMSFTTrainer(quantization=...)` belongs to, built the same way.

    With `adapter_dir` holding `quantization.json` the recorded settings are used: QLoRA loads through
    bitsandbytes with the same `BitsAndBytesConfig`; LoftQ (and in-place QLoRA) load in full precision and quantize
    the same layers with the same settings, `W - s * B_{T-1} @ A_{T-1}` for LoftQ modules after several iterations,
    so the base holds the very `Q` the adapter was trained on. Load the adapter onto it with
    `PeftModel.from_pretrained(base, adapter_dir)`.

    Args:
        model: The base checkpoint's path / hub id, or a full-precision model instance (in-place records only).
        adapter_dir: A directory written by `MMSFTTrainer.save_model` (or a checkpoint).
        quant_compute_dtype: Without a record: the compute dtype (`"float32"`, `"bfloat16"`, `"float16"`).
        quant_skip_towers: Without a record: towers kept in full precision.
        **model_init_kwargs: Passed to `from_pretrained` (`device_map`, `revision`, ...).

    Returns:
        The 4-bit model.
    """
    record = None
    if adapter_dir is not None and (Path(adapter_dir) / QUANT_FILE).is_file():
        record = json.loads((Path(adapter_dir) / QUANT_FILE).read_text())
    if record is None:
        spec = Nf4Spec(compute_dtype=resolve_compute_dtype(quant_compute_dtype))
        record = {
            "method": "from_pretrained" if isinstance(model, str) else "in_place",
            "spec": spec.to_dict(),
            "skip_towers": list(quant_skip_towers),
            "skip_modules": None,
            "load_dtype": model_init_kwargs.pop("dtype", "float32"),
            "quantized_modules": None,
            "loftq": None,
        }
    spec = Nf4Spec.from_dict(record["spec"])
    kwargs = {"dtype": record.get("load_dtype") or "float32", **model_init_kwargs}
    if record["method"] == "from_pretrained":
        if not isinstance(model, str):
            raise ValueError(
                "This adapter's base was quantized by bitsandbytes at load time; pass the base model's path / id so it "
                "is loaded the same way."
            )
        skipped = record["skip_modules"]
        if skipped is None:
            skipped = checkpoint_skip_modules(model, record["skip_towers"], kwargs.get("revision"))
        base = trl_create_model_from_path(model, quantization_config=spec.bnb_config(skipped), **kwargs)
    else:
        base = trl_create_model_from_path(model, **kwargs) if isinstance(model, str) else model
        if quantization_method(base) is not None:
            raise ValueError("load_quantized_base rebuilds an in-place 4-bit base from a full-precision model.")
        tower_map = map_towers(base)
        modules = dict(base.named_modules())
        names = quantizable_linears(tower_map, modules, record["skip_towers"])
        if record["quantized_modules"] is not None and sorted(names) != sorted(record["quantized_modules"]):
            missing = sorted(set(record["quantized_modules"]) ^ set(names))[:5]
            raise ValueError(
                f"This model's linear layers differ from the ones the adapter's base quantized: {missing}"
            )
        offsets = _load_offsets(adapter_dir, record)
        scalings = {n: v["scaling"] for n, v in ((record.get("loftq") or {}).get("modules") or {}).items()}

        def loftq_base(name: str, weight: torch.Tensor) -> tuple[torch.Tensor, Any] | None:
            if name not in offsets:
                return None
            offset_A, offset_B = offsets[name]
            return rebuild_quantized(weight, spec, scalings[name], offset_B, offset_A)

        quantize_in_place(base, names, spec, quantize=loftq_base)
        mark_loaded_in_4bit(base)
    keep_4bit_layers_trainable(base)
    return base


def _load_offsets(adapter_dir: Any, record: dict[str, Any]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    loftq = record.get("loftq") or {}
    if not loftq.get("offsets_file"):
        return {}
    from safetensors.torch import load_file

    tensors = load_file(str(Path(adapter_dir) / loftq["offsets_file"]))
    return {name: (tensors[f"{name}.offset_A"], tensors[f"{name}.offset_B"]) for name in loftq["modules"]}
