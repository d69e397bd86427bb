r"""IMoD's two constraints on one LoRA `A` and the gradient they inject, all in fp32.

For one layer with input tokens `x_i` (rows of the layer input `X`), `A` (`r x d`) and masks `M_t`, `M_o`,
`M_s` ([`mm_trainer.imod.masks`]):

- **MSDC.** `L_TS = ||(A ⊙ (M_t + M_s)) X_t - A X_t||²` and `L_OS = ||(A ⊙ (M_o + M_s)) X_o - A X_o||²`. Since the
  masks cover `A` once, `A ⊙ (M_t + M_s) - A = -(A ⊙ M_o)` exactly (also in floating point: `a * 1 - a = 0`),
  so `L_TS = ||(A ⊙ M_o) X_t||²`: the non-text-exclusive part of `A` should not respond to text tokens, and the
  text-exclusive part (`L_OS`) not to non-text tokens. That is how we compute them (one `r x d` product less).
- **MAAC.** `s_i = (A ⊙ M_s) x_i`; per sequence the mean `s̄_t` over its text tokens and `s̄_o` over its
  non-text tokens, the concentrations `c_t = mean_i cos(s_{t,i}, s̄_t)` (likewise `c_o`), and
  `L_MA = 1 - (c_t + c_o) · cos(s̄_t, s̄_o)`, only on sequences holding both modalities.

Normalisation (the paper gives none; we chose it so that `λ1 = 1`, `λ2 = 1e-4` mean the same thing whatever the
sequence lengths, the batch split or the number of layers):

- `L_TS` / `L_OS` of a sequence are *means* over its text / non-text tokens and over the `r` output features
  (`F.mse_loss`-style), not sums: a sum would grow with the sequence length and make `λ1` depend on it.
  `X_t` "with non-text tokens zeroed" is therefore taken as the text tokens alone (zeroed rows add nothing to the
  sum, and would only dilute a mean). A sequence without non-text tokens has `L_OS = 0`.
- `L_MA` is already scale-free per sequence; sequences without both modalities contribute 0.
- Each term is summed over the sequences of the micro-batch and divided by the number of sequences in it (text-only
  sequences included), i.e. a mean over sequences. With the trainer's gradient-accumulation and DDP scaling this is
  the mean over all sequences of an optimizer step, so `GA=2 x batch 1` and `GA=1 x batch 2` inject the same
  gradient.
- Per layer, not averaged over layers: each `A` receives `λ1 ∇_A (L_TS + L_OS) + λ2 ∇_A L_MA` of its own
  constraint, as the paper's per-parameter update rule `G_A = ∇_A L_task + λ1 G_A^MSD + λ2 G_A^MA` states. (The
  constraint of one layer does not depend on any other layer's `A`: the layer input is detached.)
- The concentrations `c_t`, `c_o` are functions of `A` and are differentiated too (the paper's `∇_A L_MA`
  of the formula as written; they are not treated as constant weights).
- Cosines use `F.cosine_similarity`'s `eps = 1e-8` guard.
- `X` is the input LoRA multiplies `A` with: the layer input after LoRA dropout, i.e. the layer input itself
  with `lora_dropout=0` (PEFT's default). With dropout the constraints see the same dropped-out tokens as the task
  (the price of computing them in the same product as `A x`; see [`mm_trainer.imod.inject`]). The LoRA scaling
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
    """Constraint values of one layer and micro-batch (0-d fp32 tensors; differentiable w.r.t. `A`).

    Attributes:
        text_specific: `L_TS` (mean over sequences).
        non_text_specific: `L_OS` (mean over sequences).
        alignment: `L_MA` (summed over sequences with both modalities, divided by all sequences).
    """

    text_specific: torch.Tensor
    non_text_specific: torch.Tensor
    alignment: torch.Tensor

    @property
    def decoupling(self) -> torch.Tensor:
        """`L_TS + L_OS`."""
        return self.text_specific + self.non_text_specific


ZONE_ORDER: tuple[int, int, int] = (NON_TEXT_ZONE, TEXT_ZONE, SHARED_ZONE)
"""Order of the zone blocks in [`zone_weights`], [`zone_masks`] and the responses [`constraint_terms`] reads."""


def zone_weights(a: torch.Tensor, zone: torch.Tensor) -> torch.Tensor:
    """`[A⊙M_o; A⊙M_t; A⊙M_s]` stacked (`3r x d`), in `a`'s dtype; differentiable w.r.t. `a`."""
    zero = a.new_zeros(())
    return torch.cat([torch.where(zone == code, a, zero) for code in ZONE_ORDER])


