"""Reachability probe: one training step's forward + backward tells which modules a LoRA adapter would train on.

A module is *reached* when it runs on the batch (fires) and a LoRA adapter on it would get a non-zero gradient. For a
linear map that needs both a non-zero gradient of the loss with respect to its output *and* a non-zero input: the
gradient of `lora_B` is `sum_t g_t (A x_t)^T`, zero when every `x_t` is zero (Gemma 3n's per-layer input gate,
fed through a zero-initialised scale) however large `g_t` is. The probe catches what structure cannot: a vision
tower fed a dummy image whose features are multiplied by zero, cross-attention layers that text-only input skips, or
a module whose forward only runs in eval mode (Gemma 3n's `altup.correction_coefs`: in training mode the model
reads its clamped weight with `F.linear` and never calls the module).

To mean "reached in training", the probe runs the model as the trainer will: in training mode (dropout on), under the
same activation checkpointing and mixed-precision autocast as the `TrainingArguments`, on the batch TRL's collator
builds. It attaches a rank-1 stand-in of a LoRA adapter to each watched module (`out + (x . a) b` with a fixed
random `a` and a zero leaf `b`), so the output is unchanged and `b`'s gradient is exactly the one `lora_B`
would get. No parameter gains a `.grad`; mode, RNG state, buffers, `requires_grad` flags and the checkpointing
setup are restored afterwards, so training starts exactly as it would without the probe.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..upstream import require_grads_hooks, restore_require_grads_hooks
from .modality import batch_modalities, row_modalities

logger = logging.getLogger(__name__)

_CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
"""torch's convolutions (their lazy variants subclass them): a rank-1 stand-in cannot project their input."""


