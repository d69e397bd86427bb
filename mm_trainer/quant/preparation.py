"""The 4-bit base of an `MMSFTTrainer` run: build it and hand it to PEFT.

The trainer calls, in this order:

1. [`~mm_trainer.quant.checks.check_peft_config`] (before anything is loaded): combinations that cannot work
   fail with the fix.
2. [`quantized_load_kwargs`] when `model` is a path / id: QLoRA through transformers' public
   `BitsAndBytesConfig` (`llm_int8_skip_modules` from the tower map of the meta model), or nothing for LoftQ, which
   needs the full-precision weights and quantizes after target resolution.
3. [`~mm_trainer.quant.checks.check_loaded_model`] on the loaded or passed model: refuses models quantized
   another way, and keeps bitsandbytes' 4-bit layers on their training path on CPU.
4. [`QuantizedBase.prepare`] after the targets are resolved: in-place quantization of a full-precision instance
   (with LoftQ on the kept targets), k-bit training preparation, the start-up report ([`.report`]).
5. [`QuantizedBase.install_adapters`] after PEFT wrapped the model: adapter dtype, LoftQ's initial factors.
6. [`QuantizedBase.save`] at every save ([`.persistence`]): `quantization.json` (+ LoftQ offsets), read
   back by [`~mm_trainer.quant.persistence.load_quantized_base`].
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..model.layers import is_4bit_linear, is_4bit_weight, is_quantized_linear
from ..model.peft_names import peft_path
from ..model.towers import TowerMap
from ..upstream import peft_pattern_key
from . import persistence, report
from .checks import init_name, quantization_method
from .import_utils import require_bitsandbytes
from .layers import (
    Nf4Spec,
    checkpoint_skip_modules,
    dtype_name,
    mark_loaded_in_4bit,
    quantizable_linears,
    quantize_in_place,
    resident_bytes,
    resolve_compute_dtype,
    skip_modules,
    spec_of_model,
)
from .loftq import LoftQResult, loftq_decompose, lora_scaling

logger = logging.getLogger(__name__)

_INITS_REWRITING_BASE = ("pissa", "olora", "corda")


def quantized_load_kwargs(model_id: str, kwargs: dict[str, Any], args: Any) -> dict[str, Any]:
    """`from_pretrained` kwargs for loading `model_id` under `args.quantization`.

    QLoRA: adds an nf4 `BitsAndBytesConfig` whose `llm_int8_skip_modules` are the module paths of
    `args.quant_skip_towers`, found on the model built on the meta device from its config. LoftQ: unchanged (full
    precision; quantized after target resolution).

    Raises:
        ValueError: The user also gave a `quantization_config` (trainer argument or `model_init_kwargs`).
        BitsAndBytesUnavailableError: bitsandbytes cannot quantize on the training device.
    """
    if kwargs.get("quantization_config") is not None:
        raise ValueError(
            f"`MMSFTConfig(quantization={args.quantization!r})` builds the 4-bit config itself (nf4, full-precision "
            f"{', '.join(args.quant_skip_towers)}), but a `quantization_config` was also passed (trainer argument or "
            "`model_init_kwargs`). Use one: drop `quantization_config`, or unset `quantization` to load with yours."
        )
    require_bitsandbytes(args.device)
    if args.quantization == "loftq":
        return kwargs
    skipped = checkpoint_skip_modules(
        model_id, args.quant_skip_towers, kwargs.get("revision"), bool(kwargs.get("trust_remote_code"))
    )
    spec = Nf4Spec(compute_dtype=resolve_compute_dtype(args.quant_compute_dtype, args.bf16, args.fp16))
    return {**kwargs, "quantization_config": spec.bnb_config(skipped)}


def _training_device(model: nn.Module, device: torch.device) -> torch.device | None:
    """Where in-place 4-bit layers go: `device` when the whole model sits on the CPU and training does not (the
    Trainer never moves a bitsandbytes model itself), else each weight's own device (`device_map` loads)."""
    devices = {p.device.type for p in model.parameters()}
    if devices == {"cpu"} and device.type != "cpu":
        return device
    return None


def _rank_and_scaling(peft_config: Any, name: str) -> tuple[int, float]:
    """The rank and scaling PEFT will give the adapter on `name` (rank / alpha patterns, rsLoRA)."""
    rank = peft_config.rank_pattern.get(peft_pattern_key(peft_config.rank_pattern.keys(), name), peft_config.r)
    alpha = peft_config.alpha_pattern.get(
        peft_pattern_key(peft_config.alpha_pattern.keys(), name), peft_config.lora_alpha
    )
    return int(rank), lora_scaling(alpha, int(rank), bool(peft_config.use_rslora))


