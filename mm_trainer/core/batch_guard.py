"""Per-batch guard: a batch that holds a modality the trainer's modality profile never saw fails at that step.

The profile (a sample of the dataset, or the user's `data_modalities`) decides the LoRA targets, whether unreached
towers are released and whether DDP looks for unused parameters. A media row the sample missed would otherwise reach
a released tower (a crash deep inside the forward) or leave ranks out of step (a DDP hang). The guard reads the
batch's placeholder tokens and media features before the forward and raises a clear error naming the modality, the
batch rows, and the fix. Under several processes every rank learns (one all-reduce of three flags per micro-batch)
whether any rank's batch failed, and all of them raise together instead of one rank raising and the others waiting.

Under engines whose forward runs no collective (DeepSpeed ZeRO-0/1/2) that all-reduce need not block before the forward:
`check(..., defer=True)` starts it and [`BatchModalityGuard.resolve`] (called by the trainer from a hook at the
end of the model's forward) reads it, so it completes while the forward runs. A rank whose own batch holds the
modality still raises before its forward; the others raise at the end of theirs, before the loss's first collective.
DDP (which broadcasts buffers as its forward starts), FSDP and ZeRO-3 (which gather parameters in it) keep the check
blocking before the forward.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..distributed.engine import Engine
from ..model.modality import NON_TEXT_MODALITIES, ModalityProfile, batch_modality_rows, placeholder_ids


class UnseenModalityError(ValueError):
    """A training batch holds a modality the modality profile did not see."""


class BatchModalityGuard:
    """Checks each batch against the modalities the plan was made for.

    Args:
        profile: The trainer's modality profile.
        config: The model config (placeholder token ids are read from it).
        released: Paths of the towers whose weights were released.
    """

    def __init__(self, profile: ModalityProfile, config: Any, released: list[str] | None = None) -> None:
        self.profile = profile
        self.placeholders = placeholder_ids(config) if config is not None else {}
        self.released = list(released or [])
        # A deferred check's all-reduce in flight: (its work handle, the flags it reduces, the step).
        self._pending: tuple[Any, torch.Tensor, int] | None = None

    def unseen(self, batch: Mapping[str, Any]) -> dict[str, list[int] | None]:
        """Modalities of `batch` outside the profile, with their batch rows where known."""
        found = batch_modality_rows(batch, self.placeholders)
        return {m: rows for m, rows in found.items() if m not in self.profile.modalities}

    def check(self, batch: Mapping[str, Any], step: int, engine: Engine | None = None, defer: bool = False) -> None:
        """Raise [`UnseenModalityError`] when `batch` (or, under several processes, any rank's batch) holds
        an unseen modality. Every rank must call it for every micro-batch (it holds a collective then).

        Args:
            batch: The micro-batch, as the model will receive it.
            step: The optimizer step it belongs to (named in the error).
            engine: The run's engine; under several processes the ranks' findings are added up.
            defer: Start the all-reduce and return: another rank's finding is raised by [`resolve`]. Only where no
                collective runs between this call and `resolve` (the forward of DeepSpeed ZeRO-0/1/2).
        """
        self._pending = None  # a check whose micro-batch never reached its forward (an aborted step): nothing to read
        unseen = self.unseen(batch)
        if engine is None or not engine.distributed:
            if unseen:
                raise UnseenModalityError(self._message(unseen, [], step))
            return
        flags = torch.tensor(
            [float(m in unseen) for m in NON_TEXT_MODALITIES], dtype=torch.float32, device=engine.device
        )
        if defer and not unseen:
            self._pending = (engine.start_sum(flags), flags, step)
            return
        self._raise_if_any(unseen, engine.sum(flags), step)

    @property
    def pending(self) -> bool:
        """Whether a deferred check's all-reduce is still to be read by [`resolve`]."""
        return self._pending is not None

    def resolve(self) -> None:
        """Read the all-reduce a deferred [`check`] started, and raise if another rank's batch held an unseen
        modality (no-op when none is in flight)."""
        if self._pending is None:
            return
        work, flags, step = self._pending
        self._pending = None
        work.wait()
        self._raise_if_any({}, flags, step)

    def _raise_if_any(self, unseen: dict[str, list[int] | None], flags: torch.Tensor, step: int) -> None:
        elsewhere = [m for m, f in zip(NON_TEXT_MODALITIES, flags.tolist()) if f > 0 and m not in unseen]
        if unseen or elsewhere:
            raise UnseenModalityError(self._message(unseen, elsewhere, step))

    def _message(self, unseen: dict[str, list[int] | None], elsewhere: list[str], step: int) -> str:
        seen = sorted(self.profile.modalities)
        basis = (
            f"declared data_modalities={seen}"
            if self.profile.declared
            else f"{self.profile.rows_sampled} sampled rows held only {seen}"
        )
        parts = []
        for modality, rows in unseen.items():
            where = f"batch row(s) {rows}" if rows else "its features (rows unknown)"
            parts.append(f"{modality} ({where})")
        if elsewhere:
            parts.append(f"{', '.join(elsewhere)} (in another process's batch)")
        every = sorted(set(seen) | set(unseen) | set(elsewhere))
        released = (
            f" The {', '.join(self.released)} tower(s) were released from memory because of it; "
            "`free_unreached_towers=False` keeps them."
            if self.released
            else ""
        )
        return (
            f"Step {step}: the batch holds {'; '.join(parts)}, a modality the training plan did not see ({basis}). "
            "Targets, tower release and DDP's unused-parameter search were planned without it, so this batch would "
            f"crash inside the model or stall the other processes.{released} Fix: declare every modality the data "
            f"holds, e.g. `MMSFTConfig(data_modalities={every})`, or raise `modality_sample_rows` so the profile "
            "sees these rows."
        )
