"""Per-adapter status from what was observed during training: forward passes, gradients, and movement since init.

The status answers "did this adapter learn anything from the data?", for every init scheme:

================  =======  =====================  ==========================  =====================================
status            fired    non-zero grad steps    A or B moved since init     what happened
================  =======  =====================  ==========================  =====================================
`never_fired`   no       (any)                  (any)                       its module never ran a training
                                                                              forward: the data never reached it
`zero_grad`     yes      0                      no                          it ran, but its gradient was always
                                                                              absent or exactly zero
`decay_only`    yes      0                      yes                         it moved, but only by weight decay
                                                                              (AdamW decays params whose grad is a
                                                                              zero tensor)
`zero_grad`     yes      > 0                    no                          it got gradients but the optimizer
                                                                              never changed it (lr 0, skipped steps,
                                                                              updates below its dtype's precision)
`trained`       yes      > 0                    yes                         it learned
================  =======  =====================  ==========================  =====================================

Movement is read from fingerprints ([`~mm_trainer.audit.record`]), not from "B is still zero": PiSSA, OLoRA,
LoftQ and EVA start with B != 0, so that rule would call every one of their adapters dead or alive wrongly. When the
init record was lost (a resume from a checkpoint without one), movement is unknown and the status follows the
gradient counts alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from ..model.adapters import LoraAdapter
from .record import Movement

STATUSES: tuple[str, ...] = ("trained", "decay_only", "zero_grad", "never_fired")
"""Every status an adapter can get, best first."""

DEAD_STATUSES: tuple[str, ...] = ("decay_only", "zero_grad", "never_fired")
"""Statuses of adapters that learned nothing from the data."""


@dataclass
class ModuleAudit:
    """Audit of one adapted module.

    Attributes:
        name: Module path in the base model.
        tower: Its tower.
        status: One of [`STATUSES`].
        reason: Why, in words.
        params: Trainable parameters of the adapter (A and B).
        fired: Whether the module ran a forward pass with autograd on during training.
        nonzero_steps: Optimizer steps on which A or B had a non-zero gradient.
        moved_a: Whether A differs from init (`None`: unknown, init record lost).
        moved_b: Whether B differs from init (`None`: unknown).
        b_zero_at_init: Whether B was all zero at init (default LoRA init; `False` for PiSSA, OLoRA, LoftQ, ...).
        norm_a_init: Norm of A at init.
        norm_a: Norm of A now.
        norm_b_init: Norm of B at init.
        norm_b: Norm of B now.
        finite: Whether A and B hold only finite values now.
        no_op: Whether `B @ A` is exactly zero now (A or B all zero), i.e. the adapter changes nothing.
    """

    name: str
    tower: str
    status: str
    reason: str
    params: int
    fired: bool
    nonzero_steps: int
    moved_a: bool | None = None
    moved_b: bool | None = None
    b_zero_at_init: bool | None = None
    norm_a_init: float | None = None
    norm_a: float | None = None
    norm_b_init: float | None = None
    norm_b: float | None = None
    finite: bool = True
    no_op: bool | None = None

    @property
    def dead(self) -> bool:
        """Whether the adapter learned nothing from the data."""
        return self.status in DEAD_STATUSES

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


def classify(fired: bool, nonzero_steps: int, moved: bool | None) -> tuple[str, str]:
    """Status and reason of one adapter (the rules in this module's docstring).

    Args:
        fired: Whether its module ran a training forward.
        nonzero_steps: Optimizer steps with a non-zero gradient on A or B.
        moved: Whether A or B differs from init; `None` when unknown.
    """
    if not fired:
        reason = "its module never ran a forward pass during training: the data never reached it"
        if moved:
            reason += " (its weights moved anyway, by an update that did not come from the loss)"
        return "never_fired", reason
    if nonzero_steps == 0:
        if moved:
            return "decay_only", (
                "it ran but never got a non-zero gradient; its weights moved by weight decay alone (a zero "
                "gradient tensor still gets decayed), so the change carries nothing from the data"
            )
        return "zero_grad", "it ran but its gradient was always absent or exactly zero"
    if moved is False:
        return "zero_grad", (
            f"it got a non-zero gradient on {nonzero_steps} step(s) but its weights never changed (learning rate 0, "
            "skipped optimizer steps, or updates below the precision of its dtype)"
        )
    reason = f"non-zero gradient on {nonzero_steps} step(s)"
    reason += "; moved since init" if moved else "; movement unknown (init record lost on resume)"
    return "trained", reason


def module_audits(
    adapters: Iterable[LoraAdapter],
    movements: Mapping[str, Movement],
    fired: set[str],
    nonzero_steps: Mapping[str, int],
) -> list[ModuleAudit]:
    """One [`ModuleAudit`] per adapter, in model order.

    Args:
        adapters: The adapters.
        movements: Movement since init per adapter name (missing: unknown).
        fired: Names of the adapters whose module ran a training forward.
        nonzero_steps: Per adapter name, optimizer steps with a non-zero gradient.
    """
    out: list[ModuleAudit] = []
    for adapter in adapters:
        move = movements.get(adapter.name)
        status, reason = classify(adapter.name in fired, int(nonzero_steps.get(adapter.name, 0)), move and move.moved)
        entry = ModuleAudit(
            name=adapter.name,
            tower=adapter.tower,
            status=status,
            reason=reason,
            params=adapter.params,
            fired=adapter.name in fired,
            nonzero_steps=int(nonzero_steps.get(adapter.name, 0)),
        )
        if move is not None:
            entry.moved_a, entry.moved_b = move.moved_a, move.moved_b
            entry.b_zero_at_init = move.init_b.all_zero
            entry.norm_a_init, entry.norm_a = move.init_a.norm, move.now_a.norm
            entry.norm_b_init, entry.norm_b = move.init_b.norm, move.now_b.norm
            entry.finite = move.finite
            entry.no_op = move.no_op
        out.append(entry)
    return out


def status_counts(modules: Iterable[ModuleAudit]) -> dict[str, int]:
    """Number of adapters per status (every status present, zeros included)."""
    counts = dict.fromkeys(STATUSES, 0)
    for m in modules:
        counts[m.status] += 1
    return counts
