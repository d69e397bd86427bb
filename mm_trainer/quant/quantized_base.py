"""The 4-bit base of an ``MMSFTTrainer`` run: build it, hand it to PEFT, report it, save how to rebuild it.

The trainer calls, in this order:

1. :func:`check_peft_config` (before anything is loaded): combinations that cannot work fail with the fix.
2. :func:`quantized_load_kwargs` when ``model`` is a path / id: the ``BitsAndBytesConfig`` for ``from_pretrained``
   (QLoRA), or nothing for LoftQ, which needs the full-precision weights and quantizes after target resolution.
3. :func:`check_loaded_model` on the loaded or passed model: refuses models quantized another way, and keeps
   bitsandbytes' 4-bit layers on their training path on CPU.
4. :meth:`QuantizedBase.prepare` after the targets are resolved: in-place quantization (with LoftQ on the kept
   targets), k-bit training preparation, the start-up report.
5. :meth:`QuantizedBase.install_adapters` after PEFT wrapped the model: adapter dtype, LoftQ's initial factors.
6. :meth:`QuantizedBase.save` at every save: ``quantization.json`` (+ LoftQ offsets), read back by
   :func:`load_quantized_base`.
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..atomic import atomic_write_bytes, atomic_write_json
from ..towers import TowerMap, map_towers
from .import_utils import require_bitsandbytes
from .loftq import LoftQResult, loftq_decompose, lora_scaling, rebuild_quantized
from .qlora import (
    DEFAULT_SKIP_TOWERS,
    Nf4Spec,
    dtype_name,
    keep_4bit_layers_trainable,
    linear4bit_from_quantized,
    mark_loaded_in_4bit,
    meta_model,
    prepare_for_kbit_training,
    quantizable_linears,
    quantization_method,
    quantize_in_place,
    quantize_linear,
    refresh_linears,
    resident_bytes,
    resolve_compute_dtype,
    skip_modules,
    spec_of_model,
)

logger = logging.getLogger(__name__)

QUANT_FILE = "quantization.json"
"""Written next to the adapter: how the 4-bit base was built (read by :func:`load_quantized_base`)."""

LOFTQ_OFFSETS_FILE = "loftq_offsets.safetensors"
"""LoftQ's offset factors ``(A_{T-1}, B_{T-1})`` per module, when ``loftq_iter > 1`` (after one iteration ``Q`` is
plain ``nf4(W)`` and nothing needs saving)."""

_INITS_REWRITING_BASE = ("pissa", "olora", "corda")


# ---------------------------------------------------------------------------------------------------------------------
# Checks before and right after loading
# ---------------------------------------------------------------------------------------------------------------------
def _init_name(peft_config: Any) -> str:
    init = getattr(peft_config, "init_lora_weights", True)
    if init is True:
        return "default"
    if init is False:
        return "identity-breaking (init_lora_weights=False)"
    return str(init).lower()


def check_peft_config(quantization: str | None, peft_config: Any, model: Any) -> None:
    """Refuse quantization / initialisation combinations that cannot work, before any weight is loaded.

    Raises:
        ValueError: With the fix, for: 4-bit without a ``peft_config``; an already wrapped ``PeftModel``; PiSSA on a
            4-bit base (PEFT initialises PiSSA from full-precision weights only); LoftQ with another initialisation
            or DoRA; PEFT's own LoftQ (``init_lora_weights="loftq"``) without ``quantization="loftq"``.
    """
    init = _init_name(peft_config) if peft_config is not None else "default"
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
        if init not in ("default", "gaussian", "loftq"):
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


def quantized_load_kwargs(model_id: str, kwargs: dict[str, Any], args: Any) -> dict[str, Any]:
    """``from_pretrained`` kwargs for loading ``model_id`` under ``args.quantization``.

    QLoRA: adds an nf4 ``BitsAndBytesConfig`` whose ``llm_int8_skip_modules`` are the module paths of
    ``args.quant_skip_towers``, found on the model built on the meta device from its config. LoftQ: unchanged (full
    precision; quantized after target resolution).

    Raises:
        ValueError: The user also gave a ``quantization_config`` (trainer argument or ``model_init_kwargs``).
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
    meta = meta_model(
        model_id, revision=kwargs.get("revision"), trust_remote_code=bool(kwargs.get("trust_remote_code"))
    )
    skipped = skip_modules(map_towers(meta), args.quant_skip_towers)
    spec = Nf4Spec(compute_dtype=resolve_compute_dtype(args.quant_compute_dtype, args.bf16, args.fp16))
    return {**kwargs, "quantization_config": spec.bnb_config(skipped)}


