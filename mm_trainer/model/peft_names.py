"""PEFT's names: the prefix a `PeftModel` puts before every module path, and the module of an adapter weight key.

A `PeftModel` holds the base model at `base_model.model`, so `model.visual.blocks.0.mlp.down_proj` of the base model
is `base_model.model.model.visual.blocks.0.mlp.down_proj` in it, and its adapter weights are saved under that path
followed by `.lora_A.weight` / `.lora_B.weight` (the adapter name is left out of saved keys).
"""

from __future__ import annotations

PEFT_PREFIX = "base_model.model."
"""What a `PeftModel` puts before the module paths of its base model."""


def strip_peft_prefix(name: str) -> str:
    """Module path as in the base model, for a path taken from a `PeftModel` (other paths are returned as they are)."""
    return name[len(PEFT_PREFIX) :] if name.startswith(PEFT_PREFIX) else name


def is_peft_model(model: object) -> bool:
    """Whether `model` is a `peft.PeftModel` (`False` when PEFT is not installed)."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PeftModel)


def peft_method(peft_config: object) -> str:
    """The PEFT method's name of a config: `LoRA`, `IA3`, `LoHa`, ... (from its `peft_type`, else its class name)."""
    peft_type = getattr(peft_config, "peft_type", None)
    name = str(getattr(peft_type, "value", peft_type) or type(peft_config).__name__.removesuffix("Config"))
    return "LoRA" if name.upper() == "LORA" else name


def peft_path(name: str) -> str:
    """The path of base-model module `name` inside a `PeftModel`."""
    return PEFT_PREFIX + name


_LORA_MARKERS = (".lora_A", ".lora_B", ".lora_embedding_A", ".lora_embedding_B", ".lora_magnitude_vector")


def module_of_key(key: str) -> str | None:
    """Module path (as in the base model) of a LoRA tensor key of a saved PEFT adapter, `None` for other keys.

    `base_model.model.model.visual.blocks.0.mlp.down_proj.lora_B.weight` -> `model.visual.blocks.0.mlp.down_proj`.
    """
    for marker in _LORA_MARKERS:
        cut = key.find(marker + ".")
        if cut == -1 and key.endswith(marker):
            cut = len(key) - len(marker)
        if cut != -1:
            return strip_peft_prefix(key[:cut])
    return None
