"""Linear layers LoRA can adapt, their sizes, and the one place that recognises bitsandbytes 4-bit / 8-bit layers.

bitsandbytes is recognised by class name, never imported here: importing it costs about a second and it is
optional on some paths (`mm-trainer plan` reads no weight). The names are bitsandbytes' own (`Linear4bit`,
`Linear8bitLt`, `Params4bit`); PEFT's LoRA wrapper of a 4-bit layer is also named `Linear4bit`
(`peft.tuners.lora.bnb.Linear4bit`), so [`is_4bit_linear`] is true for both, as the quantization code expects.
"""

from __future__ import annotations

import sys

from torch import nn

from ..upstream import peft_tuner_layer_class

LINEAR_4BIT = "Linear4bit"
"""Class name of bitsandbytes' 4-bit linear layer (and of PEFT's LoRA layer wrapping one)."""

LINEAR_8BIT = "Linear8bitLt"
"""Class name of bitsandbytes' 8-bit linear layer."""

PARAMS_4BIT = "Params4bit"
"""Class name of bitsandbytes' packed 4-bit weight."""


def is_4bit_linear(module: nn.Module) -> bool:
    """Whether `module` is a bitsandbytes `Linear4bit` (or PEFT's LoRA layer of the same name wrapping one)."""
    return type(module).__name__ == LINEAR_4BIT


def is_quantized_linear(module: nn.Module) -> bool:
    """Whether `module` is a bitsandbytes 4-bit or 8-bit linear layer."""
    return type(module).__name__ in (LINEAR_4BIT, LINEAR_8BIT)


def is_4bit_weight(param: object) -> bool:
    """Whether `param` is a bitsandbytes packed 4-bit weight (`Params4bit`)."""
    return type(param).__name__ == PARAMS_4BIT


def is_linear(module: nn.Module) -> bool:
    """Whether `module` is a linear layer LoRA can adapt.

    `nn.Linear` and its subclasses (bitsandbytes `Linear4bit` / `Linear8bitLt` derive from it) and transformers'
    GPT-2 style `Conv1D`. PEFT tuner layers that already wrap a linear layer are not counted again.
    """
    if is_tuner_layer(module):
        return False
    if isinstance(module, nn.Linear):
        return True
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_tuner_layer(module: nn.Module) -> bool:
    """Whether `module` is a PEFT adapter layer (`BaseTunerLayer`)."""
    if "peft" not in sys.modules:  # no PEFT layer can exist before peft is imported; keeps the CLI start fast
        return False
    return isinstance(module, peft_tuner_layer_class())


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """`(in_features, out_features)` of a linear layer, also for packed 4-bit weights and `Conv1D`."""
    if isinstance(module, nn.Linear):
        return int(module.in_features), int(module.out_features)
    weight = module.weight  # Conv1D stores (in, out)
    return int(weight.shape[0]), int(module.nf)


def linear_params(module: nn.Module) -> int:
    """Number of parameters of a linear layer as if unquantized (a 4-bit layer stores two weights per byte)."""
    fan_in, fan_out = linear_shape(module)
    bias = getattr(module, "bias", None)
    return fan_in * fan_out + (fan_out if bias is not None else 0)
