"""Per-tower gradient telemetry of the LoRA adapters, logged through the Trainer's `log`."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch

from ..distributed.sharding import full_numel, full_shape, is_dtensor, local_tensor
from ..model.adapters import LoraAdapter


class TowerTelemetry:
    """Gradient norm per tower and the fraction of adapters with a non-zero gradient, step by step.

    Call [`collect`] once per optimizer step, after the gradients of the step are complete (accumulated and, under
    DDP, reduced) and before they are clipped or zeroed. [`flush`] returns the metrics of the logging window
    (gradient norm of its last step, mean share of active adapters), ready for `Trainer.log`, and appends them to
    [`history`].

    The cost is one norm per adapter weight and one device-to-host copy per step, and no collective per step: on
    several ranks one all-reduce per log ([`flush`]) or save ([`synchronize`]) makes every rank agree on what
    fired and, for the steps since the last one, what was non-zero and the norms: with sharded gradients (FSDP2) it
    carries each step's per-adapter sums of squared shards, with captured ones (DeepSpeed, see [`bind`]) each
    step's non-zero flags and, at a log, the last step's adapter gradients.

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
        # Capture mode: the step (generation) each view last received a gradient in, -1 when it holds zeros; the
        # buffer holds exactly the last collected step's local gradient while `_last_step_kept` is True. The local
        # non-zero flags (capture mode) or squared shard norms (FSDP2) of the steps collected since the last
        # synchronisation wait in `_unsynced`, one row per step.
        self._view_step: list[int] = []
        self._generation = 0
        self._last_step_kept = False
        self._unsynced: list[torch.Tensor] = []
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
        """Watch `adapters` from now on: the same modules, by name and order, whose parameters the engine may have
        replaced (`accelerator.prepare` under FSDP2). Counters and history carry over.

        Args:
            adapters: The adapters of the prepared model.
            reduce_sum: Sums a tensor over the ranks (every rank calls it at the same points: [`flush`] and
                [`synchronize`]). With it, the ranks agree on what fired; needed when gradients are sharded
                (FSDP2: each rank sums the squares of its shards per step, added over the ranks once per log or save)
                or captured (`capture_gradients`).
            capture_gradients: Read each micro-batch's gradient with a hook on A and B as autograd delivers it and
                sum it over the step's micro-batches. [`collect`] keeps each step's local non-zero flags (an
                adapter is active when its gradient is non-zero on any rank) and the last step's gradient; the
                flags are reduced at [`synchronize`] and the gradient, averaged over the ranks, at [`flush`]
                (one all-reduce per log). For engines whose optimizer step runs inside `accelerator.backward` and
                that keep the reduced gradients in their own buffers (DeepSpeed): `p.grad` is gone when
                [`collect`] runs.
            world_size: Number of ranks the captured gradients are averaged over (as DDP and DeepSpeed average).

        Raises:
            ValueError: `adapters` are not the watched ones, or `capture_gradients` without `reduce_sum` on
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
            # every rank, with one view per weight: a micro-batch's gradient is added to its view by the hook. Its
            # last element tells at flush whether every rank still held the collected step.
            self._sizes = [full_numel(p) for p in params]
            self._captured_flat = torch.zeros(sum(self._sizes) + 1, dtype=torch.float32, device=params[0].device)
            views = torch.split(self._captured_flat[:-1], self._sizes)
            self._captured = [v.view(full_shape(p)) for v, p in zip(views, params)]
            self._view_step = [-1] * len(params)
            self._generation = 0
            self._last_step_kept = False
            self._unsynced = []
            for index, p in enumerate(params):
                self._grad_hooks.append(p.register_hook(self._capture_hook(index)))

    # ---------------------------------------------------------------------------------------------------------------
    def watch_forward(self) -> None:
        """Record which adapted modules run a training forward (one with autograd on: evaluation and generation run
        under `no_grad` and do not count). Each hook removes itself after its module's first such forward."""
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
        after the step's gradients are complete and before they are clipped: after `accelerator.backward` of the
        step's last micro-batch)."""
        if not self.adapters:
            return
        self.steps_collected += 1
        if self._captured is not None:
            # Local flags only; they are reduced with the rest at the next log or save (synchronize / flush).
            self._unsynced.append(self._captured_local_flags())
            return
        sq, summed = self._squared_norms()
        if summed:  # FSDP2: sums of squared shards, added over the ranks at the next log or save
            self._unsynced.append(sq)
            return
        self._count_step(sq)

    def _count_step(self, sq: torch.Tensor) -> None:
        """Record one optimizer step from the adapters' squared gradient norms (the same on every rank)."""
        for t, norm in enumerate(self._tower_norms(sq)):
            self._pending[f"grad_norm/{self.towers[t]}"].append(norm)
        self._count_active(sq > 0)

    def _count_active(self, nonzero: torch.Tensor) -> None:
        """Count one optimizer step's non-zero adapters (`nonzero`: bool per adapter, the same on every rank)."""
        tower_active = torch.zeros(len(self.towers), dtype=torch.float64).index_add_(
            0, self._tower_index, nonzero.double()
        )
        for i in nonzero.nonzero().flatten().tolist():
            self.nonzero_steps[self.adapters[i].name] += 1
        for t, tower in enumerate(self.towers):
            self._pending[f"active_adapters/{tower}"].append(float(tower_active[t] / self._counts[t]))

    def _tower_norms(self, sq: torch.Tensor) -> list[float]:
        """Gradient norm per tower from the adapters' squared norms."""
        tower_sq = torch.zeros(len(self.towers), dtype=torch.float64).index_add_(0, self._tower_index, sq)
        return [math.sqrt(float(v)) for v in tower_sq]

    def _squared_norms(self) -> tuple[torch.Tensor, bool]:
        """Squared norm of each adapter's step gradient (A and B together), float64 on the host, and whether it is
        this rank's share of a sum over the ranks (FSDP2's sharded gradients: the sum is taken at synchronisation)."""
        n = len(self.adapters)
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
        return sq, summed

    def _capture_hook(self, index: int) -> Callable[[torch.Tensor], None]:
        """A tensor hook adding each micro-batch's gradient of weight `index` to its view, leaving the gradient as is.

        The first gradient of a step overwrites what the view held (an earlier step's, kept for [`flush`]).
        """
        view = self._captured[index]

        def hook(grad: torch.Tensor) -> None:
            self._last_step_kept = False
            if self._view_step[index] == self._generation:
                view.add_(grad.detach())
            else:
                view.copy_(grad.detach())
                self._view_step[index] = self._generation

        return hook

    def _captured_local_flags(self) -> torch.Tensor:
        """Per adapter, 1.0 where this rank's captured gradient of the step is non-zero (fp32 on the host).

        Afterwards the buffer holds exactly this step's local gradient (views not reached this step are zeroed) until
        the next step's first hook: [`flush`] reduces it for the norms. Over the ranks an adapter is active when
        it is on any rank: a sum of non-zero gradients that cancels to exactly 0.0 in every element would count as
        non-zero here (and as zero under DDP).
        """
        for index, view in enumerate(self._captured):
            if self._view_step[index] not in (-1, self._generation):  # an earlier step's gradient: none this step
                view.zero_()
                self._view_step[index] = -1
        local = _adapter_squares(self._captured)
        self._generation += 1
        self._last_step_kept = True
        return (local > 0).float()

    def synchronize(self) -> None:
        """Make every rank agree on what fired and count the steps collected since the last call (their non-zero
        flags, and under FSDP2 their norms).

        A collective when a `reduce_sum` is bound (several ranks): call it on every rank at the same points (the
        trainer does at every training log and save, and after training). One all-reduce of one number per adapter
        and per unsynchronised step.
        """
        self._reduce_together(with_gradient=False)

    def _reduce_together(self, with_gradient: bool) -> torch.Tensor | None:
        """One all-reduce of the fired flags, the unsynchronised steps' rows (non-zero flags in capture mode, sums of
        squared shards under FSDP2) and, `with_gradient`, the kept step's gradient (capture mode); counts the steps
        and returns the adapters' squared norms of the kept step (`None` without gradient, or when on some rank a
        later micro-batch already wrote into the buffer)."""
        n = len(self.adapters)
        capture = self._captured is not None
        # fp64 for FSDP2's sums of squares (as DDP's norms), fp32 beside a captured gradient buffer (fp32 itself)
        dtype = torch.float32 if capture else torch.float64
        fired = torch.tensor([a.name in self.fired for a in self.adapters], dtype=dtype)
        steps = len(self._unsynced)
        device = self._captured_flat.device if capture else fired.device
        parts = [fired.to(device), *(f.to(device, dtype) for f in self._unsynced)]
        gradient_at = sum(p.numel() for p in parts)
        if with_gradient:
            flat = self._captured_flat
            flat[-1] = float(self._last_step_kept)  # whether this rank still holds the step, summed over ranks
            self._last_step_kept = False  # reduced once
            parts.append(flat)
        values = torch.cat(parts)
        if self._reduce_sum is not None:
            values = self._reduce_sum(values)
        counts = values[:gradient_at].cpu()
        self.fired |= {a.name for a, f in zip(self.adapters, counts[:n].tolist()) if f > 0}
        for k in range(steps):
            row = counts[n * (k + 1) : n * (k + 2)]
            if capture:
                self._count_active(row > 0)
            else:  # FSDP2: the step's squared norms, summed over the ranks
                self._count_step(row.double())
        self._unsynced = []
        if not with_gradient:
            return None
        summed = values[gradient_at:]
        if float(summed[-1]) < self._world_size:
            return None
        return _adapter_squares(torch.split(summed[:-1] / self._world_size, self._sizes))

    def flush(self, step: int) -> dict[str, float]:
        """The metrics of the logging window that ends at `step`, recorded in history.

        `grad_norm/<tower>` is the value of the last optimizer step of the window (the step logged), as the
        Trainer's own `grad_norm`, so the two line up ([`~mm_trainer.audit.dynamics.GRAD_NORM_AGGREGATION`]);
        `active_adapters/<tower>` is the mean share over the window's steps.
        """
        # One collective on every rank (Trainer.log runs on each): what fired, the window's steps and, with captured
        # gradients (DeepSpeed), the last step's gradient for its norms. Whether to send the gradient is decided from
        # what every rank has alike (a step was collected since bind).
        sq = self._reduce_together(with_gradient=self._captured is not None and self._generation > 0)
        if sq is not None:
            for t, norm in enumerate(self._tower_norms(sq)):
                self._pending[f"grad_norm/{self.towers[t]}"].append(norm)
        if not self._pending:
            return {}
        metrics = {
            key: vals[-1] if key.startswith("grad_norm/") else sum(vals) / len(vals)
            for key, vals in self._pending.items()
        }
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
        """Restore what [`state_dict`] saved (adapters are matched by name)."""
        self.history = list(state.get("history", []))
        for name, count in state.get("nonzero_steps", {}).items():
            if name in self.nonzero_steps:
                self.nonzero_steps[name] = int(count)
        self.fired |= set(state.get("fired", [])) & set(self.nonzero_steps)
        self.steps_collected = int(state.get("steps_collected", 0))


