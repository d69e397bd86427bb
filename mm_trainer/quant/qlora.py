"""QLoRA on multimodal models: nf4 4-bit language linears, every other tower in full precision.

Two ways to a 4-bit base, giving the same layers:

* **At load** (``model`` given as a path / hub id): a :class:`~transformers.BitsAndBytesConfig` whose
  ``llm_int8_skip_modules`` lists the module paths of the towers in ``quant_skip_towers``. Those paths come from the
  tower map of the model built on the meta device from its config, *before* any weight is read.
* **In place** (an unquantized model instance, and always for LoftQ, which needs the full-precision weights): every
  ``nn.Linear`` outside the skipped towers is replaced by a bitsandbytes ``Linear4bit`` holding the nf4 quantization
  of its weight, with the same block size, double quantization and compute dtype ``from_pretrained`` would use.

Either way the model then looks to transformers, PEFT and TRL exactly like a bitsandbytes 4-bit load
(``is_loaded_in_4bit``, ``hf_quantizer``, ``config.quantization_config``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..towers import TowerMap, is_quantized_linear
from .import_utils import require_bitsandbytes

logger = logging.getLogger(__name__)

NF4_BLOCKSIZE = 64
"""bitsandbytes' block size for 4-bit weights (what ``from_pretrained`` uses; BitsAndBytesConfig has no knob)."""

DEFAULT_SKIP_TOWERS: tuple[str, ...] = ("vision", "audio", "projector", "output")

_DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

_PLAIN_PARAMETERS = ("Parameter", "Tensor", "Params4bit", "DTensor")
_QUANTIZED_DTYPES = (torch.int8, torch.uint8, torch.float8_e4m3fn, torch.float8_e5m2)
_OTHER_QUANTIZED_LAYERS = ("QuantLinear", "WQLinear", "HQQLinear", "QLinear", "FP8Linear", "Int8Linear", "Int4Linear")