def check_loaded_model(model: nn.Module, quantization: str | None) -> str | None:
    """Check a loaded (or passed) model against ``quantization``; returns its :func:`quantization_method`.

    Any bitsandbytes 4-bit layers are kept on their training path on CPU (:func:`keep_4bit_layers_trainable`), also
    when ``quantization`` is unset.

    Raises:
        ValueError: ``quantization`` is set and the model is quantized another way (8-bit, GPTQ, AWQ, torchao, ...),
            or ``quantization="loftq"`` and the model is already 4-bit (LoftQ needs the full-precision weights).
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


# ---------------------------------------------------------------------------------------------------------------------
# The 4-bit base of one run
# ---------------------------------------------------------------------------------------------------------------------
def _training_device(model: nn.Module, device: torch.device) -> torch.device | None:
    """Where in-place 4-bit layers go: ``device`` when the whole model sits on the CPU and training does not (the
    Trainer never moves a bitsandbytes model itself), else each weight's own device (``device_map`` loads)."""
    devices = {p.device.type for p in model.parameters()}
    if devices == {"cpu"} and device.type != "cpu":
        return device
    return None


def _rank_and_scaling(peft_config: Any, name: str) -> tuple[int, float]:
    """The rank and scaling PEFT will give the adapter on ``name`` (rank / alpha patterns, rsLoRA)."""
    from peft.utils.other import get_pattern_key

    rank = peft_config.rank_pattern.get(get_pattern_key(peft_config.rank_pattern.keys(), name), peft_config.r)
    alpha = peft_config.alpha_pattern.get(
        get_pattern_key(peft_config.alpha_pattern.keys(), name), peft_config.lora_alpha
    )
    return int(rank), lora_scaling(alpha, int(rank), bool(peft_config.use_rslora))


def _adapter_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    """float32 adapters under a float32 compute dtype, else bfloat16 (TRL casts 4-bit runs' adapters to bf16)."""
    return torch.float32 if compute_dtype == torch.float32 else torch.bfloat16


