"""nf4 4-bit layers: the quantization settings, bitsandbytes `Linear4bit` layers built from them, in-place
replacement of `nn.Linear` layers, the bitsandbytes CPU behaviour training relies on, and their memory.

In-place quantization (an unquantized model instance, and always for LoftQ, which needs the full-precision weights)
replaces every `nn.Linear` outside the skipped towers by a bitsandbytes `Linear4bit` holding the nf4 quantization
of its weight, with the block size, double quantization and compute dtype a `BitsAndBytesConfig` load uses
(`tests/test_quant.py` checks the packed data against bitsandbytes' own quantization of the same weight).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..model.layers import is_4bit_linear
from ..model.towers import TowerMap
from ..upstream import bnb_keep_training_kernel, bnb_unpack_cpu_weight
from .import_utils import require_bitsandbytes

logger = logging.getLogger(__name__)

NF4_BLOCKSIZE = 64
"""bitsandbytes' block size for 4-bit weights (what `from_pretrained` uses; BitsAndBytesConfig has no knob)."""

DEFAULT_SKIP_TOWERS: tuple[str, ...] = ("vision", "audio", "projector", "output")

_DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_compute_dtype(setting: str, bf16: bool = False, fp16: bool = False) -> torch.dtype:
    """The compute dtype of the 4-bit layers: `"auto"` follows mixed precision (bf16 / fp16), else float32."""
    if setting == "auto":
        return torch.bfloat16 if bf16 else torch.float16 if fp16 else torch.float32
    if setting not in _DTYPES:
        raise ValueError(f"`quant_compute_dtype` must be 'auto' or one of {list(_DTYPES)}, got {setting!r}.")
    return _DTYPES[setting]


