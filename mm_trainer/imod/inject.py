"""Gradient injection: ``λ1 ∇_A (L_TS + L_OS) + λ2 ∇_A L_MA`` lands on each LoRA ``A`` in the task's own backward.

The mechanism, for one micro-batch (armed by :meth:`IMoDInjector.arm` before the forward, disarmed by
:meth:`IMoDInjector.disarm` after the backward):

1. While armed, each constrained layer's ``lora_A`` runs :class:`ZonedLoraA` instead of ``F.linear``. Its forward
   reads the input ``X`` once for ``X @ [A; A⊙M_o; A⊙M_t; A⊙M_s]ᵀ``: the first ``r`` columns are LoRA's ``A x``,
   returned as usual; the other ``3r`` are the zone responses the constraints are made of. From them it computes,
   right away and in fp32, the constraint values and their gradient w.r.t. the responses ``∂C/∂Z`` (``tokens x 3r``,
   scaled for gradient accumulation; :func:`~.constraints.response_gradient`), and keeps that on the autograd node.
2. Its backward gets LoRA's ``∂L/∂u`` and reads ``X`` once for ``[∂L/∂u | ∂C/∂Z]ᵀ X``: the first ``r`` rows are
   ``∇A`` of the task, the other ``3r`` rows, masked by their zones, ``∇A`` of the constraints. ``A`` receives the
   sum through its ``AccumulateGrad``, so DDP all-reduces it in the same buckets as the task gradient, before
   gradient clipping; ``∂L/∂X = ∂L/∂u · A`` as in plain LoRA (the constraints treat ``X`` as a constant), so ``B``,
   the base model and earlier layers get the task gradient only. The loss is never touched: what is logged is the
   task loss.

Plain LoRA reads ``X`` three times per layer (``A x``, ``∇A``, ``∂L/∂X``); IMoD adds no read, only ``3r`` more
columns to two skinny products and ``O(tokens · r)`` for the constraints. A separate constraint product would add
two reads of ``X``, which on a memory-bound CPU costs about as much as LoRA itself.

Which call counts: the first call per layer and micro-batch *with autograd recording*. That is the forward under
non-reentrant activation checkpointing (its recomputation in the backward runs the same products, keeping the saved
tensors identical, but computes no constraint and its node is not the one the backward uses), the recomputation under
reentrant checkpointing (whose first forward runs without autograd), and never the extra no-grad forward some TRL
loss paths run. Because the constraint gradient is kept on the node of the call that counted, nothing is counted
twice. What stays in memory until the backward: ``∂C/∂Z`` in ``tokens x 2r`` fp32 per layer (see
:class:`ZonedLoraA`); the input ``X`` itself, ``tokens x d``, is kept by autograd for LoRA anyway.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..adapters import LoraAdapter
from .constraints import ZONE_ORDER, response_gradient, zone_weights
from .dominance import lora_linear_modules
from .masks import IMoDMasks
from .tokens import TokenLayout


class ZonedLoraA(torch.autograd.Function):
    """``u = x Aᵀ`` whose backward adds a precomputed constraint gradient to ``∇A`` in the same product.

    ``forward(x, weight, zone, step)``: ``step`` is ``None`` (plain LoRA, in the wider product) or a callable that
    receives the zone responses ``Z`` (``tokens x 3r``, fp32) and returns ``∂C/∂Z`` compactly, as
    ``(exclusive, shared, text_rows)``: a text token's gradient only has an ``M_o`` block and a non-text token's only
    an ``M_t`` block, so both fit in one ``tokens x r`` tensor ``exclusive``; ``shared`` is the ``M_s`` block and
    ``text_rows`` (``tokens x 1``) is 1 on text tokens. That is what stays in memory until the backward.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, zone: torch.Tensor, step: Any) -> torch.Tensor:
        r, d = weight.shape
        # F.linear's output dtype: the autocast dtype when autocast is on, else the input's.
        device_type = x.device.type
        out_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        with torch.autocast(device_type=device_type, enabled=False):
            w32 = weight.float()
            stacked = torch.cat([w32, zone_weights(w32, zone)])  # [A; A⊙M_o; A⊙M_t; A⊙M_s], 4r x d
            products = x.reshape(-1, d).float() @ stacked.T  # one read of X
        ctx.response_grad = step(products[:, r:].contiguous()) if step is not None else None
        ctx.save_for_backward(x, weight, zone)
        return products[:, :r].to(out_dtype).contiguous().reshape(*x.shape[:-1], r)

    @staticmethod
    def backward(ctx: Any, grad_u: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        x, weight, zone = ctx.saved_tensors
        r, d = weight.shape
        grad_u = grad_u.reshape(-1, r).float()
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_u @ weight.float()).to(x.dtype).reshape(x.shape)
        if ctx.needs_input_grad[1]:
            response_grad = ctx.response_grad
            if response_grad is None:
                left = grad_u
            else:
                exclusive, shared, text_rows = response_grad
                non_text_part = exclusive * text_rows  # ∂C/∂(A⊙M_o)x lives on text tokens
                left = torch.cat([grad_u, non_text_part, exclusive - non_text_part, shared], dim=1)
            products = left.T @ x.reshape(-1, d).float()  # one read of X for task and constraint
            grad = products[:r]
            if response_grad is not None:
                for block, code in enumerate(ZONE_ORDER, start=1):
                    grad = grad + torch.where(zone == code, products[block * r : (block + 1) * r], 0.0)
            grad_weight = grad.to(weight.dtype)
        ctx.response_grad = None
        return grad_x, grad_weight, None, None