@dataclass
class QuantizedBase:
    """How the base model of a run is quantized, and what LoftQ solved.

    Attributes:
        mode: ``"qlora"``, ``"loftq"``, or ``None`` for a bitsandbytes 4-bit model passed with ``quantization``
            unset (reported, otherwise trained exactly as ``SFTTrainer`` would).
        method: ``"from_pretrained"`` (bitsandbytes quantized at load: by path, or the user's own load) or
            ``"in_place"`` (mm-trainer replaced the full-precision linears).
        spec: The 4-bit settings.
        skip_towers: Towers kept in full precision (as asked).
        skip_modules: Their module paths (``llm_int8_skip_modules``).
        quantized: Paths of the 4-bit layers.
        adapter_dtype: Dtype the adapters train in.
        init: The adapters' initialisation (``"loftq"``, ``"default"``, ``"olora"``, ...).
        loftq_iter: LoftQ's alternating steps (0 without LoftQ).
        loftq: LoftQ's solution per module.
        load_dtype: Dtype the full-precision weights were quantized from.
        base_model: ``config._name_or_path`` of the base.
        tower_rows: Per tower: linear layers, 4-bit layers, parameters, 4-bit parameters.
        linear_bytes: Resident bytes of the 4-bit layers, and what they would hold in bf16.
        kbit_preparation: Parameter counts frozen / upcast by :func:`prepare_for_kbit_training`.
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
        """Make ``model`` the 4-bit base the run trains on; ``None`` when the run is not quantized.

        A full-precision model is quantized in place: every ``nn.Linear`` outside ``args.quant_skip_towers``
        becomes an nf4 ``Linear4bit``; with ``quantization="loftq"`` the kept targets of ``plan`` get LoftQ's ``Q``
        and their initial factors are held for :meth:`install_adapters`. A bitsandbytes 4-bit model is taken as it is.
        Then k-bit training preparation, the tower map's 4-bit flags, and the start-up report.
        """
        method_now = quantization_method(model)
        if args.quantization is None and method_now != "bnb-4bit":
            return None
        peft_config = plan.peft_config if plan is not None else None
        init = _init_name(peft_config) if peft_config is not None else "default"
        modules = dict(model.named_modules())
        if method_now == "bnb-4bit":
            spec = spec_of_model(model)
            qconfig = getattr(model.config, "quantization_config", None)
            skipped = list(getattr(qconfig, "llm_int8_skip_modules", None) or [])
            quantized = [n for n, m in modules.items() if type(m).__name__ == "Linear4bit"]
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
        base.base_model = getattr(getattr(model, "config", None), "_name_or_path", None) or None
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
        """Replace the language linears by 4-bit layers; LoftQ for the kept targets under ``quantization="loftq"``."""
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
            if plan.peft_config.init_lora_weights == "loftq":
                plan.peft_config.init_lora_weights = True  # ours replaces PEFT's; PEFT initialises, we overwrite

        def build(name: str, linear: nn.Linear) -> nn.Module:
            if name not in loftq_targets:
                return quantize_linear(linear, self.spec, device)
            rank, scaling = loftq_targets[name]
            weight = linear.weight.detach() if device is None else linear.weight.detach().to(device)
            result = loftq_decompose(
                weight, rank, scaling, self.spec, self.loftq_iter, adapter_dtype=self.adapter_dtype, name=name
            )
            layer = linear4bit_from_quantized(linear, result.packed, result.quant_state, self.spec)
            self.loftq[name] = result
            return layer

        disable = args.process_index != 0 or bool(getattr(args, "disable_tqdm", False))
        ordered = [n for n in names if n in loftq_targets]
        for name in tqdm(ordered, desc=f"LoftQ (iter={self.loftq_iter})", unit="module", disable=disable):
            quantize_in_place(model, [name], self.spec, device, build=build)
        rest = [n for n in names if n not in loftq_targets]
        quantize_in_place(model, rest, self.spec, device)
        self.quantized = list(names)
        mark_loaded_in_4bit(model, self.spec, self.skip_modules)
        if device is not None:
            model.to(device)

    @staticmethod
    def _quantized_dtype(model: nn.Module) -> str | None:
        for module in model.modules():
            state = getattr(getattr(module, "weight", None), "quant_state", None)
            if state is not None and type(module).__name__ == "Linear4bit":
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
        """After PEFT wrapped the model: adapters in :attr:`adapter_dtype`, LoftQ's factors in place.

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
                layer = modules.get(f"base_model.model.{name}")
                if layer is None or not hasattr(layer, "lora_A") or adapter_name not in layer.lora_A:
                    raise RuntimeError(f"LoftQ solved {name} but PEFT put no LoRA adapter on it.")
                if (
                    type(layer).__name__ != "Linear4bit"
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
    def loftq_totals(self) -> dict[str, float]:
        """Summed errors over the LoftQ modules."""
        qlora = sum(r.qlora_error for r in self.loftq.values())
        loftq = sum(r.loftq_error for r in self.loftq.values())
        return {"qlora_error": qlora, "loftq_error": loftq, "ratio": loftq / qlora if qlora > 0 else 0.0}

    def audit_section(self) -> dict[str, Any]:
        """The audit's ``quantization`` section (JSON-ready)."""
        section: dict[str, Any] = {
            "mode": self.mode,
            "method": self.method,
            **self.spec.to_dict(),
            "adapter_dtype": dtype_name(self.adapter_dtype),
            "init": self.init,
            "skip_towers": self.skip_towers,
            "skip_modules": self.skip_modules,
            "quantized_modules": len(self.quantized),
            "towers": self.tower_rows,
            "bytes": {
                **self.linear_bytes,
                "ratio": self.linear_bytes["resident_4bit"] / self.linear_bytes["bf16_equivalent"]
                if self.linear_bytes.get("bf16_equivalent")
                else None,
            },
            "kbit_preparation": self.kbit_preparation,
        }
        if self.loftq_iter:
            section["loftq"] = {
                "iter": self.loftq_iter,
                "modules": [r.to_dict() for r in self.loftq.values()],
                "total": self.loftq_totals(),
            }
        return section

    def print_report(self) -> None:
        """The start-up report: what went 4-bit, memory, and LoftQ's errors (per module in the log)."""
        from rich.table import Table

        from ..plan_report import console, human

        out = console()
        b = self.linear_bytes
        ratio = b["resident_4bit"] / b["bf16_equivalent"] if b.get("bf16_equivalent") else float("nan")
        q_params = sum(r["quantized_params"] for r in self.tower_rows)
        out.print(
            f"4-bit base ({self.spec.quant_type}, double quant={self.spec.double_quant}, compute "
            f"{dtype_name(self.spec.compute_dtype)}): {len(self.quantized)} linear layers, {human(q_params)} params, "
            f"{b['resident_4bit'] / 2**20:.1f} MiB ({ratio:.2f}x of bf16); full precision: "
            f"{', '.join(self.skip_modules) or 'nothing'}"
        )
        if not self.loftq:
            return
        for result in self.loftq.values():
            logger.info(
                "LoftQ %s: ||W-Q||_F=%.6g (QLoRA)  ||W-Q-sBA||_F=%.6g (LoftQ)  ratio=%.4f",
                result.name,
                result.qlora_error,
                result.loftq_error,
                result.ratio,
            )
        table = Table(
            title=f"LoftQ (iter={self.loftq_iter}): Frobenius error of the 4-bit base + initial adapter",
            title_justify="left",
        )
        for column in ("module", "r", "||W-Q|| (QLoRA)", "||W-Q-sBA|| (LoftQ)", "ratio"):
            table.add_column(column, justify="left" if column == "module" else "right")
        rows = list(self.loftq.values())
        if len(rows) > 48:  # group by layer kind (q_proj, ...) to keep the console readable; the audit has all
            grouped: dict[str, list[LoftQResult]] = defaultdict(list)
            for r in rows:
                grouped["*." + r.name.rsplit(".", 1)[-1]].append(r)
            for kind, group in grouped.items():
                q, lq = sum(r.qlora_error for r in group), sum(r.loftq_error for r in group)
                table.add_row(f"{kind} ({len(group)})", str(group[0].rank), f"{q:.4g}", f"{lq:.4g}", f"{lq / q:.4f}")
        else:
            for r in rows:
                table.add_row(r.name, str(r.rank), f"{r.qlora_error:.4g}", f"{r.loftq_error:.4g}", f"{r.ratio:.4f}")
        totals = self.loftq_totals()
        table.add_row(
            f"sum ({len(rows)} modules)",
            "",
            f"{totals['qlora_error']:.4g}",
            f"{totals['loftq_error']:.4g}",
            f"{totals['ratio']:.4f}",
        )
        out.print(table)

    # -----------------------------------------------------------------------------------------------------------------
    def to_record(self) -> dict[str, Any]:
        """What :func:`load_quantized_base` needs to rebuild this base."""
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
                "offsets_file": LOFTQ_OFFSETS_FILE if self._has_offsets() else None,
                "modules": {n: {"rank": r.rank, "scaling": r.scaling} for n, r in self.loftq.items()},
            }
            if self.loftq_iter
            else None,
        }

    def _has_offsets(self) -> bool:
        return any(r.offset_A is not None for r in self.loftq.values())

    def save(self, output_dir: str | os.PathLike[str]) -> None:
        """Write ``quantization.json`` (and LoftQ's offsets when ``loftq_iter > 1``) into ``output_dir``."""
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(output_dir / QUANT_FILE, self.to_record())
        if self._has_offsets():
            from safetensors.torch import save

            tensors = {}
            for name, r in self.loftq.items():
                tensors[f"{name}.offset_A"] = r.offset_A.detach().contiguous().cpu()
                tensors[f"{name}.offset_B"] = r.offset_B.detach().contiguous().cpu()
            atomic_write_bytes(output_dir / LOFTQ_OFFSETS_FILE, save(tensors))


