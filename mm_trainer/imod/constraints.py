r"""IMoD's two constraints on one LoRA ``A`` and the gradient they inject, all in fp32.

For one layer with input tokens ``x_i`` (rows of the layer input ``X``), ``A`` (``r x d``) and masks ``M_t``, ``M_o``,
``M_s`` (:mod:`mm_trainer.imod.masks`):

- **MSDC.** ``L_TS = ||(A ⊙ (M_t + M_s)) X_t - A X_t||²`` and ``L_OS = ||(A ⊙ (M_o + M_s)) X_o - A X_o||²``. Since the
  masks cover ``A`` once, ``A ⊙ (M_t + M_s) - A = -(A ⊙ M_o)`` exactly (also in floating point: ``a * 1 - a = 0``),
  so ``L_TS = ||(A ⊙ M_o) X_t||²``: the non-text-exclusive part of ``A`` should not respond to text tokens, and the
  text-exclusive part (``L_OS``) not to non-text tokens. That is how we compute them (one ``r x d`` product less).
- **MAAC.** ``s_i = (A ⊙ M_s) x_i``; per sequence the mean ``s̄_t`` over its text tokens and ``s̄_o`` over its
  non-text tokens, the concentrations ``c_t = mean_i cos(s_{t,i}, s̄_t)`` (likewise ``c_o``), and
  ``L_MA = 1 - (c_t + c_o) · cos(s̄_t, s̄_o)``, only on sequences holding both modalities.

Normalisation (the paper gives none; we chose it so that ``λ1 = 1``, ``λ2 = 1e-4`` mean the same thing whatever the
sequence lengths, the batch split or the number of layers):

- ``L_TS`` / ``L_OS`` of a sequence are *means* over its text / non-text tokens and over the ``r`` output features
  (``F.mse_loss``-style), not sums: a sum would grow with the sequence length and make ``λ1`` depend on it.
  ``X_t`` "with non-text tokens zeroed" is therefore taken as the text tokens alone (zeroed rows add nothing to the
  sum, and would only dilute a mean). A sequence without non-text tokens has ``L_OS = 0``.
- ``L_MA`` is already scale-free per sequence; sequences without both modalities contribute 0.
- Each term is summed over the sequences of the micro-batch and divided by the number of sequences in it (text-only
  sequences included), i.e. a mean over sequences. With the trainer's gradient-accumulation and DDP scaling this is
  the mean over all sequences of an optimizer step, so ``GA=2 x batch 1`` and ``GA=1 x batch 2`` inject the same
  gradient.
- Per layer, not averaged over layers: each ``A`` receives ``λ1 ∇_A (L_TS + L_OS) + λ2 ∇_A L_MA`` of its own
  constraint, as the paper's per-parameter update rule ``G_A = ∇_A L_task + λ1 G_A^MSD + λ2 G_A^MA`` states. (The
  constraint of one layer does not depend on any other layer's ``A``: the layer input is detached.)
- The concentrations ``c_t``, ``c_o`` are functions of ``A`` and are differentiated too (the paper's ``∇_A L_MA``
  of the formula as written; they are not treated as constant weights).
- Cosines use ``F.cosine_similarity``'s ``eps = 1e-8`` guard.
- The LoRA dropout and scaling play no part: the constraints are on ``A x`` of the layer input ``x``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .masks import NON_TEXT_ZONE, SHARED_ZONE, TEXT_ZONE
from .tokens import TokenLayout


@dataclass
class ConstraintTerms:
    """Constraint values of one layer and micro-batch (0-d fp32 tensors; differentiable w.r.t. ``A``).

    Attributes:
        text_specific: ``L_TS`` (mean over sequences).
        non_text_specific: ``L_OS`` (mean over sequences).
        alignment: ``L_MA`` (summed over sequences with both modalities, divided by all sequences).
    """

    text_specific: torch.Tensor
    non_text_specific: torch.Tensor
    alignment: torch.Tensor

    @property
    def decoupling(self) -> torch.Tensor:
        """``L_TS + L_OS``."""
        return self.text_specific + self.non_text_specific


def imod_constraints(a: torch.Tensor, zone: torch.Tensor, x: torch.Tensor, layout: TokenLayout) -> ConstraintTerms:
    """MSDC and MAAC of one layer.

    Args:
        a: ``A`` (``r x d``), fp32; make it require grad to differentiate the terms.
        zone: Zones of ``A`` (``uint8``, same shape, same device).
        x: Layer input flattened to ``(tokens, d)``, fp32, rows in the order of ``layout``.
        layout: Token positions of the micro-batch, on ``x``'s device.
    """
    r = a.shape[0]
    zero = a.new_zeros(())
    a_text = torch.where(zone == TEXT_ZONE, a, zero)
    a_non_text = torch.where(zone == NON_TEXT_ZONE, a, zero)
    a_shared = torch.where(zone == SHARED_ZONE, a, zero)
    n = max(layout.num_sequences, 1)

    # Text tokens: the non-text-exclusive response (MSDC residual) and the shared response s_t, in one product.
    text_out = x.index_select(0, layout.text_index) @ torch.cat([a_non_text, a_shared]).T
    non_text_out = x.index_select(0, layout.non_text_index) @ torch.cat([a_text, a_shared]).T

    text_specific = _sequence_mean_sq(text_out[:, :r], layout.text_sequence, layout.text_count, r) / n
    non_text_specific = _sequence_mean_sq(non_text_out[:, :r], layout.non_text_sequence, layout.non_text_count, r) / n
    alignment = _alignment(text_out[:, r:], non_text_out[:, r:], layout) / n
    return ConstraintTerms(text_specific, non_text_specific, alignment)


def _sequence_mean_sq(residual: torch.Tensor, sequence: torch.Tensor, count: torch.Tensor, r: int) -> torch.Tensor:
    """Sum over sequences of the mean (over its tokens and the ``r`` features) of the squared residual."""
    if residual.shape[0] == 0:
        return residual.sum()
    weight = 1.0 / (count.clamp(min=1) * r)
    return (residual.square().sum(1) * weight[sequence]).sum()


def _alignment(shared_text: torch.Tensor, shared_non_text: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """Sum of ``L_MA`` over the sequences holding both modalities."""
    both = (layout.text_count > 0) & (layout.non_text_count > 0)
    if not bool(both.any()):
        return shared_text.sum() * 0.0 + shared_non_text.sum() * 0.0
    mean_text, conc_text = _center_and_concentration(shared_text, layout.text_sequence, layout.text_count, layout)
    mean_non, conc_non = _center_and_concentration(
        shared_non_text, layout.non_text_sequence, layout.non_text_count, layout
    )
    align = F.cosine_similarity(mean_text, mean_non, dim=1)
    per_sequence = 1.0 - (conc_text + conc_non) * align
    return per_sequence[both].sum()


def _center_and_concentration(
    shared: torch.Tensor, sequence: torch.Tensor, count: torch.Tensor, layout: TokenLayout
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: mean ``s̄`` of its tokens' shared responses and ``c = mean_i cos(s_i, s̄)``."""
    num = layout.num_sequences
    denom = count.clamp(min=1)
    mean = shared.new_zeros(num, shared.shape[1]).index_add(0, sequence, shared) / denom[:, None]
    cos = F.cosine_similarity(shared, mean[sequence], dim=1)
    concentration = shared.new_zeros(num).index_add(0, sequence, cos) / denom
    return mean, concentration