def dtype_name(dtype: torch.dtype) -> str:
    """`torch.bfloat16` -> `"bfloat16"`."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class Nf4Spec:
    """How a weight is quantized to 4 bits: the bitsandbytes settings of one `Linear4bit`.

    Attributes:
        compute_dtype: Dtype the layer computes in (inputs are cast to it, the weight dequantized to it).
        quant_type: `"nf4"` (`"fp4"` only when describing a user's model).
        double_quant: Whether the per-block absmax is quantized again (QLoRA's double quantization).
        blocksize: Elements per quantization block.
    """

    compute_dtype: torch.dtype = torch.float32
    quant_type: str = "nf4"
    double_quant: bool = True
    blocksize: int = NF4_BLOCKSIZE

    def quantize(self, weight: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """`(packed uint8 data, QuantState)` of `weight` (out x in), on `weight`'s device and in its dtype."""
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
        """The matching [`~transformers.BitsAndBytesConfig`] for `from_pretrained`."""
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
        """Inverse of [`to_dict`]."""
        return cls(
            compute_dtype=_DTYPES[data["compute_dtype"]],
            quant_type=data["quant_type"],
            double_quant=bool(data["double_quant"]),
            blocksize=int(data["blocksize"]),
        )


# ---------------------------------------------------------------------------------------------------------------------
# Which modules stay in full precision
# ---------------------------------------------------------------------------------------------------------------------
def quantizable_linears(tower_map: TowerMap, modules: dict[str, nn.Module], skip_towers: Iterable[str]) -> list[str]:
    """Paths of the plain `nn.Linear` layers outside `skip_towers`: what a 4-bit load turns into `Linear4bit`.

    Layers of released towers (no longer in `modules`) are left out."""
    skip = set(skip_towers)
    return [n for n, info in tower_map.linears.items() if info.tower not in skip and type(modules.get(n)) is nn.Linear]


def skip_modules(tower_map: TowerMap, skip_towers: Iterable[str]) -> list[str]:
    """The fewest module paths whose subtrees hold every linear of `skip_towers` and no other linear.

    E.g. `["model.visual", "lm_head"]` for Qwen2.5-VL with the default towers, `["model.visual.merger"]` when only
    the projector is skipped. Used as `llm_int8_skip_modules` (transformers matches them as path prefixes).
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


def checkpoint_skip_modules(
    model_id: str, skip_towers: Iterable[str], revision: str | None = None, trust_remote_code: bool = False
) -> list[str]:
    """[`skip_modules`] of a checkpoint, from its config alone (the model built on the meta device)."""
    from transformers import AutoConfig

    from ..model.model_class import meta_model
    from ..model.towers import map_towers

    config = AutoConfig.from_pretrained(model_id, revision=revision, trust_remote_code=trust_remote_code)
    return skip_modules(map_towers(meta_model(config, trust_remote_code)), skip_towers)


def spec_of_model(model: nn.Module) -> Nf4Spec:
    """The [`Nf4Spec`] of a bitsandbytes 4-bit model (from its first `Linear4bit` that still holds its 4-bit
    weight: a released tower's layers hold empty plain tensors)."""
    for module in model.modules():
        if is_4bit_linear(module) and hasattr(module.weight, "quant_type"):
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
    """A bitsandbytes `Linear4bit` computing with exactly `(packed, quant_state)` and `linear`'s bias."""
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
    layer.support_avx512bf16_for_cpu = False  # see keep_4bit_layers_trainable
    layer.train(linear.training)
    return layer


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` at path `name`."""
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, new)


def _weight_to_quantize(linear: nn.Linear, device: torch.device | None) -> torch.Tensor:
    weight = linear.weight.detach()
    if weight.device.type == "meta":
        raise ValueError("Cannot quantize a layer whose weight is on the meta device; load the weights first.")
    return weight if device is None else weight.to(device)


def quantize_linear(linear: nn.Linear, spec: Nf4Spec, device: torch.device | None = None) -> nn.Module:
    """The `Linear4bit` replacing `linear`: plain nf4 of its weight (QLoRA), on `device` (default: its own)."""
    packed, state = spec.quantize(_weight_to_quantize(linear, device))
    return linear4bit_from_quantized(linear, packed, state, spec)


def quantize_in_place(
    model: nn.Module,
    names: Iterable[str],
    spec: Nf4Spec,
    device: torch.device | None = None,
    quantize: Callable[[str, torch.Tensor], tuple[torch.Tensor, Any]] | None = None,
) -> list[str]:
    """Replace each `nn.Linear` at `names` by a `Linear4bit`; returns the paths replaced.

    Args:
        model: The model, modified in place.
        names: Paths of `nn.Linear` layers.
        spec: Quantization settings.
        device: Where the 4-bit layers go (default: where each weight is).
        quantize: `(name, weight) -> (packed, quant_state)` for layers whose 4-bit data is not plain `nf4(W)`
            (LoftQ's `nf4(W - s B A)`); return `None` to quantize a layer plainly. `None`: all plainly.
    """
    replaced = []
    for name in names:
        linear = model.get_submodule(name)
        if type(linear) is not nn.Linear:
            raise TypeError(f"{name} is a {type(linear).__name__}, not an nn.Linear; it cannot be quantized in place.")
        weight = _weight_to_quantize(linear, device)
        quantized = quantize(name, weight) if quantize is not None else None
        packed, state = quantized if quantized is not None else spec.quantize(weight)
        replace_module(model, name, linear4bit_from_quantized(linear, packed, state, spec))
        replaced.append(name)
    return replaced


def mark_loaded_in_4bit(model: nn.Module) -> None:
    """Set `model.is_loaded_in_4bit`: the one attribute a bitsandbytes load sets that in-place quantization needs.

    No quantizer state is made up (`hf_quantizer`, `is_quantized`, `quantization_method`,
    `config.quantization_config` stay unset: transformers did not quantize this model). `is_loaded_in_4bit` is
    read by PEFT, which wraps a `Linear4bit` with its 4-bit LoRA layer (`peft.tuners.lora.bnb.Linear4bit`: merge
    and unmerge through dequantization) only when the model says so, and otherwise with its plain `lora.Linear`,
    whose merge would add the adapter to packed 4-bit data; and by TRL and the Trainer (adapter dtype, no
    `DataParallel`). `tests/test_quant.py::test_in_place_4bit_model_state_is_pinned` pins both.
    """
    model.is_loaded_in_4bit = True


# ---------------------------------------------------------------------------------------------------------------------
# bitsandbytes on CPU, and memory
# ---------------------------------------------------------------------------------------------------------------------
def keep_4bit_layers_trainable(model: nn.Module) -> int:
    """Keep every `Linear4bit` on bitsandbytes' training path on CPUs with AVX512-BF16; returns the layer count.

    bitsandbytes 0.50 repacks a `Linear4bit`'s weight in place for a bf16 CPU inference kernel the first time the
    layer runs in eval mode without gradients (a probe, an evaluation, a `generate`). From then on it uses that
    kernel also in training mode: outputs in bf16 precision and, with a bias, `RuntimeError: a view of a leaf
    Variable that requires grad is being used in an in-place operation`. We switch the repacking off (dequantize +
    matmul in the compute dtype, as on GPU) and undo it where it already happened. The undo (bitsandbytes' inverse)
    restores the nf4 codes exactly but the block scales through bfloat16: under double quantization the weight moves
    by at most bf16's rounding, 2**-8 relative (`tests/test_quant.py` pins it).
    """
    count = 0
    for module in model.modules():
        if not is_4bit_linear(module):
            continue
        bnb_keep_training_kernel(module)
        state = getattr(module.weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            module.weight.data, module.weight.quant_state = bnb_unpack_cpu_weight(module.weight.data, state)
            module.quant_state = module.weight.quant_state
        count += 1
    return count


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
