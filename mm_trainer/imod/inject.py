"""Gradient injection: put ``λ1 ∇_A (L_TS + L_OS) + λ2 ∇_A L_MA`` on each LoRA ``A`` in the task's own backward.

How it works (one micro-batch):

1. :meth:`IMoDInjector.arm` registers a forward hook on every constrained LoRA layer. During the task forward the hook
   sees the layer input ``X`` and, on the layer's *first* call of the micro-step only, computes the constraint
   gradient ``g = λ1 ∇_A (L_TS + L_OS) + λ2 ∇_A L_MA`` right there (:func:`~.constraints.constraint_gradient`, fp32,
   ``X`` detached). ``X`` is dropped when the hook returns: nothing beyond what autograd keeps anyway is held, except
   ``g`` (one fp32 copy of each ``A``) until the backward.
2. :meth:`IMoDInjector.disarm` removes the hooks once the forward is done, so the recomputation of a checkpointed
   layer during the backward (gradient checkpointing) is not counted again; "first call" also keeps the extra no-grad
   forward some TRL loss paths run from counting twice.
3. :meth:`IMoDInjector.gradient_surrogate` returns ``S - S.detach()`` with ``S = scale · Σ_l <A_l, g_l>``: a term of
   value exactly 0 whose gradient is ``scale · g_l`` on ``A_l`` and nothing anywhere else. Added to the task loss, the
   one backward leaves ``∇task + g`` on ``A`` and ``∇task`` on ``B`` and the base, the reported loss is unchanged,
   DDP all-reduces the injected part in the same buckets as the task gradient, and it is all there before gradient
   clipping.

``scale`` makes the injected gradient follow the task loss's gradient-accumulation normalisation (see
:meth:`mm_trainer.imod.balance.ModalityBalance.constraint_scale`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..adapters import LoraAdapter
from .constraints import constraint_gradient
from .masks import IMoDMasks
from .tokens import TokenLayout


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
        self._zones: dict[int, torch.Tensor] = {}
        self._hooks: list[Any] = []
        self._layout: TokenLayout | None = None
        self._grads: dict[int, torch.Tensor] = {}
        self._metric_sums: torch.Tensor | None = None  # [Σ msd, #msd, Σ ma, #ma]
        self.micro_steps = 0
        self.micro_steps_with_non_text = 0
        self.aligned_layers: set[str] = set()
        self.misaligned_layers: set[str] = set()

    # ---------------------------------------------------------------------------------------------------------------
    def arm(self, layout: TokenLayout) -> None:
        """Start a micro-step: hook the layers for the coming forward of a batch with token ``layout``."""
        self.disarm()
        self._layout = layout
        self._grads = {}
        self.micro_steps += 1
        self.micro_steps_with_non_text += int(layout.has_non_text)
        for i, adapter in enumerate(self.adapters):
            self._hooks.append(
                adapter.module.register_forward_hook(
                    lambda module, args, kwargs, output, _i=i: self._on_forward(_i, args, kwargs), with_kwargs=True
                )
            )

    def disarm(self) -> None:
        """Remove the hooks (the forward is done); computed gradients stay until :meth:`gradient_surrogate`."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        self._layout = None

    def _on_forward(self, index: int, args: tuple, kwargs: dict) -> None:
        if index in self._grads or self._layout is None:
            return  # first call of the micro-step only
        x = args[0] if args else kwargs.get("x")
        adapter = self.adapters[index]
        if not isinstance(x, torch.Tensor) or not self._layout.aligned(x):
            self.misaligned_layers.add(adapter.name)
            return
        self.aligned_layers.add(adapter.name)
        a = adapter.lora_A
        zone = self._zone(index, a.device)
        layout = self._layout.to(x.device)
        grad, terms = constraint_gradient(a, zone, x.reshape(-1, x.shape[-1]), layout, self.lambda_msd, self.lambda_ma)
        self._grads[index] = grad
        self._record(terms.decoupling, terms.alignment, layout)

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
    def gradient_surrogate(self, scale: float, device: torch.device | None = None) -> torch.Tensor | None:
        """``S - S.detach()`` with ``S = scale · Σ_l <A_l, g_l>`` (``None`` when no layer computed a gradient).

        Its value is 0; its gradient is ``scale · g_l`` on each ``A_l``. Consumes the gradients of this micro-step.
        """
        grads, self._grads = self._grads, {}
        if not grads:
            return None
        total = None
        for index, grad in grads.items():
            term = (self.adapters[index].lora_A.float() * grad).sum()
            term = term.to(device) if device is not None else term
            total = term if total is None else total + term
        total = total * scale
        return total - total.detach()

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
