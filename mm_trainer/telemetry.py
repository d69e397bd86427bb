"""Per-tower gradient telemetry of the LoRA adapters, logged through the Trainer's ``log``."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch

from .adapters import LoraAdapter
from .sharding import full_numel, full_shape, is_dtensor, local_tensor


class TowerTelemetry:
    """Gradient norm per tower and the fraction of adapters with a non-zero gradient, step by step.

    Call :meth:`collect` once per optimizer step, after the gradients of the step are complete (accumulated and, under
    DDP, reduced) and before they are clipped or zeroed. :meth:`flush` returns the means since the last flush, ready
    for ``Trainer.log``, and appends them to :attr:`history`.

    The cost is one norm per adapter weight and one device-to-host copy per step; with sharded gradients (FSDP2) one
    all-reduce of one number per adapter, with captured ones (DeepSpeed, see :meth:`bind`) one all-reduce of the
    adapters' gradients. Every rank ends with the same numbers.

    Args:
        adapters: The adapters to watch.
    """

    def __init__(self, adapters: list[LoraAdapter]) -> None:
        self.adapters = adapters
        self.towers = sorted({a.tower for a in adapters})
        self._tower_index = torch.tensor([self.towers.index(a.tower) for a in adapters], dtype=torch.long)
        self._counts = torch.bincount(self._tower_index, minlength=len(self.towers)).double()
        self.nonzero_steps: dict[str, int] = dict.fromkeys((a.name for a in adapters), 0)
        self.fired: set[str] = set()
        self.history: list[dict[str, Any]] = []
        self._pending: dict[str, list[float]] = defaultdict(list)
        self._hooks: list[Any] = []
        self._grad_hooks: list[Any] = []
        self._captured: list[torch.Tensor] | None = None
        self._captured_flat = torch.zeros(0)
        self._sizes: list[int] = []
        self._reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._world_size = 1
        self.steps_collected = 0

    def bind(
        self,
        adapters: list[LoraAdapter],
        reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
        capture_gradients: bool = False,
        world_size: int = 1,
    ) -> None:
        """Watch ``adapters`` from now on: the same modules, by name and order, whose parameters the engine may have
        replaced (``accelerator.prepare`` under FSDP2). Counters and history carry over.

        Args:
            adapters: The adapters of the prepared model.
            reduce_sum: Sums a tensor over the ranks (every rank calls it at the same steps). Needed when gradients
                are sharded (FSDP2: each rank sums the squares of its shards, one all-reduce of one number per
                adapter per step) or captured (``capture_gradients``).
            capture_gradients: Read each micro-batch's gradient with a hook on A and B as autograd delivers it, and
                average the step's sum over the ranks at :meth:`collect` (one all-reduce of the adapters' gradients
                per step). For engines whose optimizer step runs inside ``accelerator.backward`` and that keep the
                reduced gradients in their own buffers (DeepSpeed): ``p.grad`` is gone when :meth:`collect` runs.
            world_size: Number of ranks the captured gradients are averaged over (as DDP and DeepSpeed average).

        Raises:
            ValueError: ``adapters`` are not the watched ones, or ``capture_gradients`` without ``reduce_sum`` on
                several ranks.
        """
        if [a.name for a in adapters] != [a.name for a in self.adapters]:
            raise ValueError("TowerTelemetry.bind takes the same adapters (names, order) it was built with.")
        if capture_gradients and world_size > 1 and reduce_sum is None:
            raise ValueError("capture_gradients on several ranks needs `reduce_sum` to average the gradients.")
        self.adapters = list(adapters)
        self._reduce_sum = reduce_sum
        self._world_size = world_size
        for handle in self._grad_hooks:
            handle.remove()
        self._grad_hooks.clear()
        self._captured = None
        if capture_gradients:
            params = [p for a in self.adapters for p in (a.lora_A, a.lora_B)]
            # One flat fp32 buffer of the whole weights (a ZeRO-3 partition's own shape is empty), the same on
            # every rank, with one view per weight: a micro-batch's gradient is added to its view by the hook.
            self._sizes = [full_numel(p) for p in params]
            self._captured_flat = torch.zeros(sum(self._sizes), dtype=torch.float32, device=params[0].device)
            views = torch.split(self._captured_flat, self._sizes)
            self._captured = [v.view(full_shape(p)) for v, p in zip(views, params)]
            for view, p in zip(self._captured, params):
                self._grad_hooks.append(p.register_hook(_adder(view)))

    # ---------------------------------------------------------------------------------------------------------------
    def watch_forward(self) -> None:
        """Record which adapted modules run a training forward (one with autograd on: evaluation and generation run
        under ``no_grad`` and do not count). Each hook removes itself after its module's first such forward."""
        for adapter in self.adapters:
            if adapter.name in self.fired:
                continue
            holder: list[Any] = []

            def hook(module, args, output, _name=adapter.name, _holder=holder):
                if not torch.is_grad_enabled():
                    return
                self.fired.add(_name)
                if _holder:
                    _holder[0].remove()

            holder.append(adapter.module.register_forward_hook(hook))
            self._hooks.append(holder[0])

    def remove_hooks(self) -> None:
        """Detach every forward hook still in place."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    # ---------------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def collect(self) -> None:
        """Measure the gradients of the optimizer step of every adapter (call once per optimizer step, on every rank,
        after the step's gradients are complete and before they are clipped: after ``accelerator.backward`` of the
        step's last micro-batch)."""
        if not self.adapters:
            return
        sq = self._squared_norms()
        nonzero = sq > 0
        tower_sq = torch.zeros(len(self.towers), dtype=torch.float64).index_add_(0, self._tower_index, sq)
        tower_active = torch.zeros(len(self.towers), dtype=torch.float64).index_add_(
            0, self._tower_index, nonzero.double()
        )
        for i in nonzero.nonzero().flatten().tolist():
            self.nonzero_steps[self.adapters[i].name] += 1
        for t, tower in enumerate(self.towers):
            self._pending[f"grad_norm/{tower}"].append(math.sqrt(float(tower_sq[t])))
            self._pending[f"active_adapters/{tower}"].append(float(tower_active[t] / self._counts[t]))
        self.steps_collected += 1

    def _squared_norms(self) -> torch.Tensor:
        """Squared norm of each adapter's step gradient (A and B together), float64 on the host, equal on all ranks."""
        n = len(self.adapters)
        if self._captured is not None:
            return self._captured_squared_norms()
        # FSDP2: each rank holds a shard of every gradient and the squares add up over the ranks. Decided from the
        # parameters, the same on every rank, so that every rank joins the all-reduce.
        summed = self._reduce_sum is not None and any(
            is_dtensor(p) for a in self.adapters for p in (a.lora_A, a.lora_B)
        )
        grads: list[torch.Tensor] = []
        owners: list[int] = []
        weights: list[float] = []
        for i, adapter in enumerate(self.adapters):
            for p in (adapter.lora_A, adapter.lora_B):
                if p.grad is not None:
                    grads.append(local_tensor(p.grad))
                    owners.append(i)
                    # Under the sum over ranks, count an element held by several ranks once.
                    weights.append(_replica_weight(p.grad, self._world_size) if summed else 1.0)
        sq = torch.zeros(n, dtype=torch.float64)
        if grads:
            norms = [torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads]
            per_param = _to_host(norms).double() ** 2 * torch.tensor(weights, dtype=torch.float64)
            sq.index_add_(0, torch.tensor(owners, dtype=torch.long), per_param)
        if summed:
            sq = self._reduce_sum(sq).cpu()
        return sq

    def _captured_squared_norms(self) -> torch.Tensor:
        """The captured step gradients summed over the ranks and averaged, as DDP's ``p.grad``; then zeroed."""
        flat = self._captured_flat
        if self._reduce_sum is not None:
            flat = self._reduce_sum(flat) / self._world_size
        norms = [torch.linalg.vector_norm(part, dtype=torch.float32) for part in torch.split(flat, self._sizes)]
        per_param = _to_host(norms).double() ** 2
        self._captured_flat.zero_()
        sq = torch.zeros(len(self.adapters), dtype=torch.float64)
        return sq.index_add_(0, torch.arange(len(self.adapters)).repeat_interleave(2), per_param)

    def flush(self, step: int) -> dict[str, float]:
        """Means since the last flush (``grad_norm/<tower>``, ``active_adapters/<tower>``); recorded in history."""
        if not self._pending:
            return {}
        metrics = {key: sum(vals) / len(vals) for key, vals in self._pending.items()}
        self._pending.clear()
        self.history.append({"step": int(step), **metrics})
        return metrics

    # ---------------------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps to resume the telemetry."""
        return {
            "history": self.history,
            "nonzero_steps": self.nonzero_steps,
            "fired": sorted(self.fired),
            "steps_collected": self.steps_collected,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (adapters are matched by name)."""
        self.history = list(state.get("history", []))
        for name, count in state.get("nonzero_steps", {}).items():
            if name in self.nonzero_steps:
                self.nonzero_steps[name] = int(count)
        self.fired |= set(state.get("fired", [])) & set(self.nonzero_steps)
        self.steps_collected = int(state.get("steps_collected", 0))


def _adder(view: torch.Tensor) -> Callable[[torch.Tensor], None]:
    """A tensor hook that adds the gradient it is given to ``view`` and leaves the gradient as it is."""

    def hook(grad: torch.Tensor) -> None:
        view.add_(grad.detach())

    return hook


def _replica_weight(grad: torch.Tensor, world_size: int) -> float:
    """``1 / copies`` of a gradient whose squares are summed over all ranks: a ``DTensor`` counts its ``Replicate``
    mesh dimensions (HSDP), a plain tensor is held whole by every rank."""
    if not is_dtensor(grad):
        return 1.0 / world_size
    copies = 1
    for dim, placement in enumerate(grad.placements):
        if placement.is_replicate():
            copies *= grad.device_mesh.size(dim)
    return 1.0 / copies


def _to_host(values: list[torch.Tensor]) -> torch.Tensor:
    """Stack scalars that may live on several devices (``device_map``) with one copy to the host per device."""
    by_device: dict[torch.device, list[int]] = defaultdict(list)
    for i, v in enumerate(values):
        by_device[v.device].append(i)
    out = torch.empty(len(values), dtype=torch.float32)
    for idx in by_device.values():
        out[torch.tensor(idx)] = torch.stack([values[i] for i in idx]).to("cpu")
    return out