def constraint_terms(responses: torch.Tensor, layout: TokenLayout) -> ConstraintTerms:
    """MSDC and MAAC from the zone responses `X @ [A⊙M_o; A⊙M_t; A⊙M_s]ᵀ` (`tokens x 3r`, fp32) of one layer.

    Everything the constraints need from `A` and `X` is in these `3r` numbers per token, so the terms and their
    gradient w.r.t. the responses cost `O(tokens · r)`; only turning that gradient into one w.r.t. `A` needs
    `X` again ([`mm_trainer.imod.inject`] folds it into LoRA's own `A` gradient).
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
    """MSDC and MAAC of one layer, differentiable w.r.t. `a` (the definition, written as one function).

    Args:
        a: `A` (`r x d`), fp32.
        zone: Zones of `A` (`uint8`, same shape, same device).
        x: Input of `A` flattened to `(tokens, d)`, fp32, rows in the order of `layout`.
        layout: Token positions of the micro-batch, on `x`'s device.
    """
    return constraint_terms(x @ zone_weights(a, zone).T, layout)


def _alignment(shared: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """Sum of `L_MA` over the sequences holding both modalities (`shared`: `(A⊙M_s) x` of every token)."""
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


def zone_masks(zone: torch.Tensor) -> torch.Tensor:
    """`[M_o; M_t; M_s]` as one fp32 0/1 `3 x r x d` tensor, in [`ZONE_ORDER`] (built once per layer).

    Float rather than boolean: multiplying by it is an order of magnitude faster on CPU than `torch.where` on a
    boolean mask, for 12 bytes per element of `A` (`A` itself takes 4).
    """
    return torch.stack([zone == code for code in ZONE_ORDER]).float()


@dataclass
class ResponseGradient:
    """`∂(λ1 (L_TS + L_OS) + λ2 L_MA) / ∂Z` of one layer, compactly, with the detached constraint values.

    Attributes:
        exclusive: `tokens x r`: on a text token the `M_o` block of `∂C/∂Z` (`L_TS`), on a non-text token the
            `M_t` block (`L_OS`); the other exclusive block of a token is zero, so one tensor holds both.
        shared: `tokens x r`, the `M_s` block (`L_MA`); `None` when no sequence holds both modalities or
            `λ2 = 0`.
        decoupling: `L_TS + L_OS` (0-d).
        alignment: `L_MA` (0-d).
    """

    exclusive: torch.Tensor
    shared: torch.Tensor | None
    decoupling: torch.Tensor
    alignment: torch.Tensor


def constraint_gradient(
    responses: torch.Tensor, layout: TokenLayout, lambda_msd: float, lambda_ma: float, scale: float = 1.0
) -> ResponseGradient:
    """`scale · ∂(λ1 (L_TS + L_OS) + λ2 L_MA) / ∂Z` in closed form, from the zone responses `Z` (`tokens x 3r`).

    The same terms as [`constraint_terms`], computed with a fixed, small number of tensor operations on
    `tokens x r` tensors, no autograd graph, no loop and no host-device synchronisation; the per-token and
    per-group weights come from `layout` (built once per micro-batch). `responses` may be a strided view (the
    columns of a wider product); it is read, never copied.

    `responses` may also hold several layers of the same micro-batch stacked (`layers x tokens x 3r`): every
    operation then runs once for all of them, and each field of the result gains the leading `layers` dimension
    (`decoupling` and `alignment` become one value per layer). Layers do not mix: row `l` of the result is the
    result of row `l` alone.

    - MSDC: `∂L_TS/∂z_i = 2 w_i z_i / (r n)` with `w_i` the token's weight in its sequence's text mean (likewise
      `L_OS`), `n` the number of sequences.
    - MAAC, per group `g` (a sequence's text or non-text tokens) with mean `m_g`, `m̂ = m / |m|`,
      `ŝ_i = s_i / |s_i|`, `cos_i = ŝ_i · m̂_g`, concentration `c_g = mean_i cos_i` and `γ = cos(m_t, m_o)` of
      the sequence: `∂L/∂s_i = w_i (-γ (m̂_g - cos_i ŝ_i) / |s_i| + v_g)` with
      `v_g = -γ (mean_i ŝ_i - c_g m̂_g) / |m_g| - (c_t + c_o) (m̂_other - γ m̂_g) / |m_g|`, divided by `n`.
      Norms are clamped at `1e-8` as in [`torch.nn.functional.cosine_similarity`].
    """
    r = responses.shape[-1] // 3
    n = max(layout.num_sequences, 1)
    non_text_part, text_part, shared = responses[..., :r], responses[..., r : 2 * r], responses[..., 2 * r :]
    # A text token's L_TS response is its M_o block, a non-text token's L_OS response its M_t block.
    exclusive = torch.where(layout.text_mask, non_text_part, text_part).float()
    weight = layout.token_weight[:, None]
    decoupling = (exclusive.square() * weight).sum((-2, -1)) / (r * n)
    exclusive_grad = exclusive.mul_(weight * (2.0 * lambda_msd * scale / (r * n)))
    alignment = torch.zeros_like(decoupling)
    shared_grad = None
    if lambda_ma and layout.sequences_with_both:
        alignment, shared_grad = _alignment_gradient(shared.float(), layout, lambda_ma * scale / n)
        alignment = alignment / n
    return ResponseGradient(exclusive_grad, shared_grad, decoupling, alignment)


def _alignment_gradient(shared: torch.Tensor, layout: TokenLayout, factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`(Σ_{sequences with both} L_MA, factor · ∂ Σ L_MA / ∂shared)` in closed form (see [`constraint_gradient`]);
    `shared` is `tokens x r` or `layers x tokens x r`."""
    eps = 1e-8
    s = layout.num_sequences
    group = layout.group
    means = layout.group_mean @ shared  # m_g, (layers x) 2S x r
    mean_norm = torch.linalg.vector_norm(means, dim=-1, keepdim=True).clamp_min_(eps)
    mean_unit = means.div_(mean_norm)
    norm = torch.linalg.vector_norm(shared, dim=-1, keepdim=True).clamp_min_(eps)
    unit = shared / norm  # ŝ_i
    centre = mean_unit.index_select(-2, group)  # m̂ of each token's group
    cos = torch.linalg.vecdot(unit, centre)  # cos_i
    concentration = cos @ layout.group_mean.T  # c_g
    other_unit = mean_unit.roll(s, -2)  # m̂ of the sequence's other modality
    between = torch.linalg.vecdot(mean_unit, other_unit)  # γ of the group's sequence (both halves)
    both_sum = concentration + concentration.roll(s, -1)  # c_t + c_o of the group's sequence
    alignment = (1.0 - both_sum[..., :s] * between[..., :s]) @ layout.both_groups[:s]
    # -v_g = γ (mean_i ŝ_i - c_g m̂_g) / |m_g| + (c_t + c_o) (m̂_other - γ m̂_g) / |m_g|
    gamma, total = between[..., None], both_sum[..., None]
    minus_v = (layout.group_mean @ unit).mul_(gamma).addcmul_(total, other_unit)
    minus_v.addcmul_(gamma * (concentration[..., None] + total), mean_unit, value=-1.0).div_(mean_norm)
    coef = layout.both_weight * -factor  # -w_i · factor, 0 off sequences with both modalities
    direct = (coef * between.index_select(-1, group))[..., None].div_(norm)  # -w_i γ / |s_i| · factor
    grad = minus_v.index_select(-2, group).mul_(coef[:, None])
    grad.addcmul_(direct, centre).addcmul_(direct * cos[..., None], unit, value=-1.0)
    return alignment, grad


def response_gradient(
    responses: torch.Tensor, layout: TokenLayout, lambda_msd: float, lambda_ma: float
) -> tuple[torch.Tensor, ConstraintTerms]:
    """`∂(λ1 (L_TS + L_OS) + λ2 L_MA) / ∂responses` (`tokens x 3r`, fp32) and the detached terms.

    The full-width form of [`constraint_gradient`] (which IMoD's injection uses), for inspection and tests.
    """
    responses = responses.detach().float()
    r = responses.shape[-1] // 3
    n = max(layout.num_sequences, 1)
    step = constraint_gradient(responses, layout, lambda_msd, lambda_ma)
    text = layout.text_rows
    shared = step.shared if step.shared is not None else responses.new_zeros(responses.shape[0], r)
    grad = torch.cat([step.exclusive * text, step.exclusive * (1 - text), shared], dim=1)
    text_specific = layout.text_weight @ responses[:, :r].square().sum(1) / (r * n)
    non_text_specific = layout.non_text_weight @ responses[:, r : 2 * r].square().sum(1) / (r * n)
    return grad, ConstraintTerms(text_specific, non_text_specific, step.alignment)