@dataclass
class ProbeResult:
    """What one probe batch reached.

    Attributes:
        candidates: Module paths that were watched.
        fired: Paths whose forward ran on the batch.
        nonzero_grad: Paths whose LoRA stand-in got a non-zero gradient.
        zero_input: Paths that fired but whose input was exactly zero on every call of the first step.
        reached_later: Paths (in `nonzero_grad`) whose gradient is zero on the first step only: it becomes non-zero
            once the adapters upstream have moved off their zero init (a second pass with perturbed stand-ins).
        batch_modalities: Non-text modalities the probe batch carried.
        loss: The probe loss.
        rows: Number of rows in the probe batch.
        tokens: Number of non-padding tokens in the probe batch.
        settings: How the probe ran (mode, checkpointing, autocast), JSON-ready.
    """

    candidates: list[str]
    fired: set[str] = field(default_factory=set)
    nonzero_grad: set[str] = field(default_factory=set)
    zero_input: set[str] = field(default_factory=set)
    reached_later: set[str] = field(default_factory=set)
    batch_modalities: set[str] = field(default_factory=set)
    loss: float = float("nan")
    rows: int = 0
    tokens: int = 0
    settings: dict[str, Any] = field(default_factory=dict)

    def status(self, name: str) -> str:
        """`"reached"`, `"never_fired"` or `"zero_grad"` for a watched module."""
        if name not in self.fired:
            return "never_fired"
        if name not in self.nonzero_grad:
            return "zero_grad"
        return "reached"

    def reason(self, name: str) -> str:
        """Why a watched module is (not) reached, in words, for the plan table."""
        status = self.status(name)
        mode = "training-mode " if self.settings.get("training", True) else ""
        if status == "never_fired":
            return f"probe: never fired in a {mode}step on a batch of the data"
        if status == "zero_grad":
            if name in self.zero_input:
                return (
                    f"probe: zero grad in a {mode}step (its input is all zeros, e.g. behind a zero-initialised scale)"
                )
            return f"probe: zero grad in a {mode}step on a batch of the data"
        if name in self.reached_later:
            return "reached: non-zero gradient once the adapters upstream have moved (zero on the first step)"
        return "reached: probe saw a non-zero gradient"

    def unreached(self) -> list[str]:
        """Watched modules that did not fire or got only a zero gradient, in watch order."""
        return [n for n in self.candidates if n not in self.nonzero_grad]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (module lists of unreached modules only, to stay small)."""
        return {
            "candidates": len(self.candidates),
            "reached": len(self.nonzero_grad & set(self.candidates)),
            "never_fired": [n for n in self.candidates if n not in self.fired],
            "zero_grad": [n for n in self.candidates if n in self.fired and n not in self.nonzero_grad],
            "zero_input": [n for n in self.candidates if n in self.zero_input and n not in self.nonzero_grad],
            "reached_later": [n for n in self.candidates if n in self.reached_later],
            "batch_modalities": sorted(self.batch_modalities),
            "loss": self.loss,
            "rows": self.rows,
            "tokens": self.tokens,
            "settings": dict(self.settings),
        }


@dataclass
class ProbeSettings:
    """How the probe runs the model; [`from_training_args`] mirrors what the trainer will do.

    Attributes:
        training: Run the forward in training mode (dropout and every training-only branch on).
        activation_checkpointing: Enable the model's activation (gradient) checkpointing for the probe, as the
            trainer will (only on models that support it and do not have it on already).
        activation_checkpointing_kwargs: The trainer's `activation_checkpointing_kwargs`.
        autocast_dtype: Mixed-precision autocast dtype (`torch.bfloat16` for `bf16=True`, `torch.float16` for
            `fp16=True`), or `None` for none.
    """

    training: bool = True
    activation_checkpointing: bool = False
    activation_checkpointing_kwargs: dict[str, Any] | None = None
    autocast_dtype: torch.dtype | None = None

    @classmethod
    def from_training_args(cls, args: Any) -> ProbeSettings:
        """The settings a `TrainingArguments` / `SFTConfig` trains with."""
        checkpointing = getattr(args, "activation_checkpointing", None)
        if checkpointing is None:
            checkpointing = getattr(args, "gradient_checkpointing", False)
        kwargs = getattr(args, "activation_checkpointing_kwargs", None)
        if kwargs is None:
            kwargs = getattr(args, "gradient_checkpointing_kwargs", None)
        dtype = (
            torch.bfloat16 if getattr(args, "bf16", False) else torch.float16 if getattr(args, "fp16", False) else None
        )
        return cls(
            training=True,
            activation_checkpointing=bool(checkpointing),
            activation_checkpointing_kwargs=dict(kwargs) if kwargs else None,
            autocast_dtype=dtype,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "training": self.training,
            "activation_checkpointing": self.activation_checkpointing,
            "autocast_dtype": str(self.autocast_dtype).replace("torch.", "") if self.autocast_dtype else None,
        }


class _LoraStandIn:
    """A rank-1 LoRA stand-in on one module: adds `(x . a) * b` to its output, `a` fixed random, `b` a zero leaf.

    `b.grad` is then `sum_t g_t (x_t . a)`, what `lora_B` of a LoRA adapter with `lora_A = a` gets: non-zero
    exactly when the module's weight gradient `sum_t g_t x_t^T` is (for all but a measure-zero set of `a`). The
    same `b` serves every call of the module (shared modules, activation checkpointing's recomputation), as the
    adapter's parameters do. Modules that are neither linear-like nor embeddings get an output bias leaf instead
    (gradient at the output only).
    """

    def __init__(self, module: nn.Module, generator: torch.Generator) -> None:
        self.module = module
        self.generator = generator
        self.a: torch.Tensor | None = None
        self.b: torch.Tensor | None = None
        self.fired = False
        self.nonzero_input = False

    def _projection(self, x: Any) -> torch.Tensor | None:
        """`x . a` per position, or `None` when the module is not linear-like / an embedding."""
        if not torch.is_tensor(x):
            return None
        module = self.module
        if isinstance(module, nn.Embedding) and not x.is_floating_point():
            if self.a is None:
                self.a = torch.randn(module.num_embeddings, generator=self.generator).to(module.weight.device)
            self.nonzero_input = True  # a looked-up row is an input the adapter can learn from
            return self.a[x]
        if not x.is_floating_point() or x.dim() == 0 or isinstance(module, _CONVOLUTIONS):
            return None
        if self.a is None:
            self.a = torch.randn(x.shape[-1], generator=self.generator).to(x.device)
        if not self.nonzero_input and bool(torch.any(x != 0)):
            self.nonzero_input = True
        return torch.matmul(x, self.a.to(x.dtype))

    def hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        self.fired = True
        if not torch.is_tensor(output) or not output.is_floating_point() or not torch.is_grad_enabled():
            return None
        x = args[0] if args else next(iter(kwargs.values()), None)
        proj = self._projection(x)
        if self.b is None:
            self.b = torch.zeros(output.shape[-1], dtype=torch.float32, device=output.device, requires_grad=True)
        if proj is None:  # not linear-like: a bias leaf tells whether the output gets a gradient
            self.nonzero_input = True
            return output + self.b.to(output.dtype)
        if proj.shape != output.shape[:-1]:
            self.nonzero_input = True
            return output + self.b.to(output.dtype)
        return output + (proj.unsqueeze(-1) * self.b).to(output.dtype)

    def reached(self) -> bool:
        return self.b is not None and self.b.grad is not None and bool(torch.any(self.b.grad != 0))

    def move(self) -> None:
        """Give `b` a small random value, as an adapter has after a few steps (`a` stays)."""
        if self.b is None:
            return
        fan_in = self.a.numel() if self.a is not None else 1
        value = torch.randn(self.b.shape, generator=self.generator) * (1e-3 / fan_in**0.5)
        self.b = value.to(self.b.device).requires_grad_(True)


def probe_reachability(
    model: nn.Module,
    batch: Mapping[str, Any],
    module_names: Iterable[str],
    settings: ProbeSettings | None = None,
) -> ProbeResult:
    """Run one training step's forward + backward of `batch` and report which of `module_names` it reaches.

    The model runs as `settings` say (default: training mode, no checkpointing, no autocast; use
    [`ProbeSettings.from_training_args`] to mirror a trainer). Afterwards every module's mode, the RNG state, all
    buffers, the parameters' `requires_grad` flags and the checkpointing setup are as before; parameters keep their
    values and gain no `.grad`. (A model that changes its own weights in place during a training forward, as Gemma
    3n clamps its AltUp prediction coefficients, does so here as it would on its first training step.)

    Args:
        model: The base model (not yet PEFT-wrapped).
        batch: A collated batch with `input_ids` and `labels` (or from which a loss can be formed).
        module_names: Paths of the modules to watch (usually the LoRA target candidates).
        settings: How to run the model.

    Returns:
        The [`ProbeResult`].
    """
    settings = settings if settings is not None else ProbeSettings()
    names = list(dict.fromkeys(module_names))
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise KeyError(f"Probe asked to watch modules the model does not have: {missing[:5]}")
    result = ProbeResult(candidates=names, settings=settings.to_dict())
    generator = torch.Generator().manual_seed(0)  # the stand-ins' `a`: no draw from the global RNG
    stand_ins = {name: _LoraStandIn(modules[name], generator) for name in names}
    device = _model_device(model)
    batch = _to_device(batch, device)
    inputs = dict(batch)
    if "use_cache" not in inputs and _accepts(model, "use_cache"):
        inputs["use_cache"] = False  # as TRL's compute_loss
    handles = [modules[n].register_forward_hook(s.hook, with_kwargs=True) for n, s in stand_ins.items()]
    try:
        with _as_in_training(model, settings, device):
            result.loss = _step(model, inputs, batch, settings, device)
            for name, s in stand_ins.items():
                if s.fired:
                    result.fired.add(name)
                    if not s.nonzero_input:
                        result.zero_input.add(name)
                if s.reached():
                    result.nonzero_grad.add(name)
            pending = [n for n in names if n in result.fired and n not in result.nonzero_grad]
            if pending:
                # Zero on the first step may only mean that an adapter upstream still is at its zero init (e.g. on a
                # linear whose base weight is zero). A second step with the reached modules' stand-ins moved (those
                # are the adapters training will have) tells those apart from modules that stay dead (a frozen zero
                # scale, a masked-out branch).
                for name in result.nonzero_grad:
                    stand_ins[name].move()
                for name in pending:
                    stand_ins[name].b = None  # a fresh zero leaf at its first call
                if math.isfinite(_step(model, inputs, batch, settings, device)):
                    result.reached_later = {n for n in pending if stand_ins[n].reached()}
                    result.nonzero_grad |= result.reached_later
    finally:
        for h in handles:
            h.remove()
    input_ids = batch.get("input_ids")
    if input_ids is not None:
        result.rows = int(input_ids.shape[0])
        mask = batch.get("attention_mask")
        result.tokens = int(mask.sum()) if mask is not None else int(input_ids.numel())
    result.batch_modalities = batch_modalities(batch)
    return result


def _step(
    model: nn.Module, inputs: dict[str, Any], batch: Mapping[str, Any], settings: ProbeSettings, device
) -> float:
    """One forward + backward as training runs it; returns the loss."""
    autocast = (
        torch.autocast(device_type=device.type, dtype=settings.autocast_dtype)
        if settings.autocast_dtype is not None
        else contextlib.nullcontext()
    )
    with torch.enable_grad():
        with autocast:
            outputs = model(**inputs)
            loss = _loss_from(outputs, batch)
        if loss.requires_grad:
            loss.backward()
    return float(loss.detach().float())


@contextlib.contextmanager
def _as_in_training(model: nn.Module, settings: ProbeSettings, device: torch.device) -> Iterator[None]:
    """Put `model` in the state training runs it in; restore modes, RNG, buffers, flags and checkpointing after."""
    modes = {m: m.training for m in model.modules()}
    requires = {p: p.requires_grad for p in model.parameters()}
    buffers = {b: b.detach().clone() for b in model.buffers() if b.device.type != "meta"}
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    checkpointing = _CheckpointingSwitch(model, settings)
    with torch.random.fork_rng(devices=rng_devices):
        try:
            for p in requires:
                p.requires_grad_(False)
            model.train(settings.training)
            checkpointing.enable()
            yield
        finally:
            checkpointing.restore()
            for p, flag in requires.items():
                p.requires_grad_(flag)
            for m, mode in modes.items():
                m.training = mode
            with torch.no_grad():
                for b, saved in buffers.items():
                    b.copy_(saved)


class _CheckpointingSwitch:
    """Turns a model's activation checkpointing on for the probe as the trainer will, and back off after.

    transformers >= 5.2x names it `activation_checkpointing_enable`; earlier 5.x `gradient_checkpointing_enable`.
    Enabling also hooks the input embeddings so their output requires grad; the hooks the probe adds are removed.
    """

    def __init__(self, model: nn.Module, settings: ProbeSettings) -> None:
        self.model = model
        self.new_api = hasattr(model, "activation_checkpointing_enable")
        state_attr = "is_activation_checkpointing" if self.new_api else "is_gradient_checkpointing"
        self.wanted = (
            settings.activation_checkpointing
            and (self.new_api or hasattr(model, "gradient_checkpointing_enable"))
            and getattr(model, "supports_gradient_checkpointing", False)
            and not getattr(model, state_attr, False)
        )
        self.kwargs = dict(settings.activation_checkpointing_kwargs or {})
        self.hooks_before = require_grads_hooks(model)
        self.enabled = False

    def enable(self) -> None:
        if not self.wanted:
            return
        kwargs = dict(self.kwargs)
        if self.new_api:
            every_n_layers = kwargs.pop("every_n_layers", 1)
            offload = kwargs.pop("offload", False)
            self.model.activation_checkpointing_enable(
                activation_checkpointing_kwargs=kwargs or None, every_n_layers=every_n_layers, offload=offload
            )
        else:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs or None)
        self.enabled = True

    def restore(self) -> None:
        if not self.enabled:
            return
        if self.new_api:
            self.model.activation_checkpointing_disable()
        else:
            self.model.gradient_checkpointing_disable()
        restore_require_grads_hooks(self.model, self.hooks_before)
        self.enabled = False


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params


def _loss_from(outputs: Any, batch: Mapping[str, Any]) -> torch.Tensor:
    loss = getattr(outputs, "loss", None)
    if loss is None and isinstance(outputs, Mapping):
        loss = outputs.get("loss")
    if loss is not None:
        return loss
    logits = getattr(outputs, "logits", None)
    if logits is None:
        raise ValueError("The probe forward returned neither a loss nor logits; cannot tell what the data reaches.")
    labels = batch.get("labels")
    if labels is None:
        return logits.float().logsumexp(-1).mean()
    shift_logits = logits[..., :-1, :].float()
    shift_labels = labels[..., 1:].to(shift_logits.device)
    return nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=-100
    )


def _model_device(model: nn.Module) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device) and device.type != "meta":
        return device
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def _to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


def choose_probe_rows(rows: Sequence[Mapping[str, Any]], k: int) -> list[dict[str, Any]]:
    """Pick up to `k` rows that together cover every modality present in `rows` (text-only rows included)."""
    if k < 1:
        raise ValueError(f"`k` must be >= 1, got {k}.")
    by_kind: dict[frozenset[str], list[Mapping[str, Any]]] = {}
    for row in rows:
        by_kind.setdefault(frozenset(row_modalities(row)), []).append(row)
    chosen: list[Mapping[str, Any]] = []
    # Round-robin over kinds so a mixed dataset puts both text-only and media rows in the batch.
    kinds = sorted(by_kind, key=lambda s: (len(s), sorted(s)))
    i = 0
    while len(chosen) < k and any(by_kind.values()):
        kind = kinds[i % len(kinds)]
        if by_kind[kind]:
            chosen.append(by_kind[kind].pop(0))
        i += 1
    return [dict(r) for r in chosen]
