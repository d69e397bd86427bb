"""Gradient injection: `λ1 ∇_A (L_TS + L_OS) + λ2 ∇_A L_MA` lands on each LoRA `A` in the task's own backward.

The mechanism, for one micro-batch (armed by [`IMoDInjector.arm`] before the forward, disarmed by
[`IMoDInjector.disarm`] after the backward):

1. While armed, each constrained layer's `lora_A` runs [`ZonedLoraA`] instead of `F.linear`. Its forward
   reads the input `X` once for the zone responses `Z = X @ [A⊙M_o; A⊙M_t; A⊙M_s]ᵀ` the constraints are made
   of; since the zones cover `A` once, the sum of the three `r`-column blocks is LoRA's `A x`, returned as
   usual. `Z` is handed to the injector, which keeps it until the backward needs the constraint gradient.
2. The first constrained layer whose backward runs (the last one of the forward) has the injector compute, in fp32,
   the constraint values and their gradient w.r.t. the responses `∂C/∂Z` of *every* layer handed in so far, in
   one batch (layers stacked, in chunks of at most [`BATCH_ELEMENTS`] response elements; scaled for gradient
   accumulation; [`~.constraints.constraint_gradient`], in closed form: a fixed few tensor operations for all
   the layers of a chunk, no autograd graph, no loop, no host-device synchronisation). On a short batch the
   constraint's cost is its operations' fixed overhead, paid once per chunk instead of once per layer.
3. Each layer's backward gets LoRA's `∂L/∂u` and reads `X` once for `[∂L/∂u + ∂C/∂Z_k]_kᵀ X` (`3r` rows); each
   `r`-row block masked by its zone `M_k` and the blocks summed give `∇A` of the task plus that of the
   constraints. `A` receives the sum through its `AccumulateGrad`, so DDP all-reduces it in the same buckets as the task gradient, before
   gradient clipping; `∂L/∂X = ∂L/∂u · A` as in plain LoRA (the constraints treat `X` as a constant), so `B`,
   the base model and earlier layers get the task gradient only. The loss is never touched: what is logged is the
   task loss.

What a layer does not recompute: the token layout and the per-token / per-sequence weights of the micro-batch
([`~.tokens.TokenLayout`], built once in [`IMoDInjector.arm`]'s caller and shared by all layers), the zone
masks (built once per layer and device), and the metric sums (one row per layer of a tensor, added up at
[`IMoDInjector.disarm`]). Arming replaces the instance `forward` of each constrained `lora_A` for the
micro-batch; [`IMoDInjector.armed`] (and `MMSFTTrainer.training_step`) undo it however the step ends.

Plain LoRA reads `X` three times per layer (`A x`, `∇A`, `∂L/∂X`); IMoD adds no read, only `2r` more
columns to two skinny products (`8·N·d_in·r` FLOPs) and `O(tokens · r)` for the constraints. A separate constraint product would add
two reads of `X`, which on a memory-bound CPU costs about as much as LoRA itself.

Which call counts: the first call per layer and micro-batch *with autograd recording*. That is the forward under
non-reentrant activation checkpointing (its recomputation in the backward runs the same products, keeping the saved
tensors identical, but computes no constraint and its node is not the one the backward uses), the recomputation under
reentrant checkpointing (whose first forward runs without autograd), and never the extra no-grad forward some TRL
loss paths run. Because the constraint gradient is kept on the node of the call that counted, nothing is counted
twice. What stays in memory until the backward: `Z` in `tokens x 3r` fp32 per layer, then `∂C/∂Z` in
`tokens x 2r` (see [`ZonedLoraA`]); the input `X` itself, `tokens x d`, is kept by autograd for LoRA
anyway.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F

from ..model.adapters import LoraAdapter
from .constraints import ResponseGradient, constraint_gradient, zone_masks
from .dominance import lora_linear_modules
from .masks import IMoDMasks
from .tokens import TokenLayout

BATCH_ELEMENTS = 1 << 22
"""Most response elements (`layers x tokens x 3r`) whose constraint gradient is computed in one batch: bounds the
temporaries of the batched computation (about ten `layers x tokens x r` fp32 tensors) at ~60 MiB."""


class ZonedLoraA(torch.autograd.Function):
    """`u = x Aᵀ` computed through the zone responses, whose backward adds a precomputed constraint gradient to `∇A`.

    `forward(x, weight, masks, step)`: `masks` is [`~.constraints.zone_masks`] of `A` (`3 x r x d`
    fp32 0/1); `step` is `None` (no constraint: the task gradient only) or a callable that receives the zone
    responses `Z = X [A⊙M_o; A⊙M_t; A⊙M_s]ᵀ` (`tokens x 3r` fp32) and returns `(∂C/∂Z as a ResponseGradient,
    text_rows)`, with `text_rows` the `tokens x 1` float indicator of text tokens; or a callable without
    arguments that the backward calls for `∂C/∂Z` in full width (`tokens x 3r` fp32, which the backward may
    overwrite): the injector's way, which computes all layers' gradients together, already laid out.

    Since the zones cover `A` once, `A x = Σ_k (A⊙M_k) x`: the forward reads `X` once for `Z` (`3r`
    columns, `2r` more than LoRA's) and sums its blocks for `u`. Likewise `∇A = Σ_k M_k ⊙ ((∂L/∂u + ∂C/∂Z_k)ᵀ X)`:
    the backward reads `X` once for a `3r`-row product (`2r` more than LoRA's). Every call computes `u` the
    same way, so a recomputation under activation checkpointing reproduces the forward's values exactly.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, masks: torch.Tensor, step: Any) -> torch.Tensor:
        r, d = weight.shape
        # F.linear's output dtype: the autocast dtype when autocast is on, else the input's.
        device_type = x.device.type
        autocast = torch.is_autocast_enabled(device_type)
        out_dtype = torch.get_autocast_dtype(device_type) if autocast else x.dtype
        with torch.autocast(device_type=device_type, enabled=False) if autocast else nullcontext():
            zoned = (weight.float() * masks).view(3 * r, d)  # [A⊙M_o; A⊙M_t; A⊙M_s]
            responses = x.reshape(-1, d).float() @ zoned.T  # Z, one read of X
            u = responses.view(-1, 3, r).sum(1)
            ctx.response_grad = step(responses) if step is not None else None
        ctx.save_for_backward(x, weight, masks)
        return u.to(out_dtype).reshape(*x.shape[:-1], r)

    @staticmethod
    def backward(ctx: Any, grad_u: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        x, weight, masks = ctx.saved_tensors
        r, d = weight.shape
        grad_u = grad_u.reshape(-1, r).float()
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_u @ weight.float()).to(x.dtype).reshape(x.shape)
        if ctx.needs_input_grad[1]:
            response = ctx.response_grad
            if response is None:
                grad_weight = (grad_u.T @ x.reshape(-1, d).float()).to(weight.dtype)
            else:
                left = response() if callable(response) else _full_width(*response)  # ∂C/∂Z, tokens x 3r
                left.view(-1, 3, r).add_(grad_u[:, None])  # ∂L/∂u + ∂C/∂Z_k per zone block
                products = left.T @ x.reshape(-1, d).float()  # one read of X for task and constraint
                grad_weight = products.view(3, r, d).mul_(masks).sum(0).to(weight.dtype)
        ctx.response_grad = None
        return grad_x, grad_weight, None, None


def _full_width(gradient: ResponseGradient, text_rows: torch.Tensor) -> torch.Tensor:
    """`∂C/∂Z` as `tokens x 3r` (blocks `M_o, M_t, M_s`) from its compact form; the exclusive block is consumed.

    `∂C/∂(A⊙M_o)x` lives on text tokens, `∂C/∂(A⊙M_t)x` on the others. Works on stacked layers too
    (`layers x tokens x r` in, `layers x tokens x 3r` out).
    """
    exclusive = gradient.exclusive
    on_text = exclusive * text_rows
    shared = gradient.shared if gradient.shared is not None else torch.zeros_like(exclusive)
    return torch.cat([on_text, exclusive.sub_(on_text), shared], dim=-1)


class IMoDInjector:
    """IMoD's constraint gradients for a set of LoRA layers of the language model.

    Args:
        adapters: The constrained adapters (LoRA `Linear` layers whose input is the token sequence).
        masks: Their masks ([`~mm_trainer.imod.masks.IMoDMasks`], one per adapter by name).
        lambda_msd: `λ1`, weight of the MSDC gradient.
        lambda_ma: `λ2`, weight of the MAAC gradient.

    Attributes:
        micro_steps: Micro-batches seen.
        micro_steps_with_non_text: Of those, how many held a non-text token.
        aligned_layers: Names of layers whose input lined up with `input_ids` at least once.
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
        self._zone_masks: dict[int, torch.Tensor] = {}
        self._layout: TokenLayout | None = None
        self._scale = 1.0
        self._counted: set[int] = set()
        self._armed = False
        self._pending: dict[int, tuple[torch.Tensor, TokenLayout]] = {}  # responses waiting for the backward
        self._ready: dict[int, torch.Tensor] = {}  # ∂C/∂Z computed, not yet taken by the layer's backward
        self._terms: torch.Tensor | None = None  # per layer of the micro-batch: [L_TS + L_OS, L_MA]
        self._metric_sums: torch.Tensor | None = None  # [Σ msd, #msd, Σ ma, #ma]
        self.micro_steps = 0
        self.micro_steps_with_non_text = 0
        self.aligned_layers: set[str] = set()
        self.misaligned_layers: set[str] = set()

    # ---------------------------------------------------------------------------------------------------------------
    def arm(self, layout: TokenLayout, scale: float) -> None:
        """Start a micro-batch with token `layout`; its constraint gradients are multiplied by `scale`.

        Replaces the `forward` of every constrained `lora_A` (an instance attribute) until [`disarm`]; if
        that fails half-way, the modules already replaced are restored before the error propagates. Prefer
        [`armed`], which disarms however the forward and backward end.
        """
        self.disarm()
        for index, module in enumerate(self._lora_a):
            if "forward" in module.__dict__:
                raise RuntimeError(
                    f"IMoD cannot run on {self.adapters[index].name}: its lora_A forward is already replaced (e.g. "
                    "by an offloading hook). Train without CPU/disk offloading of the LoRA layers, or with imod=False."
                )
        self._layout = layout
        self._scale = float(scale)
        self._counted = set()
        self._pending, self._ready = {}, {}
        self._terms = None
        self.micro_steps += 1
        self.micro_steps_with_non_text += int(layout.has_non_text)
        self._armed = True
        try:
            for index, module in enumerate(self._lora_a):
                module.forward = self._zoned_forward(index)
        except BaseException:
            self.disarm()
            raise

    def disarm(self) -> None:
        """End the micro-batch (after its backward): `lora_A` runs `F.linear` again. Safe to call repeatedly."""
        if not self._armed:
            return
        for module in self._lora_a:
            module.__dict__.pop("forward", None)
        self._armed = False
        self._compute_pending()  # layers whose backward never ran (an aborted step): their metrics still count
        self._record()
        self._layout = None
        self._ready = {}

    @contextmanager
    def armed(self, layout: TokenLayout, scale: float) -> Iterator[IMoDInjector]:
        """`with injector.armed(layout, scale): forward and backward` — disarmed on exit, also on an exception."""
        self.arm(layout, scale)
        try:
            yield self
        finally:
            self.disarm()

    def _zoned_forward(self, index: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def forward(x: torch.Tensor) -> torch.Tensor:
            return self._forward(index, x)

        return forward

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
            layout = layout.to(x.device)

            def step(responses: torch.Tensor) -> Callable[[], torch.Tensor]:
                self._pending[index] = (responses, layout)
                return lambda: self._take(index)

        return ZonedLoraA.apply(x, module.weight, self._masks_of(index, module.weight.device), step)

    def _take(self, index: int) -> torch.Tensor:
        """Layer `index`'s `∂C/∂Z` (`tokens x 3r`), for its backward: computed with every layer still pending."""
        if index not in self._ready:
            self._compute_pending()
        return self._ready.pop(index)

    def _compute_pending(self) -> None:
        """Constraint gradients of every pending layer, layers with the same response shape and device stacked."""
        pending, self._pending = self._pending, {}
        groups: dict[tuple[torch.Size, torch.device], list[int]] = {}
        for index, (responses, _) in pending.items():
            groups.setdefault((responses.shape, responses.device), []).append(index)
        for (shape, _), indices in groups.items():
            per_chunk = max(1, BATCH_ELEMENTS // max(shape.numel(), 1))
            for start in range(0, len(indices), per_chunk):
                chunk = indices[start : start + per_chunk]
                layout = pending[chunk[0]][1]
                stacked = torch.stack([pending[i][0] for i in chunk])
                for i in chunk:
                    pending[i] = None  # type: ignore[assignment]  # let each response go once stacked
                grad = constraint_gradient(stacked, layout, self.lambda_msd, self.lambda_ma, self._scale)
                del stacked
                if self._terms is None:
                    self._terms = grad.decoupling.new_zeros(len(self._lora_a), 2)
                terms = torch.stack([grad.decoupling, grad.alignment], dim=1).to(self._terms.device)
                self._terms.index_copy_(0, torch.tensor(chunk, device=self._terms.device), terms)
                full = _full_width(grad, layout.text_rows)  # laid out once for the chunk, not once per layer
                for row, i in enumerate(chunk):
                    self._ready[i] = full[row]

    def _masks_of(self, index: int, device: torch.device) -> torch.Tensor:
        masks = self._zone_masks.get(index)
        if masks is None or masks.device != device:
            masks = zone_masks(self.masks.by_name[self.adapters[index].name].zone.to(device))
            self._zone_masks[index] = masks
        return masks

    def _record(self) -> None:
        """Add the micro-batch's per-layer terms to the running metric sums (a few tensor ops, no synchronisation)."""
        terms, self._terms = self._terms, None
        layout = self._layout
        if terms is None or layout is None or not self._counted:
            return
        if self._metric_sums is None:
            self._metric_sums = torch.zeros(4, dtype=torch.float64, device=terms.device)
        sums = self._metric_sums
        layers = len(self._counted)
        both = layout.sequences_with_both
        totals = terms.to(sums.device, torch.float64).sum(0)
        sums[0] += totals[0]
        sums[1] += layers
        if both:  # L_MA is logged as its mean over the sequences that hold both modalities
            sums[2] += totals[1] * (layout.num_sequences / both)
            sums[3] += layers

    # ---------------------------------------------------------------------------------------------------------------
    def pop_metrics(self, device: torch.device) -> torch.Tensor:
        """`[Σ msd, #msd, Σ ma, #ma]` since the last call (fp64 on `device`), then reset."""
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