# ---------------------------------------------------------------------------------------------------------------------
# Rebuilding the base for a saved adapter
# ---------------------------------------------------------------------------------------------------------------------
def load_quantized_base(
    model: str | nn.Module,
    adapter_dir: str | os.PathLike[str] | None = None,
    *,
    quant_compute_dtype: str = "float32",
    quant_skip_towers: list[str] | tuple[str, ...] = DEFAULT_SKIP_TOWERS,
    **model_init_kwargs: Any,
) -> nn.Module:
    """The 4-bit base an adapter trained with ``MMSFTTrainer(quantization=...)`` belongs to, built the same way.

    With ``adapter_dir`` holding ``quantization.json`` the recorded settings are used: QLoRA loads through
    bitsandbytes with the same ``BitsAndBytesConfig``; LoftQ (and in-place QLoRA) load in full precision and quantize
    the same layers with the same settings, ``W - s * B_{T-1} @ A_{T-1}`` for LoftQ modules after several iterations,
    so the base holds the very ``Q`` the adapter was trained on. Load the adapter onto it with
    ``PeftModel.from_pretrained(base, adapter_dir)``.

    Args:
        model: The base checkpoint's path / hub id, or a full-precision model instance (in-place records only).
        adapter_dir: A directory written by ``MMSFTTrainer.save_model`` (or a checkpoint).
        quant_compute_dtype: Without a record: the compute dtype (``"float32"``, ``"bfloat16"``, ``"float16"``).
        quant_skip_towers: Without a record: towers kept in full precision.
        **model_init_kwargs: Passed to ``from_pretrained`` (``device_map``, ``revision``, ...).

    Returns:
        The 4-bit model.
    """
    from trl.trainer.utils import create_model_from_path

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
            skipped = skip_modules(map_towers(meta_model(model, kwargs.get("revision"))), record["skip_towers"])
        base = create_model_from_path(model, quantization_config=spec.bnb_config(skipped), **kwargs)
    else:
        base = create_model_from_path(model, **kwargs) if isinstance(model, str) else model
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

        def build(name: str, linear: nn.Linear) -> nn.Module:
            if name not in offsets:
                return quantize_linear(linear, spec)
            offset_A, offset_B = offsets[name]
            packed, state = rebuild_quantized(linear.weight, spec, scalings[name], offset_B, offset_A)
            return linear4bit_from_quantized(linear, packed, state, spec)

        quantize_in_place(base, names, spec, build=build)
        skipped = (
            record["skip_modules"]
            if record["skip_modules"] is not None
            else skip_modules(tower_map, record["skip_towers"])
        )
        mark_loaded_in_4bit(base, spec, skipped)
    keep_4bit_layers_trainable(base)
    return base


def _load_offsets(adapter_dir: Any, record: dict[str, Any]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    loftq = record.get("loftq") or {}
    if not loftq.get("offsets_file"):
        return {}
    from safetensors.torch import load_file

    tensors = load_file(str(Path(adapter_dir) / loftq["offsets_file"]))
    return {name: (tensors[f"{name}.offset_A"], tensors[f"{name}.offset_B"]) for name in loftq["modules"]}
