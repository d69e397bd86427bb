"""Per-batch guard: a batch that holds a modality the trainer's modality profile never saw fails at that step.

The profile (a sample of the dataset, or the user's ``data_modalities``) decides the LoRA targets, whether unreached
towers are released and whether DDP looks for unused parameters. A media row the sample missed would otherwise reach
a released tower (a crash deep inside the forward) or leave ranks out of step (a DDP hang). The guard reads the
batch's placeholder tokens and media features before the forward and raises a clear error naming the modality, the
batch rows, and the fix. Under several processes every rank learns (one all-reduce of three flags per micro-batch)
whether any rank's batch failed, and all of them raise together instead of one rank raising and the others waiting.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .modality import NON_TEXT_MODALITIES, ModalityProfile, batch_modality_rows, placeholder_ids


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

    def unseen(self, batch: Mapping[str, Any]) -> dict[str, list[int] | None]:
        """Modalities of ``batch`` outside the profile, with their batch rows where known."""
        found = batch_modality_rows(batch, self.placeholders)
        return {m: rows for m, rows in found.items() if m not in self.profile.modalities}

    def check(self, batch: Mapping[str, Any], step: int, accelerator: Any = None) -> None:
        """Raise :class:`UnseenModalityError` when ``batch`` (or, under several processes, any rank's batch) holds
        an unseen modality. Every rank must call it for every micro-batch (it holds a collective then)."""
        unseen = self.unseen(batch)
        elsewhere: list[str] = []
        if accelerator is not None and getattr(accelerator, "num_processes", 1) > 1:
            flags = torch.tensor(
                [float(m in unseen) for m in NON_TEXT_MODALITIES], dtype=torch.float32, device=accelerator.device
            )
            flags = accelerator.reduce(flags, reduction="sum")
            elsewhere = [m for m, f in zip(NON_TEXT_MODALITIES, flags.tolist()) if f > 0 and m not in unseen]
        if not unseen and not elsewhere:
            return
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
