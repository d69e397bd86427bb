"""Which transformers class a config builds, and that model on the meta device (module tree, no weights read).

One rule for `mm-trainer plan` and for the 4-bit skip list found before a load: TRL's `create_model_from_path`
rule (the class `architectures[0]` names; for remote code the auto class `auto_map` declares), so the module paths
of the meta model are those of the model the trainer then loads. Configs without `architectures` (TRL cannot load
them) fall back to the first auto class that maps the config.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

_AUTO_CLASSES = ("AutoModelForImageTextToText", "AutoModelForCausalLM")
_MAPPINGS = ("MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING", "MODEL_FOR_CAUSAL_LM_MAPPING", "MODEL_MAPPING")


def model_class_for(config: Any) -> type:
    """The class that builds `config`: a model class, or an auto class for remote code / no `architectures`."""
    import transformers

    architectures = getattr(config, "architectures", None) or []
    if architectures:
        cls = getattr(transformers, architectures[0], None)
        if cls is not None:
            return cls
        auto_map = getattr(config, "auto_map", None) or {}
        for name in _AUTO_CLASSES:
            if name in auto_map:
                return getattr(transformers, name)
        return transformers.AutoModelForCausalLM
    for name in _MAPPINGS:
        mapping = getattr(transformers, name)
        if type(config) in mapping:
            return mapping[type(config)]
    raise ValueError(
        f"Cannot tell which model class builds a {type(config).__name__}: set `architectures` in config.json."
    )


def meta_model(config: Any, trust_remote_code: bool = False) -> nn.Module:
    """The model `config` builds, instantiated on the meta device: the full module tree, no weight memory."""
    cls = model_class_for(config)
    with torch.device("meta"):
        if cls.__name__.startswith("Auto"):
            return cls.from_config(config, trust_remote_code=trust_remote_code)
        return cls(config)
