"""Checks before and right after loading: combinations that cannot work fail with the fix, and what a model is."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..model.layers import PARAMS_4BIT, is_4bit_linear, is_quantized_linear
from ..upstream import bnb_config_loads_4bit
from .layers import dtype_name, keep_4bit_layers_trainable

_PLAIN_PARAMETERS = ("Parameter", "Tensor", PARAMS_4BIT, "DTensor")
_QUANTIZED_DTYPES = (torch.int8, torch.uint8, torch.float8_e4m3fn, torch.float8_e5m2)
_OTHER_QUANTIZED_LAYERS = ("QuantLinear", "WQLinear", "HQQLinear", "QLinear", "FP8Linear", "Int8Linear", "Int4Linear")


def init_name(peft_config: Any) -> str:
    init = getattr(peft_config, "init_lora_weights", True)
    if init is True:
        return "default"
    if init is False:
        return "identity-breaking (init_lora_weights=False)"
    return str(init).lower()


def check_peft_config(quantization: str | None, peft_config: Any, model: Any) -> None:
    """Refuse quantization / initialisation combinations that cannot work, before any weight is loaded.

    Raises:
        ValueError: With the fix, for: 4-bit without a `peft_config`; an already wrapped `PeftModel`; PiSSA on a
            4-bit base (PEFT initialises PiSSA from full-precision weights only); LoftQ with another initialisation
            (PEFT's `"loftq"` included) or DoRA; PEFT's own LoftQ (`init_lora_weights="loftq"`) without `quantization="loftq"`.
    """
    init = init_name(peft_config) if peft_config is not None else "default"
    if quantization is None:
        if init == "loftq":
            raise ValueError(
                "`init_lora_weights='loftq'` runs PEFT's LoftQ, which needs CUDA and fails on multimodal checkpoints. "
                "Set `MMSFTConfig(quantization='loftq')` instead (mm-trainer's own LoftQ, any device, targeted "
                "modules only) and leave `init_lora_weights` at its default."
            )
        return
    if peft_config is None:
        raise ValueError(
            f"`quantization={quantization!r}` trains LoRA adapters on a frozen 4-bit base and needs a `peft_config` "
            "(e.g. `LoraConfig(target_modules='all-linear')`). Pass one, or unset `quantization`."
        )
    if type(model).__name__.startswith("Peft"):
        raise ValueError(
            f"`quantization={quantization!r}` needs the base model, not a `{type(model).__name__}`: pass the base "
            "model (or its path) together with `peft_config`."
        )
    if init.startswith("pissa"):
        raise ValueError(
            f"`init_lora_weights={peft_config.init_lora_weights!r}` (PiSSA) cannot start from a 4-bit base: PEFT "
            "computes PiSSA from full-precision weights and rewrites them. Use `quantization='loftq'` (an SVD "
            "initialisation that accounts for the 4-bit error) or train PiSSA with `quantization=None`."
        )
    if quantization == "loftq":
        if init == "loftq":
            raise ValueError(
                "`quantization='loftq'` computes the adapters' initial LoftQ factors itself; "
                "`init_lora_weights='loftq'` would also run PEFT's LoftQ (CUDA only) on the same layers. Remove "
                "`init_lora_weights` (leave it at its default)."
            )
        if init not in ("default", "gaussian"):
            raise ValueError(
                f"`quantization='loftq'` sets the adapters' initial values itself; it cannot be combined with "
                f"`init_lora_weights={peft_config.init_lora_weights!r}`. Remove `init_lora_weights`, or use "
                "`quantization='qlora'` with that initialisation."
            )
        if getattr(peft_config, "use_dora", False):
            raise ValueError(
                "`quantization='loftq'` does not support DoRA (`use_dora=True`): DoRA's magnitude is computed from "
                "the base weight before LoftQ sets the adapters. Use `quantization='qlora'` with DoRA."
            )
        if type(peft_config).__name__ != "LoraConfig":
            raise ValueError(
                f"`quantization='loftq'` initialises LoRA adapters and needs a `LoraConfig`, got "
                f"{type(peft_config).__name__}. Use `quantization='qlora'` for other PEFT methods."
            )


def check_loaded_model(model: nn.Module, quantization: str | None) -> str | None:
    """Check a loaded (or passed) model against `quantization`; returns its [`quantization_method`].

    Any bitsandbytes 4-bit layers are kept on their training path on CPU ([`keep_4bit_layers_trainable`]), also
    when `quantization` is unset.

    Raises:
        ValueError: `quantization` is set and the model is quantized another way (8-bit, GPTQ, AWQ, torchao, ...),
            or `quantization="loftq"` and the model is already 4-bit (LoftQ needs the full-precision weights).
    """
    method = quantization_method(model)
    if method == "bnb-4bit":
        keep_4bit_layers_trainable(model)
    if quantization is None or method is None:
        return method
    if method != "bnb-4bit":
        raise ValueError(
            f"`quantization={quantization!r}` asks for an nf4 4-bit base, but the model is already quantized with "
            f"{method}. Pass the full-precision model or its path (mm-trainer then quantizes it), or unset "
            "`quantization` to train the model as it is."
        )
    if quantization == "loftq":
        raise ValueError(
            "`quantization='loftq'` needs the full-precision weights of the targeted modules, but the model is "
            "already 4-bit. Pass the model path / id or an unquantized model, or use `quantization='qlora'`."
        )
    return method


def quantization_method(model: nn.Module) -> str | None:
    """`None` for a full-precision model, `"bnb-4bit"`, `"bnb-8bit"`, or the name of another method.

    Reads `config.quantization_config` / `hf_quantizer` first, then the layer classes and parameter dtypes (for a
    model quantized by hand).
    """
    qconfig = getattr(getattr(model, "config", None), "quantization_config", None)
    if qconfig is None and getattr(model, "hf_quantizer", None) is not None:
        qconfig = model.hf_quantizer.quantization_config
    if qconfig is not None:
        data = qconfig if isinstance(qconfig, dict) else qconfig.to_dict()
        method = str(getattr(data.get("quant_method"), "value", data.get("quant_method")) or "unknown")
        if method == "bitsandbytes":
            if bnb_config_loads_4bit(data):
                return "bnb-4bit"
            return "bnb-8bit"
        return method
    found: set[str] = set()
    for module in model.modules():
        name = type(module).__name__
        if is_4bit_linear(module):
            found.add("bnb-4bit")
        elif is_quantized_linear(module):
            found.add("bnb-8bit")
        elif any(tag in name for tag in _OTHER_QUANTIZED_LAYERS):
            found.add(name)
    for param in model.parameters():
        kind = type(param).__name__
        if kind in _PLAIN_PARAMETERS:
            if kind in ("Parameter", "Tensor") and param.dtype in _QUANTIZED_DTYPES:
                found.add(f"{dtype_name(param.dtype)} weights")
            continue
        found.add(kind)  # tensor subclasses: torchao's AffineQuantizedTensor and the like
    if not found:
        return None
    others = sorted(found - {"bnb-4bit"})
    return others[0] if others else "bnb-4bit"