def resolve_compute_dtype(setting: str, bf16: bool = False, fp16: bool = False) -> torch.dtype:
    """The compute dtype of the 4-bit layers: ``"auto"`` follows mixed precision (bf16 / fp16), else float32."""
    if setting == "auto":
        return torch.bfloat16 if bf16 else torch.float16 if fp16 else torch.float32
    if setting not in _DTYPES:
        raise ValueError(f"`quant_compute_dtype` must be 'auto' or one of {list(_DTYPES)}, got {setting!r}.")
    return _DTYPES[setting]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class Nf4Spec:
    """How a weight is quantized to 4 bits: the bitsandbytes settings of one ``Linear4bit``.

    Attributes:
        compute_dtype: Dtype the layer computes in (inputs are cast to it, the weight dequantized to it).
        quant_type: ``"nf4"`` (``"fp4"`` only when describing a user's model).
        double_quant: Whether the per-block absmax is quantized again (QLoRA's double quantization).
        blocksize: Elements per quantization block.
    """

    compute_dtype: torch.dtype = torch.float32
    quant_type: str = "nf4"
    double_quant: bool = True
    blocksize: int = NF4_BLOCKSIZE

    def quantize(self, weight: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """``(packed uint8 data, QuantState)`` of ``weight`` (out x in), on ``weight``'s device and in its dtype."""
        import bitsandbytes.functional as bnb_functional

        return bnb_functional.quantize_4bit(
            weight.contiguous(),
            blocksize=self.blocksize,
            compress_statistics=self.double_quant,
            quant_type=self.quant_type,
            quant_storage=torch.uint8,
        )

    @staticmethod
    def dequantize(packed: torch.Tensor, quant_state: Any) -> torch.Tensor:
        """The weight a 4-bit layer computes with."""
        import bitsandbytes.functional as bnb_functional

        return bnb_functional.dequantize_4bit(packed, quant_state)

    def bnb_config(self, skip_modules: list[str]) -> Any:
        """The matching :class:`~transformers.BitsAndBytesConfig` for ``from_pretrained``."""
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.quant_type,
            bnb_4bit_use_double_quant=self.double_quant,
            bnb_4bit_compute_dtype=self.compute_dtype,
            bnb_4bit_quant_storage=torch.uint8,
            llm_int8_skip_modules=list(skip_modules),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "quant_type": self.quant_type,
            "double_quant": self.double_quant,
            "blocksize": self.blocksize,
            "compute_dtype": dtype_name(self.compute_dtype),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Nf4Spec:
        """Inverse of :meth:`to_dict`."""
        return cls(
            compute_dtype=_DTYPES[data["compute_dtype"]],
            quant_type=data["quant_type"],
            double_quant=bool(data["double_quant"]),
            blocksize=int(data["blocksize"]),
        )


# ---------------------------------------------------------------------------------------------------------------------
# Which modules stay in full precision
# ---------------------------------------------------------------------------------------------------------------------
def model_class_for(config: Any) -> Any:
    """The class TRL's ``create_model_from_path`` would instantiate for ``config``."""
    import transformers

    architectures = getattr(config, "architectures", None) or []
    cls = getattr(transformers, architectures[0], None) if architectures else None
    if cls is not None:
        return cls
    auto_map = getattr(config, "auto_map", None) or {}
    for auto in (transformers.AutoModelForImageTextToText, transformers.AutoModelForCausalLM):
        if auto.__name__ in auto_map:
            return auto
    return transformers.AutoModelForCausalLM


def meta_model(model_id: str, revision: str | None = None, trust_remote_code: bool = False) -> nn.Module:
    """The model of ``model_id`` built from its config on the meta device: module structure, no weights read."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_id, revision=revision, trust_remote_code=trust_remote_code)
    cls = model_class_for(config)
    with torch.device("meta"):
        if hasattr(cls, "_from_config"):
            return cls._from_config(config)
        return cls.from_config(config, trust_remote_code=trust_remote_code)


def quantizable_linears(tower_map: TowerMap, modules: dict[str, nn.Module], skip_towers: Iterable[str]) -> list[str]:
    """Paths of the plain ``nn.Linear`` layers outside ``skip_towers``: what a 4-bit load turns into ``Linear4bit``.

    Layers of released towers (no longer in ``modules``) are left out."""
    skip = set(skip_towers)
    return [n for n, info in tower_map.linears.items() if info.tower not in skip and type(modules.get(n)) is nn.Linear]


def skip_modules(tower_map: TowerMap, skip_towers: Iterable[str]) -> list[str]:
    """The fewest module paths whose subtrees hold every linear of ``skip_towers`` and no other linear.

    E.g. ``["model.visual", "lm_head"]`` for Qwen2.5-VL with the default towers, ``["model.visual.merger"]`` when only
    the projector is skipped. Used as ``llm_int8_skip_modules`` (transformers matches them as path prefixes).
    """
    skip = set(skip_towers)
    skipped = [n for n, info in tower_map.linears.items() if info.tower in skip]
    kept = [n for n, info in tower_map.linears.items() if info.tower not in skip]

    def self_and_ancestors(path: str) -> set[str]:
        parts = path.split(".")
        return {".".join(parts[:i]) for i in range(1, len(parts) + 1)}

    mixed = set().union(*(self_and_ancestors(n) for n in kept)) if kept else set()
    candidates = set().union(*(self_and_ancestors(n) for n in skipped)) - mixed if skipped else set()
    roots = [p for p in candidates if p.rpartition(".")[0] not in candidates]
    order = {name: i for i, name in enumerate(tower_map.towers)}
    return sorted(roots, key=lambda p: order.get(p, len(order)))


# ---------------------------------------------------------------------------------------------------------------------
# What a model already is
# ---------------------------------------------------------------------------------------------------------------------
def quantization_method(model: nn.Module) -> str | None:
    """``None`` for a full-precision model, ``"bnb-4bit"``, ``"bnb-8bit"``, or the name of another method.

    Reads ``config.quantization_config`` / ``hf_quantizer`` first, then the layer classes and parameter dtypes (for a
    model quantized by hand).
    """
    qconfig = getattr(getattr(model, "config", None), "quantization_config", None)
    if qconfig is None and getattr(model, "hf_quantizer", None) is not None:
        qconfig = model.hf_quantizer.quantization_config
    if qconfig is not None:
        data = qconfig if isinstance(qconfig, dict) else qconfig.to_dict()
        method = str(getattr(data.get("quant_method"), "value", data.get("quant_method")) or "unknown")
        if method == "bitsandbytes":
            if data.get("load_in_4bit") or data.get("_load_in_4bit"):
                return "bnb-4bit"
            return "bnb-8bit"
        return method
    found: set[str] = set()
    for module in model.modules():
        name = type(module).__name__
        if name == "Linear4bit":
            found.add("bnb-4bit")
        elif name == "Linear8bitLt":
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


def spec_of_model(model: nn.Module) -> Nf4Spec:
    """The :class:`Nf4Spec` of a bitsandbytes 4-bit model (from its first ``Linear4bit``)."""
    for module in model.modules():
        if type(module).__name__ == "Linear4bit":
            weight = module.weight
            state = getattr(weight, "quant_state", None)
            return Nf4Spec(
                compute_dtype=module.compute_dtype or torch.float32,
                quant_type=weight.quant_type,
                double_quant=bool(state.nested) if state is not None else bool(weight.compress_statistics),
                blocksize=int(state.blocksize) if state is not None else int(weight.blocksize),
            )
    raise ValueError("The model holds no bitsandbytes Linear4bit layer.")


# ---------------------------------------------------------------------------------------------------------------------
# In-place quantization
# ---------------------------------------------------------------------------------------------------------------------
def linear4bit_from_quantized(linear: nn.Linear, packed: torch.Tensor, quant_state: Any, spec: Nf4Spec) -> nn.Module:
    """A bitsandbytes ``Linear4bit`` computing with exactly ``(packed, quant_state)`` and ``linear``'s bias."""
    bnb = require_bitsandbytes()
    layer = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=spec.compute_dtype,
        compress_statistics=spec.double_quant,
        quant_type=spec.quant_type,
        quant_storage=torch.uint8,
        device="meta",
    )
    layer.weight = bnb.nn.Params4bit(
        packed,
        requires_grad=False,
        quant_state=quant_state,
        blocksize=spec.blocksize,
        compress_statistics=spec.double_quant,
        quant_type=spec.quant_type,
        quant_storage=torch.uint8,
        module=layer,
        bnb_quantized=True,
    )
    layer.quant_state = quant_state
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().to(packed.device), requires_grad=False)
    layer.source_cls = type(linear)  # as transformers' replace_with_bnb_linear records it
    layer.support_avx512bf16_for_cpu = False  # see keep_4bit_layers_trainable
    layer.train(linear.training)
    return layer


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at path ``name``."""
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, new)


def quantize_linear(linear: nn.Linear, spec: Nf4Spec, device: torch.device | None = None) -> nn.Module:
    """The ``Linear4bit`` replacing ``linear``: plain nf4 of its weight (QLoRA), on ``device`` (default: its own)."""
    weight = linear.weight.detach()
    if weight.device.type == "meta":
        raise ValueError("Cannot quantize a layer whose weight is on the meta device; load the weights first.")
    if device is not None:
        weight = weight.to(device)
    packed, state = spec.quantize(weight)
    return linear4bit_from_quantized(linear, packed, state, spec)


def quantize_in_place(
    model: nn.Module,
    names: Iterable[str],
    spec: Nf4Spec,
    device: torch.device | None = None,
    build: Callable[[str, nn.Linear], nn.Module] | None = None,
) -> list[str]:
    """Replace each ``nn.Linear`` at ``names`` by its 4-bit counterpart; returns the paths replaced.

    Args:
        model: The model, modified in place.
        names: Paths of ``nn.Linear`` layers.
        spec: Quantization settings.
        device: Where the 4-bit layers go (default: where each weight is).
        build: ``(name, linear) -> Linear4bit`` for layers that need more than plain quantization (LoftQ); ``None``
            quantizes plainly.
    """
    replaced = []
    for name in names:
        linear = model.get_submodule(name)
        if type(linear) is not nn.Linear:
            raise TypeError(f"{name} is a {type(linear).__name__}, not an nn.Linear; it cannot be quantized in place.")
        new = build(name, linear) if build is not None else quantize_linear(linear, spec, device)
        replace_module(model, name, new)
        replaced.append(name)
    return replaced


def mark_loaded_in_4bit(model: nn.Module, spec: Nf4Spec, skipped: list[str]) -> None:
    """Give an in-place quantized model the attributes a bitsandbytes 4-bit ``from_pretrained`` sets.

    PEFT only wraps ``Linear4bit`` layers with its 4-bit LoRA layer when ``model.is_loaded_in_4bit``; TRL and the
    Trainer read ``is_loaded_in_4bit`` / ``quantization_method`` / ``hf_quantizer`` (no ``.to()`` of the model,
    training validation).
    """
    from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer
    from transformers.utils.quantization_config import QuantizationMethod

    config = spec.bnb_config(skipped)
    quantizer = Bnb4BitHfQuantizer(config, pre_quantized=False)
    quantizer.modules_to_not_convert = list(skipped)
    model.hf_quantizer = quantizer
    model.is_quantized = True
    model.quantization_method = QuantizationMethod.BITS_AND_BYTES
    model.is_loaded_in_4bit = True
    if getattr(model, "config", None) is not None:
        model.config.quantization_config = config


# ---------------------------------------------------------------------------------------------------------------------
# Training preparation
# ---------------------------------------------------------------------------------------------------------------------
def keep_4bit_layers_trainable(model: nn.Module) -> int:
    """Keep every ``Linear4bit`` on bitsandbytes' training path on CPUs with AVX512-BF16; returns the layer count.

    bitsandbytes 0.50 repacks a ``Linear4bit``'s weight in place for a bf16 CPU inference kernel the first time the
    layer runs in eval mode without gradients (a probe, an evaluation, a ``generate``). From then on it uses that
    kernel also in training mode: outputs in bf16 precision and, with a bias, ``RuntimeError: a view of a leaf
    Variable that requires grad is being used in an in-place operation``. We switch the repacking off (dequantize +
    matmul in the compute dtype, as on GPU) and undo it where it already happened.
    """
    count = 0
    for module in model.modules():
        if type(module).__name__ != "Linear4bit":
            continue
        module.support_avx512bf16_for_cpu = False
        state = getattr(module.weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                module.weight.data, state
            )
            module.quant_state = module.weight.quant_state
        count += 1
    return count


def prepare_for_kbit_training(model: nn.Module, compute_dtype: torch.dtype) -> dict[str, int]:
    """k-bit training preparation, PEFT's ``prepare_model_for_kbit_training`` minus what TRL already does.

    * Freezes every base parameter.
    * Casts full-precision parameters (towers kept out of 4-bit, norms, embeddings, ``lm_head``) to float32 when they
      are float16 (PEFT's reason: fp16 norms and heads are unstable), and bfloat16 ones too when the compute dtype
      is float32 (the model then computes in fp32 throughout, without autocast to reconcile dtypes). bfloat16
      parameters stay bfloat16 under a bfloat16 compute dtype: the vision tower of a 7B VLM would double in memory.
    * Gradient checkpointing and input gradients are left to TRL, which enables both for PEFT models
      (``gradient_checkpointing=True`` is SFTConfig's default).

    Returns:
        ``{"frozen": n, "upcast": m}`` parameter counts.
    """
    frozen = upcast = 0
    for param in model.parameters():
        if param.requires_grad:
            param.requires_grad_(False)
            frozen += 1
        if type(param).__name__ == "Params4bit" or not param.is_floating_point():
            continue
        if param.dtype == torch.float16 or (param.dtype == torch.bfloat16 and compute_dtype == torch.float32):
            param.data = param.data.to(torch.float32)
            upcast += 1
    return {"frozen": frozen, "upcast": upcast}


# ---------------------------------------------------------------------------------------------------------------------
# Accounting
# ---------------------------------------------------------------------------------------------------------------------
def _quant_state_bytes(state: Any) -> int:
    total = 0
    for attr in ("absmax", "code", "offset"):
        value = getattr(state, attr, None)
        if torch.is_tensor(value):
            total += value.numel() * value.element_size()
    nested = getattr(state, "state2", None)
    if nested is not None:
        total += _quant_state_bytes(nested)
    return total


def resident_bytes(module: nn.Module) -> int:
    """Bytes a module holds in memory: parameters, buffers, and the quantization state of its 4-bit weights."""
    total = 0
    for param in module.parameters():
        total += param.numel() * param.element_size()
        state = getattr(param, "quant_state", None)
        if state is not None:
            total += _quant_state_bytes(state)
    for buffer in module.buffers():
        total += buffer.numel() * buffer.element_size()
    return total


def refresh_linears(model: nn.Module, tower_map: TowerMap) -> None:
    """Mark the layers now 4-bit in ``tower_map.linears`` (paths, towers and unpacked counts do not change)."""
    modules = dict(model.named_modules())
    for name, info in list(tower_map.linears.items()):
        module = modules.get(name)
        if module is not None and is_quantized_linear(module) != info.quantized:
            tower_map.linears[name] = dataclasses.replace(info, quantized=is_quantized_linear(module))
