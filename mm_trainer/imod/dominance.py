r"""Non-Text Dominance Rate: the share of LoRA parameters whose Fisher information from non-text tokens is larger.

`R = |{(i, j) : F_non_text[i, j] > F_text[i, j]}| / |W|` over the elements of every watched `A` and `B`.

Choices where the paper is silent:

- **Per-modality Fisher.** The gradient of the task loss w.r.t. a LoRA weight is a sum over token positions of the
  layer: `∇B = Σ_i (∂L/∂z_i) u_iᵀ` and `∇A = Σ_i (Bᵀ ∂L/∂z_i) x_iᵀ` (`x_i` the input of `lora_A`, `u_i = A x_i`,
  `z_i` the output of `lora_B`). The modality of a position attributes its term to text or non-text. The Fisher
  is the empirical one, `F_m = Σ_sequences (Σ_{i ∈ sequence, i ∈ m} term_i)²`: squared per-sequence gradients,
  summed over the sequences of every micro-batch of the measured optimizer step and over DDP ranks.
- **No extra backward, no weight read.** `x_i` and `u_i` are taken by a forward hook on `lora_A`, `∂L/∂z_i`
  and `∂L/∂u_i` by tensor hooks on the outputs of `lora_B` and `lora_A` during the ordinary backward, on
  measured steps only (other steps run no hook). `∂L/∂u_i` comes from autograd, so `B` itself is never read: the
  rate is the same whether the engine holds `B` whole (DDP), as a shard (FSDP2) or as an empty ZeRO-3 partition
  outside its module's backward. On measured steps the inputs of the watched layers are held until the backward,
  which with gradient checkpointing is memory the checkpoint would otherwise free.
- **Task gradient only.** The IMoD constraint gradient reaches `A` directly, not through `z`, so it is not part of
  the Fisher: the rate says which modality drives the *task* gradient.
- **Which parameters.** LoRA `Linear` layers of the language model whose input lines up with `input_ids` (the
  layers IMoD constrains). Adapters on the vision / audio tower see only non-text positions and would count as
  non-text-dominated by construction, so they are left out.
- **When.** Optimizer steps 1 and every `dominance_steps`-th step, one step's batch each (a noisy estimate).
  Elements whose Fisher is 0 for both modalities (`A` at step 1, while `B` is still zero) count as not dominated
  by non-text, as the strict `>` of the definition says.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..model.adapters import LoraAdapter
from .tokens import TokenLayout


def lora_linear_modules(adapter: LoraAdapter) -> tuple[torch.nn.Linear, torch.nn.Linear] | None:
    """`(lora_A, lora_B)` `nn.Linear` submodules of an adapter (`None` for embedding / conv LoRA)."""
    lora_a = getattr(adapter.module, "lora_A", None)
    lora_b = getattr(adapter.module, "lora_B", None)
    if not isinstance(lora_a, torch.nn.ModuleDict):
        return None
    for key, module in lora_a.items():
        if getattr(module, "weight", None) is adapter.lora_A:
            pair = module, lora_b[key]
            if all(isinstance(m, torch.nn.Linear) for m in pair):
                return pair
    return None


class DominanceTracker:
    """Per-modality Fisher of the watched adapters on measured steps, and the dominance rate from it.

    Args:
        adapters: Adapters to watch (LoRA `Linear` layers of the language model).

    Attributes:
        history: Per measured step: `step`, `non_text_rate` (overall), `A` / `B` (rates over the A / B
            elements only), `fisher_text` / `fisher_non_text` (total Fisher mass of each modality).
        first: Per-layer rates of the first measured step (`{"step", "per_layer"}`).
        latest: Per-layer rates of the latest measured step.
    """

    def __init__(self, adapters: Sequence[LoraAdapter]) -> None:
        self.adapters = list(adapters)
        self._modules = [lora_linear_modules(a) for a in self.adapters]
        if any(m is None for m in self._modules):
            raise ValueError("DominanceTracker watches LoRA Linear layers only.")
        self.history: list[dict[str, Any]] = []
        self.first: dict[str, Any] | None = None
        self.latest: dict[str, Any] | None = None
        self.pending: float | None = None
        self._hooks: list[Any] = []
        self._grad_z: dict[int, torch.Tensor] = {}
        self._fisher: list[list[torch.Tensor]] | None = None  # per adapter: [F_text_A, F_non_A, F_text_B, F_non_B]

    # ---------------------------------------------------------------------------------------------------------------
    def arm(self, layout: TokenLayout) -> None:
        """Watch the forward and backward of one micro-batch of a measured step."""
        self.disarm()
        if self._fisher is None:
            # Shapes from the modules: a sharded weight's own shape may be a shard's or empty (ZeRO-3).
            self._fisher = []
            for lora_a, lora_b in self._modules:
                shape_a = (lora_a.out_features, lora_a.in_features)
                shape_b = (lora_b.out_features, lora_b.in_features)
                device = lora_a.weight.device
                self._fisher.append(
                    [
                        torch.zeros(shape, dtype=torch.float32, device=device)
                        for shape in (shape_a, shape_a, shape_b, shape_b)
                    ]
                )
        for i, (lora_a, lora_b) in enumerate(self._modules):
            self._hooks.append(
                lora_a.register_forward_hook(lambda m, args, out, _i=i: self._on_a(_i, args, out, layout))
            )
            self._hooks.append(lora_b.register_forward_hook(lambda m, args, out, _i=i: self._on_b(_i, out)))

    def disarm(self) -> None:
        """Remove the hooks (call after the backward of the micro-batch)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        self._grad_z.clear()

    def fisher_sums(self) -> dict[str, tuple[torch.Tensor, ...]]:
        """The sums of the step being measured, per adapter: `(F_text_A, F_non_text_A, F_text_B, F_non_text_B)`.

        Local to this rank (the DDP sum happens in [`finish_step`]); empty when no step is being measured.
        """
        if self._fisher is None:
            return {}
        return {a.name: tuple(f) for a, f in zip(self.adapters, self._fisher)}

    @property
    def measuring(self) -> bool:
        """Whether Fisher sums of a step are being collected."""
        return self._fisher is not None

    def _on_a(self, index: int, args: tuple, output: Any, layout: TokenLayout) -> None:
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or not layout.aligned(x):
            return
        if not isinstance(output, torch.Tensor) or not output.requires_grad:
            return  # no backward will come through this call (no_grad, or the first pass of reentrant checkpointing)
        x, u = x.detach(), output.detach()
        output.register_hook(lambda grad_u: self._accumulate(index, x, u, grad_u, layout))

    def _on_b(self, index: int, output: Any) -> None:
        if isinstance(output, torch.Tensor) and output.requires_grad:
            # Runs before the hook on u of the same layer: ∂L/∂z is needed to compute ∂L/∂u.
            output.register_hook(lambda grad_z: self._grad_z.__setitem__(index, grad_z.detach()))

    @torch.no_grad()
    def _accumulate(
        self, index: int, x: torch.Tensor, u: torch.Tensor, grad_u: torch.Tensor, layout: TokenLayout
    ) -> None:
        grad_z = self._grad_z.pop(index, None)
        if self._fisher is None or grad_z is None:
            return
        f_text_a, f_non_a, f_text_b, f_non_b = self._fisher[index]
        x = x.reshape(-1, x.shape[-1]).float()
        u = u.reshape(-1, u.shape[-1]).float()
        grad_u = grad_u.reshape(-1, grad_u.shape[-1]).float()  # ∂L/∂u_i = Bᵀ ∂L/∂z_i, from autograd
        grad_z = grad_z.reshape(-1, grad_z.shape[-1]).float()
        for text_pos, non_pos in layout.to(x.device).sequence_positions():
            for pos, f_a, f_b in ((text_pos, f_text_a, f_text_b), (non_pos, f_non_a, f_non_b)):
                if pos.numel() == 0:
                    continue
                f_a += (grad_u[pos].T @ x[pos]).square_()
                f_b += (grad_z[pos].T @ u[pos]).square_()

    # ---------------------------------------------------------------------------------------------------------------
    def finish_step(self, step: int, reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None) -> float | None:
        """Close a measured step: sum the Fisher over ranks, compute and record the rates, free the sums.

        Args:
            step: The optimizer step just measured.
            reduce_sum: Sums a tensor over DDP ranks (every rank must call this on the same steps).

        Returns:
            The overall Non-Text Dominance Rate (`None` when no step was being measured).
        """
        self.disarm()
        fisher, self._fisher = self._fisher, None
        if fisher is None:
            return None
        flat_parts = [f.flatten() for layer in fisher for f in layer]
        device = flat_parts[0].device
        flat = torch.cat([p.to(device) for p in flat_parts])
        if reduce_sum is not None:
            flat = reduce_sum(flat)
        per_layer: dict[str, float] = {}
        dominated = {"A": 0, "B": 0}
        total = {"A": 0, "B": 0}
        mass = [0.0, 0.0]  # total Fisher of text, non-text
        offset = 0
        for adapter, layer in zip(self.adapters, fisher):
            sizes = [f.numel() for f in layer]
            f_text_a, f_non_a, f_text_b, f_non_b = torch.split(flat[offset : offset + sum(sizes)], sizes)
            offset += sum(sizes)
            mass[0] += float(f_text_a.sum() + f_text_b.sum())
            mass[1] += float(f_non_a.sum() + f_non_b.sum())
            dom_a = int((f_non_a > f_text_a).sum())
            dom_b = int((f_non_b > f_text_b).sum())
            dominated["A"] += dom_a
            dominated["B"] += dom_b
            total["A"] += sizes[0]
            total["B"] += sizes[2]
            per_layer[adapter.name] = (dom_a + dom_b) / (sizes[0] + sizes[2])
        rate = (dominated["A"] + dominated["B"]) / max(total["A"] + total["B"], 1)
        self.history.append(
            {
                "step": int(step),
                "non_text_rate": rate,
                "A": dominated["A"] / max(total["A"], 1),
                "B": dominated["B"] / max(total["B"], 1),
                "fisher_text": mass[0],
                "fisher_non_text": mass[1],
            }
        )
        record = {"step": int(step), "non_text_rate": rate, "per_layer": per_layer}
        if self.first is None:
            self.first = record
        self.latest = record
        self.pending = rate
        return rate

    def pop_pending(self) -> float | None:
        """The rate measured since the last call, if any (for the log)."""
        rate, self.pending = self.pending, None
        return rate

    # ---------------------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything measured so far (JSON-ready)."""
        return {"history": self.history, "first": self.first, "latest": self.latest}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore [`state_dict`]."""
        self.history = list(state.get("history") or [])
        self.first = state.get("first")
        self.latest = state.get("latest")