def _adapter_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    """float32 adapters under a float32 compute dtype, else bfloat16 (TRL casts 4-bit runs' adapters to bf16)."""
    return torch.float32 if compute_dtype == torch.float32 else torch.bfloat16


def prepare_for_kbit_training(model: nn.Module, compute_dtype: torch.dtype) -> dict[str, int]:
    """k-bit training preparation, PEFT's `prepare_model_for_kbit_training` minus what TRL already does.

    * Freezes every base parameter.
    * Casts full-precision parameters (towers kept out of 4-bit, norms, embeddings, `lm_head`) to float32 when they
      are float16 (PEFT's reason: fp16 norms and heads are unstable), and bfloat16 ones too when the compute dtype
      is float32 (the model then computes in fp32 throughout, without autocast to reconcile dtypes). bfloat16
      parameters stay bfloat16 under a bfloat16 compute dtype: the vision tower of a 7B VLM would double in memory.
    * Gradient checkpointing and input gradients are left to TRL, which enables both for PEFT models
      (`gradient_checkpointing=True` is SFTConfig's default).

    Returns:
        `{"frozen": n, "upcast": m}` parameter counts.
    """
    frozen = upcast = 0
    for param in model.parameters():
        if param.requires_grad:
            param.requires_grad_(False)
            frozen += 1
        if is_4bit_weight(param) or not param.is_floating_point():
            continue
        if param.dtype == torch.float16 or (param.dtype == torch.bfloat16 and compute_dtype == torch.float32):
            param.data = param.data.to(torch.float32)
            upcast += 1
    return {"frozen": frozen, "upcast": upcast}


def refresh_linears(model: nn.Module, tower_map: TowerMap) -> None:
    """Mark the layers now 4-bit in `tower_map.linears` (paths, towers and unpacked counts do not change)."""
    modules = dict(model.named_modules())
    for name, info in list(tower_map.linears.items()):
        module = modules.get(name)
        if module is not None and is_quantized_linear(module) != info.quantized:
            tower_map.linears[name] = dataclasses.replace(info, quantized=is_quantized_linear(module))


