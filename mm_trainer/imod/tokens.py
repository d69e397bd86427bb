"""Where the text and non-text tokens of a collated batch sit, per sequence: shared by IMoD and the dominance rate.

A *sequence* is one row of ``input_ids``; with padding-free packing (``position_ids`` and no ``attention_mask``) it is
each segment whose ``position_ids`` restart at 0. Padding (``attention_mask == 0``) belongs to neither modality.
Non-text means any of image, video and audio placeholder tokens (:func:`mm_trainer.modality.token_modality`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..modality import PAD, TEXT, token_modality


@dataclass
class TokenLayout:
    """Token positions of one micro-batch, flattened over ``(batch, time)``.

    Attributes:
        shape: ``input_ids.shape``; a layer input lines up with the tokens when its leading dims equal it.
        num_sequences: Sequences in the micro-batch (text-only ones included).
        text_index / non_text_index: Flat positions of the text / non-text tokens.
        text_sequence / non_text_sequence: Sequence of each of those positions.
        text_count / non_text_count: Tokens per sequence (float, ``num_sequences``).
        membership: ``num_sequences x tokens``, 1 where a (non-padding) token belongs to a sequence.
        text_mean / non_text_mean: ``num_sequences x tokens`` weights of the per-sequence mean over its text /
            non-text tokens (``1 / count`` on them, 0 elsewhere): ``text_mean @ values`` averages per sequence.
            Dense matrices keep the per-sequence reductions as matrix products, whose backward is fast, rather than
            scatter / index-add.
        text_weight / non_text_weight: Per token, its weight in its sequence's text / non-text mean (the column sums
            of ``text_mean`` / ``non_text_mean``).
    """

    shape: torch.Size
    num_sequences: int
    text_index: torch.Tensor
    text_sequence: torch.Tensor
    non_text_index: torch.Tensor
    non_text_sequence: torch.Tensor
    text_count: torch.Tensor
    non_text_count: torch.Tensor
    membership: torch.Tensor
    text_mean: torch.Tensor
    non_text_mean: torch.Tensor
    text_weight: torch.Tensor
    non_text_weight: torch.Tensor
    _by_device: dict[torch.device, TokenLayout] = field(default_factory=dict, repr=False)
    _positions: list[tuple[torch.Tensor, torch.Tensor]] | None = field(default=None, repr=False)
    _text_rows: torch.Tensor | None = field(default=None, repr=False)

    @classmethod
    def from_batch(cls, batch: Mapping[str, Any], config: Any) -> TokenLayout:
        """The layout of a collated batch (``input_ids`` plus ``attention_mask`` or ``position_ids``)."""
        return cls.from_classes(token_modality(batch, config), _packed_sequence_ids(batch))

    @classmethod
    def from_classes(cls, classes: torch.Tensor, sequence_ids: torch.Tensor | None = None) -> TokenLayout:
        """The layout from per-token classes (``PAD`` / ``TEXT`` / media) and, optionally, per-token sequence ids.

        Without ``sequence_ids`` every row of ``classes`` is one sequence.
        """
        if classes.dim() == 1:
            classes = classes[None]
        if sequence_ids is None:
            sequence_ids = torch.arange(classes.shape[0], device=classes.device)[:, None].expand_as(classes)
        flat = classes.reshape(-1)
        seq = sequence_ids.reshape(-1).to(flat.device)
        num_sequences = int(seq.max()) + 1 if seq.numel() else 0
        text = flat == TEXT
        non_text = (flat != TEXT) & (flat != PAD)
        text_index = text.nonzero().flatten()
        non_text_index = non_text.nonzero().flatten()
        text_sequence = seq[text_index]
        non_text_sequence = seq[non_text_index]
        text_count = torch.bincount(text_sequence, minlength=num_sequences).float()
        non_text_count = torch.bincount(non_text_sequence, minlength=num_sequences).float()
        membership = (seq[None, :] == torch.arange(num_sequences, device=seq.device)[:, None]) & (flat != PAD)[None]
        membership = membership.float()
        text_mean = membership * text.float()[None] / text_count.clamp(min=1)[:, None]
        non_text_mean = membership * non_text.float()[None] / non_text_count.clamp(min=1)[:, None]
        return cls(
            shape=classes.shape,
            num_sequences=num_sequences,
            text_index=text_index,
            text_sequence=text_sequence,
            non_text_index=non_text_index,
            non_text_sequence=non_text_sequence,
            text_count=text_count,
            non_text_count=non_text_count,
            membership=membership,
            text_mean=text_mean,
            non_text_mean=non_text_mean,
            text_weight=text_mean.sum(0),
            non_text_weight=non_text_mean.sum(0),
        )

    @property
    def text_rows(self) -> torch.Tensor:
        """``tokens x 1`` float, 1 on text tokens (computed once)."""
        if self._text_rows is None:
            self._text_rows = (self.text_weight > 0).float()[:, None]
        return self._text_rows

    @property
    def has_non_text(self) -> bool:
        """Whether any non-text token is present."""
        return self.non_text_index.numel() > 0

    @property
    def sequences_with_both(self) -> int:
        """Sequences holding text and non-text tokens."""
        return int(((self.text_count > 0) & (self.non_text_count > 0)).sum())

    def aligned(self, hidden: torch.Tensor) -> bool:
        """Whether a layer input ``(..., features)`` has one row per token of this batch."""
        return tuple(hidden.shape[:-1]) == tuple(self.shape)

    def to(self, device: torch.device) -> TokenLayout:
        """This layout with its index tensors on ``device`` (cached per device)."""
        if self.text_index.device == device:
            return self
        if device not in self._by_device:
            self._by_device[device] = TokenLayout(
                shape=self.shape,
                num_sequences=self.num_sequences,
                text_index=self.text_index.to(device),
                text_sequence=self.text_sequence.to(device),
                non_text_index=self.non_text_index.to(device),
                non_text_sequence=self.non_text_sequence.to(device),
                text_count=self.text_count.to(device),
                non_text_count=self.non_text_count.to(device),
                membership=self.membership.to(device),
                text_mean=self.text_mean.to(device),
                non_text_mean=self.non_text_mean.to(device),
                text_weight=self.text_weight.to(device),
                non_text_weight=self.non_text_weight.to(device),
            )
        return self._by_device[device]

    def sequence_positions(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per sequence, the flat positions of its ``(text, non-text)`` tokens (computed once)."""
        if self._positions is None:
            self._positions = [
                (self.text_index[self.text_sequence == s], self.non_text_index[self.non_text_sequence == s])
                for s in range(self.num_sequences)
            ]
        return self._positions


def _packed_sequence_ids(batch: Mapping[str, Any]) -> torch.Tensor | None:
    """Per-token sequence ids of a padding-free batch (segments restart ``position_ids`` at 0), else ``None``."""
    if batch.get("attention_mask") is not None:
        return None
    position_ids = batch.get("position_ids")
    input_ids = batch["input_ids"]
    if not isinstance(position_ids, torch.Tensor) or position_ids.shape != input_ids.shape:
        return None
    starts = (position_ids == 0).reshape(-1).long()
    starts[0] = 1
    return (torch.cumsum(starts, 0) - 1).reshape(input_ids.shape)
