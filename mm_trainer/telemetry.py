"""Per-tower gradient telemetry of the LoRA adapters, logged through the Trainer's ``log``."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import torch

from .adapters import LoraAdapter


class TowerTelemetry:
    """Gradient norm per tower and the fraction of adapters with a non-zero gradient, step by step.

    Call :meth:`collect` once per optimizer step, after the gradients of the step are complete (accumulated and, under
    DDP, reduced) and before they are clipped or zeroed. :meth:`flush` returns the metrics of the logging window
    (gradient norm of its last step, mean share of active adapters), ready for ``Trainer.log``, and appends them to
    :attr:`history`.

    The cost is one fused norm over the adapters' gradients and one device-to-host copy per step.

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
        self.steps_collected = 0

    def bind(self, adapters: list[LoraAdapter]) -> None:
        """Watch ``adapters`` from now on: the same modules, by name and order, whose parameters the engine may have
        replaced (``accelerator.prepare`` under FSDP2). Counters and history carry over.

        Raises:
            ValueError: ``adapters`` are not the watched ones.
        """
        if [a.name for a in adapters] != [a.name for a in self.adapters]:
            raise ValueError("TowerTelemetry.bind takes the same adapters (names, order) it was built with.")
        self.adapters = list(adapters)

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
        """Measure the current gradients of every adapter (call once per optimizer step, before clipping)."""
        if not self.adapters:
            return
        grads: list[torch.Tensor] = []
        owners: list[int] = []
        for i, adapter in enumerate(self.adapters):
            for p in (adapter.lora_A, adapter.lora_B):
                if p.grad is not None:
                    grads.append(p.grad)
                    owners.append(i)
        sq = torch.zeros(len(self.adapters), dtype=torch.float64)
        if grads:
            norms = torch._foreach_norm(grads)
            per_param = _to_host([n.float() for n in norms]).double() ** 2
            sq.index_add_(0, torch.tensor(owners, dtype=torch.long), per_param)
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

    def flush(self, step: int) -> dict[str, float]:
        """The metrics of the logging window that ends at ``step``, recorded in history.

        ``grad_norm/<tower>`` is the value of the last optimizer step of the window (the step logged), as the
        Trainer's own ``grad_norm``, so the two line up (:data:`~mm_trainer.audit.dynamics.GRAD_NORM_AGGREGATION`);
        ``active_adapters/<tower>`` is the mean share over the window's steps.
        """
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
        """Restore what :meth:`state_dict` saved (adapters are matched by name)."""
        self.history = list(state.get("history", []))
        for name, count in state.get("nonzero_steps", {}).items():
            if name in self.nonzero_steps:
                self.nonzero_steps[name] = int(count)
        self.fired |= set(state.get("fired", [])) & set(self.nonzero_steps)
        self.steps_collected = int(state.get("steps_collected", 0))


def _to_host(values: list[torch.Tensor]) -> torch.Tensor:
    """Stack scalars that may live on several devices (``device_map``) with one copy to the host per device."""
    by_device: dict[torch.device, list[int]] = defaultdict(list)
    for i, v in enumerate(values):
        by_device[v.device].append(i)
    out = torch.empty(len(values), dtype=torch.float32)
    for idx in by_device.values():
        out[torch.tensor(idx)] = torch.stack([values[i] for i in idx]).to("cpu")
    return out