def _adapter_squares(weights: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Squared norm per adapter (fp64 on the host) from its weights' gradients listed `A, B, A, B, ...`."""
    norms = [torch.linalg.vector_norm(w, dtype=torch.float32) for w in weights]
    per_weight = _to_host(norms).double() ** 2
    return per_weight.view(-1, 2).sum(1)


def _replica_weight(grad: torch.Tensor, world_size: int) -> float:
    """`1 / copies` of a gradient whose squares are summed over all ranks: a `DTensor` counts its `Replicate`
    mesh dimensions (HSDP), a plain tensor is held whole by every rank."""
    if not is_dtensor(grad):
        return 1.0 / world_size
    copies = 1
    for dim, placement in enumerate(grad.placements):
        if placement.is_replicate():
            copies *= grad.device_mesh.size(dim)
    return 1.0 / copies


def _to_host(values: list[torch.Tensor]) -> torch.Tensor:
    """Stack scalars that may live on several devices (`device_map`) with one copy to the host per device."""
    by_device: dict[torch.device, list[int]] = defaultdict(list)
    for i, v in enumerate(values):
        by_device[v.device].append(i)
    out = torch.empty(len(values), dtype=torch.float32)
    for idx in by_device.values():
        out[torch.tensor(idx)] = torch.stack([values[i] for i in idx]).to("cpu")
    return out