def constraint_gradient(
    a: torch.Tensor,
    zone: torch.Tensor,
    x: torch.Tensor,
    layout: TokenLayout,
    lambda_msd: float,
    lambda_ma: float,
) -> tuple[torch.Tensor, ConstraintTerms]:
    """``λ1 ∇_A (L_TS + L_OS) + λ2 ∇_A L_MA`` of one layer (fp32, shaped like ``A``) and the detached terms.

    Runs its own small autograd graph in fp32 with autocast off; the layer input is treated as a constant. Saved
    tensors of that graph bypass any enclosing saved-tensor hooks (non-reentrant activation checkpointing), so the
    computation neither triggers a recomputation nor changes what the checkpoint saves.
    """
    identity = lambda t: t  # noqa: E731
    with (
        torch.enable_grad(),
        torch.autocast(device_type=x.device.type, enabled=False),
        torch.autograd.graph.saved_tensors_hooks(identity, identity),
    ):
        leaf = a.detach().float().requires_grad_(True)
        terms = imod_constraints(leaf, zone, x.detach().float(), layout)
        total = lambda_msd * terms.decoupling + lambda_ma * terms.alignment
        (grad,) = torch.autograd.grad(total, leaf)
    detached = ConstraintTerms(
        terms.text_specific.detach(), terms.non_text_specific.detach(), terms.alignment.detach()
    )
    return grad, detached