@dataclass
class QuantizedBase:
    """How the base model of a run is quantized, and what LoftQ solved.

    Attributes:
        mode: `"qlora"`, `"loftq"`, or `None` for a bitsandbytes 4-bit model passed with `quantization`
            unset (reported, otherwise trained exactly as `SFTTrainer` would).
        method: `"from_pretrained"` (bitsandbytes quantized at load: by path, or the user's own load) or
            `"in_place"` (mm-trainer replaced the full-precision linears).
        spec: The 4-bit settings.
        skip_towers: Towers kept in full precision (as asked).
        skip_modules: Their module paths (`llm_int8_skip_modules`).
        quantized: Paths of the 4-bit layers.
        adapter_dtype: Dtype the adapters train in.
        init: The adapters' initialisation (`"loftq"`, `"default"`, `"olora"`, ...).
        loftq_iter: LoftQ's alternating steps (0 without LoftQ).
        loftq: LoftQ's solution per module.
        load_dtype: Dtype the full-precision weights were quantized from.
        base_model: `config.name_or_path` of the base.
        tower_rows: Per tower: linear layers, 4-bit layers, parameters, 4-bit parameters.
        linear_bytes: Resident bytes of the 4-bit layers, and what they would hold in bf16.
        kbit_preparation: Parameter counts frozen / upcast by [`prepare_for_kbit_training`].
    """

    mode: str | None
    method: str
    spec: Nf4Spec
    skip_towers: list[str]
    skip_modules: list[str]
    quantized: list[str]
    adapter_dtype: torch.dtype
    init: str = "default"
    loftq_iter: int = 0
    loftq: dict[str, LoftQResult] = field(default_factory=dict)
    load_dtype: str | None = None
    base_model: str | None = None
    tower_rows: list[dict[str, Any]] = field(default_factory=list)
    linear_bytes: dict[str, int] = field(default_factory=dict)
    kbit_preparation: dict[str, int] = field(default_factory=dict)

    # -----------------------------------------------------------------------------------------------------------------
    @classmethod
    def prepare(cls, model: nn.Module, args: Any, plan: Any, tower_map: TowerMap) -> QuantizedBase | None:
        """Make `model` the 4-bit base the run trains on; `None` when the run is not quantized.

        A full-precision model is quantized in place: every `nn.Linear` outside `args.quant_skip_towers`
        becomes an nf4 `Linear4bit`; with `quantization="loftq"` the kept targets of `plan` get LoftQ's `Q`
        and their initial factors are held for [`install_adapters`]. A bitsandbytes 4-bit model is taken as it is.
        Then k-bit training preparation, the tower map's 4-bit flags, and the start-up report.
        """
        method_now = quantization_method(model)
        if args.quantization is None and method_now != "bnb-4bit":
            return None
        peft_config = plan.peft_config if plan is not None else None
        init = init_name(peft_config) if peft_config is not None else "default"
        modules = dict(model.named_modules())
        if method_now == "bnb-4bit":
            spec = spec_of_model(model)
            qconfig = getattr(model.config, "quantization_config", None)
            skipped = list(getattr(qconfig, "llm_int8_skip_modules", None) or [])
            # Layers still holding their 4-bit weight (a released tower's layers hold empty plain tensors).
            quantized = [n for n, m in modules.items() if is_4bit_linear(m) and hasattr(m.weight, "quant_type")]
            base = cls(
                mode=args.quantization,
                method="from_pretrained",
                spec=spec,
                skip_towers=list(args.quant_skip_towers or []),
                skip_modules=skipped,
                quantized=quantized,
                adapter_dtype=_adapter_dtype(spec.compute_dtype) if args.quantization else torch.bfloat16,
                init=init,
            )
            wrong = sorted({tower_map.tower_of(n) for n in quantized} & set(base.skip_towers))
            if wrong and args.quantization is not None:
                logger.warning(
                    "The 4-bit model passed holds 4-bit layers in tower(s) %s, which `quant_skip_towers` keeps in full "
                    "precision. Load it with `BitsAndBytesConfig(llm_int8_skip_modules=%s)` or pass its path.",
                    wrong,
                    skip_modules(tower_map, base.skip_towers),
                )
        else:
            require_bitsandbytes(args.device)
            spec = Nf4Spec(compute_dtype=resolve_compute_dtype(args.quant_compute_dtype, args.bf16, args.fp16))
            base = cls(
                mode=args.quantization,
                method="in_place",
                spec=spec,
                skip_towers=list(args.quant_skip_towers or []),
                skip_modules=skip_modules(tower_map, args.quant_skip_towers or []),
                quantized=[],
                adapter_dtype=_adapter_dtype(spec.compute_dtype),
                init="loftq" if args.quantization == "loftq" else init,
                loftq_iter=args.loftq_iter if args.quantization == "loftq" else 0,
            )
            base._quantize(model, modules, tower_map, plan, args)
        base.load_dtype = base._quantized_dtype(model)
        base.base_model = getattr(getattr(model, "config", None), "name_or_path", None) or None
        if args.quantization is not None:
            base.kbit_preparation = prepare_for_kbit_training(model, spec.compute_dtype)
        refresh_linears(model, tower_map)
        base._account(model, tower_map)
        if init in _INITS_REWRITING_BASE:
            logger.warning(
                "init_lora_weights=%r rewrites the 4-bit base weights of the adapted layers (PEFT dequantizes, "
                "subtracts the initial adapter and quantizes again): the saved adapter matches that rewritten base, not "
                "a fresh 4-bit load of the checkpoint.",
                peft_config.init_lora_weights,
            )
        if args.process_index == 0:
            base.print_report()
        return base

    def _quantize(self, model: nn.Module, modules: dict[str, nn.Module], tower_map: TowerMap, plan: Any, args: Any):
        """Replace the language linears by 4-bit layers; LoftQ for the kept targets under `quantization="loftq"`."""
        from tqdm.auto import tqdm

        names = quantizable_linears(tower_map, modules, self.skip_towers)
        device = _training_device(model, args.device)
        loftq_targets: dict[str, tuple[int, float]] = {}
        if self.mode == "loftq":
            kept = set(plan.kept())
            loftq_targets = {n: _rank_and_scaling(plan.peft_config, n) for n in names if n in kept}
            if not loftq_targets:
                logger.warning(
                    "quantization='loftq' but no kept target module is a quantized language linear; the adapters "
                    "start as in QLoRA."
                )

        def loftq(name: str, weight: torch.Tensor) -> tuple[torch.Tensor, Any] | None:
            if name not in loftq_targets:
                return None
            rank, scaling = loftq_targets[name]
            result = loftq_decompose(
                weight, rank, scaling, self.spec, self.loftq_iter, adapter_dtype=self.adapter_dtype, name=name
            )
            self.loftq[name] = result
            return result.packed, result.quant_state

        disable = args.process_index != 0 or bool(getattr(args, "disable_tqdm", False))
        ordered = [n for n in names if n in loftq_targets]
        for name in tqdm(ordered, desc=f"LoftQ (iter={self.loftq_iter})", unit="module", disable=disable):
            quantize_in_place(model, [name], self.spec, device, quantize=loftq)
        quantize_in_place(model, [n for n in names if n not in loftq_targets], self.spec, device)
        self.quantized = list(names)
        mark_loaded_in_4bit(model)
        if device is not None:
            model.to(device)

    @staticmethod
    def _quantized_dtype(model: nn.Module) -> str | None:
        for module in model.modules():
            state = getattr(getattr(module, "weight", None), "quant_state", None)
            if state is not None and is_4bit_linear(module):
                return dtype_name(state.dtype)
        return None

    def _account(self, model: nn.Module, tower_map: TowerMap) -> None:
        rows: dict[str, dict[str, int]] = defaultdict(
            lambda: dict.fromkeys(("linears", "quantized", "params", "quantized_params"), 0)
        )
        for info in tower_map.linears.values():
            row = rows[info.tower]
            row["linears"] += 1
            row["params"] += info.params
            if info.quantized:
                row["quantized"] += 1
                row["quantized_params"] += info.params
        self.tower_rows = [{"tower": t, **r} for t, r in rows.items()]
        modules = dict(model.named_modules())
        four_bit = sum(resident_bytes(modules[n]) for n in self.quantized if n in modules)
        bf16 = sum(tower_map.linears[n].params * 2 for n in self.quantized if n in tower_map.linears)
        self.linear_bytes = {"resident_4bit": four_bit, "bf16_equivalent": bf16}

    # -----------------------------------------------------------------------------------------------------------------
    def install_adapters(self, peft_model: nn.Module, adapter_name: str = "default") -> None:
        """After PEFT wrapped the model: adapters in [`adapter_dtype`], LoftQ's factors in place.

        TRL casts a 4-bit run's trainable parameters to bf16; with a float32 compute dtype they go back to float32
        (bf16 adapters would only lose the precision the compute dtype keeps, and round LoftQ's factors).
        """
        if self.mode is None:
            return
        if self.adapter_dtype == torch.float32:
            for param in peft_model.parameters():
                if param.requires_grad and param.dtype != torch.float32 and param.is_floating_point():
                    param.data = param.data.to(torch.float32)
        if not self.loftq:
            return
        modules = dict(peft_model.named_modules())
        with torch.no_grad():
            for name, result in self.loftq.items():
                layer = modules.get(peft_path(name))
                if layer is None or not hasattr(layer, "lora_A") or adapter_name not in layer.lora_A:
                    raise RuntimeError(f"LoftQ solved {name} but PEFT put no LoRA adapter on it.")
                if (
                    not is_4bit_linear(layer)
                    or layer.get_base_layer().weight.data.data_ptr() != result.packed.data_ptr()
                ):
                    raise RuntimeError(f"The base layer of {name} is not the 4-bit layer LoftQ solved for.")
                if layer.r[adapter_name] != result.rank or abs(layer.scaling[adapter_name] - result.scaling) > 1e-9:
                    raise RuntimeError(
                        f"PEFT gave {name} rank {layer.r[adapter_name]} / scaling {layer.scaling[adapter_name]}, LoftQ "
                        f"solved for rank {result.rank} / scaling {result.scaling}."
                    )
                lora_A, lora_B = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
                lora_A.copy_(result.lora_A.to(device=lora_A.device, dtype=lora_A.dtype))
                lora_B.copy_(result.lora_B.to(device=lora_B.device, dtype=lora_B.dtype))

    # -----------------------------------------------------------------------------------------------------------------
    def audit_section(self) -> dict[str, Any]:
        """The audit's `quantization` section (JSON-ready); see [`.report.audit_section`]."""
        return report.audit_section(self)

    def print_report(self) -> None:
        """The start-up report; see [`.report.print_report`]."""
        report.print_report(self)

    def save(self, output_dir: str | os.PathLike[str]) -> None:
        """Write `quantization.json` (and LoftQ's offsets); see [`.persistence.save_base`]."""
        persistence.save_base(self, output_dir)