class IMoDInjector:
    """IMoD's constraint gradients for a set of LoRA layers of the language model.

    Args:
        adapters: The constrained adapters (LoRA ``Linear`` layers whose input is the token sequence).
        masks: Their masks (:class:`~mm_trainer.imod.masks.IMoDMasks`, one per adapter by name).
        lambda_msd: ``λ1``, weight of the MSDC gradient.
        lambda_ma: ``λ2``, weight of the MAAC gradient.

    Attributes:
        micro_steps: Micro-batches seen.
        micro_steps_with_non_text: Of those, how many held a non-text token.
        aligned_layers: Names of layers whose input lined up with ``input_ids`` at least once.
        misaligned_layers: Names of layers whose input did not line up (skipped for that batch).
    """

    def __init__(self, adapters: Sequence[LoraAdapter], masks: IMoDMasks, lambda_msd: float, lambda_ma: float) -> None:
        missing = [a.name for a in adapters if a.name not in masks.by_name]
        if missing:
            raise ValueError(f"No IMoD mask for adapters {missing[:5]}.")
        self.adapters = list(adapters)
        self.masks = masks
        self.lambda_msd = float(lambda_msd)
        self.lambda_ma = float(lambda_ma)
        self._lora_a = []
        for adapter in self.adapters:
            modules = lora_linear_modules(adapter)
            if modules is None or modules[0].bias is not None:
                raise ValueError(f"IMoD needs a bias-free LoRA Linear A on {adapter.name}.")
            self._lora_a.append(modules[0])
        self._zones: dict[int, torch.Tensor] = {}
        self._layout: TokenLayout | None = None
        self._scale = 1.0
        self._counted: set[int] = set()
        self._armed = False
        self._metric_sums: torch.Tensor | None = None  # [Σ msd, #msd, Σ ma, #ma]
        self.micro_steps = 0
        self.micro_steps_with_non_text = 0
        self.aligned_layers: set[str] = set()
        self.misaligned_layers: set[str] = set()

    # ---------------------------------------------------------------------------------------------------------------
    def arm(self, layout: TokenLayout, scale: float) -> None:
        """Start a micro-batch with token ``layout``; its constraint gradients are multiplied by ``scale``."""
        self.disarm()
        self._layout = layout
        self._scale = float(scale)
        self._counted = set()
        self.micro_steps += 1
        self.micro_steps_with_non_text += int(layout.has_non_text)
        for index, module in enumerate(self._lora_a):
            if "forward" in module.__dict__:
                raise RuntimeError(
                    f"IMoD cannot run on {self.adapters[index].name}: its lora_A forward is already replaced (e.g. "
                    "by an offloading hook). Train without CPU/disk offloading of the LoRA layers, or with imod=False."
                )
            module.forward = lambda x, _i=index: self._forward(_i, x)
        self._armed = True

    def disarm(self) -> None:
        """End the micro-batch (after its backward): ``lora_A`` runs ``F.linear`` again."""
        if not self._armed:
            return
        for module in self._lora_a:
            module.__dict__.pop("forward", None)
        self._armed = False
        self._layout = None

    def _forward(self, index: int, x: torch.Tensor) -> torch.Tensor:
        module = self._lora_a[index]
        layout = self._layout
        if layout is None or not layout.aligned(x):
            if layout is not None and torch.is_grad_enabled():
                self.misaligned_layers.add(self.adapters[index].name)
            return F.linear(x, module.weight)
        step = None
        if torch.is_grad_enabled() and index not in self._counted:  # the call whose node the backward will use
            self._counted.add(index)
            self.aligned_layers.add(self.adapters[index].name)
            step = lambda responses: self._response_grad(responses, layout.to(responses.device))  # noqa: E731
        return ZonedLoraA.apply(x, module.weight, self._zone(index, module.weight.device), step)

    def _response_grad(
        self, responses: torch.Tensor, layout: TokenLayout
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        grad, terms = response_gradient(responses, layout, self.lambda_msd, self.lambda_ma)
        self._record(terms.decoupling, terms.alignment, layout)
        r = grad.shape[1] // 3
        grad = grad * self._scale
        # The M_o block is zero off text tokens and the M_t block off non-text tokens: one r-wide tensor holds both.
        return grad[:, :r] + grad[:, r : 2 * r], grad[:, 2 * r :].contiguous(), layout.text_rows

    def _zone(self, index: int, device: torch.device) -> torch.Tensor:
        zone = self._zones.get(index)
        if zone is None or zone.device != device:
            zone = self.masks.by_name[self.adapters[index].name].zone.to(device)
            self._zones[index] = zone
        return zone

    def _record(self, decoupling: torch.Tensor, alignment: torch.Tensor, layout: TokenLayout) -> None:
        both = layout.sequences_with_both
        if self._metric_sums is None:
            self._metric_sums = torch.zeros(4, dtype=torch.float64, device=decoupling.device)
        sums = self._metric_sums
        # L_MA is logged as its mean over the sequences that hold both modalities.
        ma = alignment.to(sums.device, torch.float64) * (layout.num_sequences / both) if both else sums.new_zeros(())
        sums += torch.stack(
            [decoupling.to(sums.device, torch.float64), sums.new_ones(()), ma, sums.new_tensor(float(both > 0))]
        )

    # ---------------------------------------------------------------------------------------------------------------
    def pop_metrics(self, device: torch.device) -> torch.Tensor:
        """``[Σ msd, #msd, Σ ma, #ma]`` since the last call (fp64 on ``device``), then reset."""
        sums = self._metric_sums
        self._metric_sums = None
        return sums.to(device) if sums is not None else torch.zeros(4, dtype=torch.float64, device=device)

    def state(self) -> dict[str, Any]:
        """Counters for the audit and the checkpoint."""
        return {
            "micro_steps": self.micro_steps,
            "micro_steps_with_non_text": self.micro_steps_with_non_text,
            "aligned_layers": len(self.aligned_layers),
            "misaligned_layers": sorted(self.misaligned_layers - self.aligned_layers),
        }
