"""Enumerate the LoRA adapters of a PEFT model: one entry per adapted module, with its A and B parameters."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..distributed.sharding import full_numel
from .peft_names import strip_peft_prefix
from .towers import TowerMap


@dataclass
class LoraAdapter:
    """One adapted module.

    Attributes:
        name: Path of the adapted module in the base model (`model.language_model.layers.0.self_attn.q_proj`).
        tower: Its tower.
        module: The PEFT LoRA layer.
        lora_A: Parameter of A (`r x in`; for embeddings PEFT's `lora_embedding_A`).
        lora_B: Parameter of B (`out x r`).
        param_names: Names of A and B in the base model (`<name>.lora_A.default.weight`, ...): how the audit tells
            LoRA weights from other trainable parameters when an engine has replaced the parameter objects.
    """

    name: str
    tower: str
    module: nn.Module
    lora_A: nn.Parameter
    lora_B: nn.Parameter
    param_names: tuple[str, str] = ("", "")

    @property
    def params(self) -> int:
        """Trainable parameters of this adapter (A and B), counted whole however the engine shards them."""
        return full_numel(self.lora_A) + full_numel(self.lora_B)


def _adapter_weights(
    module: nn.Module, adapter_name: str
) -> tuple[nn.Parameter, nn.Parameter, tuple[str, str]] | None:
    """A, B and their names relative to `module` (`None` when `module` holds no LoRA of `adapter_name`)."""
    lora_a = getattr(module, "lora_A", None)
    lora_b = getattr(module, "lora_B", None)
    if isinstance(lora_a, nn.ModuleDict) and adapter_name in lora_a and adapter_name in lora_b:
        names = (f"lora_A.{adapter_name}.weight", f"lora_B.{adapter_name}.weight")
        return lora_a[adapter_name].weight, lora_b[adapter_name].weight, names
    emb_a = getattr(module, "lora_embedding_A", None)
    emb_b = getattr(module, "lora_embedding_B", None)
    if isinstance(emb_a, nn.ParameterDict) and adapter_name in emb_a and adapter_name in emb_b:
        names = (f"lora_embedding_A.{adapter_name}", f"lora_embedding_B.{adapter_name}")
        return emb_a[adapter_name], emb_b[adapter_name], names
    return None


def lora_adapters(
    model: nn.Module, tower_map: TowerMap | None = None, adapter_name: str = "default"
) -> list[LoraAdapter]:
    """Every LoRA-adapted module of `model` (a `PeftModel` or a model holding PEFT LoRA layers), in model order.

    Args:
        model: The PEFT-wrapped model.
        tower_map: Tower map of the base model, to tag each adapter with its tower (`"other"` without one).
        adapter_name: The PEFT adapter to enumerate.
    """
    out: list[LoraAdapter] = []
    for path, module in model.named_modules():
        weights = _adapter_weights(module, adapter_name)
        if weights is None:
            continue
        name = strip_peft_prefix(path)
        parameter = getattr(module, "parameter_name", None)
        if isinstance(parameter, str):
            # PEFT's ParamWrapper (`target_parameters`, e.g. fused 3-D experts): one wrapper per parameter, nested
            # in `base_layer`s of the module that holds them; named after the parameter it adapts.
            name = ".".join(part for part in name.split(".") if part != "base_layer") + f".{parameter}"
        tower = tower_map.tower_of(name) if tower_map is not None else "other"
        lora_a, lora_b, (name_a, name_b) = weights
        out.append(LoraAdapter(name, tower, module, lora_a, lora_b, (f"{name}.{name_a}", f"{name}.{name_b}")))
    return out
