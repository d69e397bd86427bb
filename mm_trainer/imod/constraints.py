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
- ``X`` is the input LoRA multiplies ``A`` with: the layer input after LoRA dropout, i.e. the layer input itself
  with ``lora_dropout=0`` (PEFT's default). With dropout the constraints see the same dropped-out tokens as the task
  (the price of computing them in the same product as ``A x``; see :mod:`mm_trainer.imod.inject`). The LoRA scaling
  plays no part.
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


ZONE_ORDER: tuple[int, int, int] = (NON_TEXT_ZONE, TEXT_ZONE, SHARED_ZONE)
"""Order of the zone blocks in :func:`zone_weights` and in the responses :func:`constraint_terms` reads."""


def zone_weights(a: torch.Tensor, zone: torch.Tensor) -> torch.Tensor:
    """``[A⊙M_o; A⊙M_t; A⊙M_s]`` stacked (``3r x d``), in ``a``'s dtype; differentiable w.r.t. ``a``."""
    zero = a.new_zeros(())
    return torch.cat([torch.where(zone == code, a, zero) for code in ZONE_ORDER])


def constraint_terms(responses: torch.Tensor, layout: TokenLayout) -> ConstraintTerms:
    """MSDC and MAAC from the zone responses ``X @ [A⊙M_o; A⊙M_t; A⊙M_s]ᵀ`` (``tokens x 3r``, fp32) of one layer.

    Everything the constraints need from ``A`` and ``X`` is in these ``3r`` numbers per token, so the terms and their
    gradient w.r.t. the responses cost ``O(tokens · r)``; only turning that gradient into one w.r.t. ``A`` needs
    ``X`` again (:mod:`mm_trainer.imod.inject` folds it into LoRA's own ``A`` gradient).
    """
    r = responses.shape[-1] // 3
    n = max(layout.num_sequences, 1)
    non_text_part, text_part, shared = responses.view(-1, 3, r).unbind(1)
    # L_TS: (A⊙M_o) x on text tokens; L_OS: (A⊙M_t) x on non-text tokens; means over tokens and the r features.
    text_specific = layout.text_weight @ non_text_part.square().sum(1) / (r * n)
    non_text_specific = layout.non_text_weight @ text_part.square().sum(1) / (r * n)
    alignment = _alignment(shared, layout) / n
    return ConstraintTerms(text_specific, non_text_specific, alignment)


def imod_constraints(a: torch.Tensor, zone: torch.Tensor, x: torch.Tensor, layout: TokenLayout) -> ConstraintTerms:
    """MSDC and MAAC of one layer, differentiable w.r.t. ``a`` (the definition, written as one function).

    Args:
        a: ``A`` (``r x d``), fp32.
        zone: Zones of ``A`` (``uint8``, same shape, same device).
        x: Input of ``A`` flattened to ``(tokens, d)``, fp32, rows in the order of ``layout``.
        layout: Token positions of the micro-batch, on ``x``'s device.
    """
    return constraint_terms(x @ zone_weights(a, zone).T, layout)


def _alignment(shared: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """Sum of ``L_MA`` over the sequences holding both modalities (``shared``: ``(A⊙M_s) x`` of every token)."""
    both = (layout.text_count > 0) & (layout.non_text_count > 0)
    mean_text = layout.text_mean @ shared  # s̄_t per sequence
    mean_non_text = layout.non_text_mean @ shared  # s̄_o
    # c = mean over the modality's tokens of cos(s_i, s̄): every token against its sequence's centre, then averaged
    # with the modality's weights (tokens of the other modality get weight 0).
    cos_text = F.cosine_similarity(shared, layout.membership.T @ mean_text, dim=1)
    cos_non_text = F.cosine_similarity(shared, layout.membership.T @ mean_non_text, dim=1)
    concentration = layout.text_mean @ cos_text + layout.non_text_mean @ cos_non_text  # c_t + c_o
    per_sequence = 1.0 - concentration * F.cosine_similarity(mean_text, mean_non_text, dim=1)
    return torch.where(both, per_sequence, 0.0).sum()


def response_gradient(
    responses: torch.Tensor, layout: TokenLayout, lambda_msd: float, lambda_ma: float
) -> tuple[torch.Tensor, ConstraintTerms]:
    """``∂(λ1 (L_TS + L_OS) + λ2 L_MA) / ∂responses`` (``tokens x 3r``, fp32) and the detached terms.

    The same terms as :func:`constraint_terms`, with few small operations (they run once per layer and micro-batch):
    MSDC's gradient in closed form (``∂L_TS/∂z_i = 2 w_i z_i / (r n)`` with ``w_i`` the token's weight in its
    sequence's mean), MAAC's by a small autograd graph over the shared block only, and only when a sequence holds
    both modalities and ``λ2 > 0``. That graph runs in fp32 with autocast off, and its saved tensors bypass any
    enclosing saved-tensor hooks (non-reentrant activation checkpointing), so it neither triggers a recomputation
    nor changes what a checkpoint saves.
    """
    responses = responses.detach().float()
    r = responses.shape[-1] // 3
    n = max(layout.num_sequences, 1)
    non_text_part, text_part, shared = responses.view(-1, 3, r).unbind(1)
    text_specific = layout.text_weight @ non_text_part.square().sum(1) / (r * n)
    non_text_specific = layout.non_text_weight @ text_part.square().sum(1) / (r * n)
    grad = torch.zeros_like(responses).view(-1, 3, r)
    factor = 2.0 * lambda_msd / (r * n)
    torch.mul(non_text_part, (factor * layout.text_weight)[:, None], out=grad[:, 0])
    torch.mul(text_part, (factor * layout.non_text_weight)[:, None], out=grad[:, 1])
    alignment = responses.new_zeros(())
    if lambda_ma and layout.sequences_with_both:
        identity = lambda t: t  # noqa: E731
        with (
            torch.enable_grad(),
            torch.autocast(device_type=responses.device.type, enabled=False),
            torch.autograd.graph.saved_tensors_hooks(identity, identity),
        ):
            leaf = shared.contiguous().requires_grad_(True)
            alignment = _alignment(leaf, layout) / n
            (grad[:, 2],) = torch.autograd.grad(lambda_ma * alignment, leaf)
    return grad.view(-1, 3 * r), ConstraintTerms(text_specific, non_text_specific, alignment.detach())
