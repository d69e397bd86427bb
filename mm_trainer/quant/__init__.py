"""4-bit training of multimodal models: QLoRA with full-precision towers, LoftQ on the targeted modules, EVA.

Modules: [`.checks`] (before and right after loading), [`.layers`] (nf4 layers, in-place quantization),
[`.preparation`] (the run's 4-bit base), [`.report`] (start-up report, audit section), [`.persistence`]
(`quantization.json`, [`load_quantized_base`]), [`.loftq`], [`.eva`].

`MMSFTConfig(quantization="qlora" | "loftq")` switches it on; [`load_quantized_base`] rebuilds the base a saved
adapter was trained on.
"""

from __future__ import annotations

from .checks import check_loaded_model, check_peft_config, quantization_method
from .eva import EvaReport, eva_requested, initialize_eva, towers_in_every_batch
from .import_utils import (
    BITSANDBYTES_MIN_VERSION,
    BitsAndBytesUnavailableError,
    bitsandbytes_available,
    require_bitsandbytes,
)
from .layers import Nf4Spec, keep_4bit_layers_trainable, resident_bytes, resolve_compute_dtype, skip_modules
from .loftq import LoftQResult, loftq_decompose, lora_scaling
from .persistence import LOFTQ_OFFSETS_FILE, QUANT_FILE, load_quantized_base
from .preparation import QuantizedBase, prepare_for_kbit_training, quantized_load_kwargs

__all__ = [
    "BITSANDBYTES_MIN_VERSION",
    "LOFTQ_OFFSETS_FILE",
    "QUANT_FILE",
    "BitsAndBytesUnavailableError",
    "EvaReport",
    "LoftQResult",
    "Nf4Spec",
    "QuantizedBase",
    "bitsandbytes_available",
    "check_loaded_model",
    "check_peft_config",
    "eva_requested",
    "initialize_eva",
    "keep_4bit_layers_trainable",
    "load_quantized_base",
    "loftq_decompose",
    "lora_scaling",
    "prepare_for_kbit_training",
    "quantization_method",
    "quantized_load_kwargs",
    "require_bitsandbytes",
    "resident_bytes",
    "resolve_compute_dtype",
    "skip_modules",
    "towers_in_every_batch",
]
