"""Where the text and non-text tokens of a collated batch sit, per sequence: shared by IMoD and the dominance rate.

A *sequence* is one row of `input_ids`; with padding-free packing (`position_ids` and no `attention_mask`) it is
each segment whose `position_ids` restart at 0. Padding (`attention_mask == 0`) belongs to neither modality.
Non-text means any of image, video and audio placeholder tokens ([`mm_trainer.model.modality.token_modality`]).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from ..model.modality import PAD, TEXT, token_modality


@dataclass
class TokenLayout:
    """Token positions of one micro-batch, flattened over `(batch, time)`, built once and shared by every layer.

    Everything a layer's constraint needs per token or per sequence is a tensor here, computed in [`from_classes`]
    without a loop over sequences, so a layer runs no Python loop and no host-device synchronisation of its own.
    *Groups* are the `(sequence, modality)` pairs: group `s` holds the text tokens of sequence `s` and group
    `num_sequences + s` its non-text tokens.

    Attributes:
        shape: `input_ids.shape`; a layer input lines up with the tokens when its leading dims equal it.
        num_sequences: Sequences in the micro-batch (text-only ones included).
        sequences_with_both: Sequences holding text and non-text tokens.
        text_index / non_text_index: Flat positions of the text / non-text tokens.
        text_sequence / non_text_sequence: Sequence of each of those positions.
        text_count / non_text_count: Tokens per sequence (float, `num_sequences`).
        membership: `num_sequences x tokens`, 1 where a (non-padding) token belongs to a sequence.
        text_mean / non_text_mean: `num_sequences x tokens` weights of the per-sequence mean over its text /
            non-text tokens (`1 / count` on them, 0 elsewhere): `text_mean @ values` averages per sequence.
        text_weight / non_text_weight: Per token, its weight in its sequence's text / non-text mean (the column sums
            of `text_mean` / `non_text_mean`).
        group_mean: `2·num_sequences x tokens`, `text_mean` stacked on `non_text_mean`: per-group means.
        group: Per token, its group (padding: 0, with weight 0).
        token_weight: Per token, its weight in its group's mean (`text_weight + non_text_weight`).
        both_groups: Per group, 1.0 when its sequence holds both modalities.
        both_weight: Per token, `token_weight` where its sequence holds both modalities, else 0.
        text_rows: `tokens x 1` float, 1 on text tokens.
        text_mask: `tokens x 1` bool, True on text tokens.
    """

    shape: torch.Size
    num_sequences: int
    sequences_with_both: int
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
    group_mean: torch.Tensor
    group: torch.Tensor
    token_weight: torch.Tensor
    both_groups: torch.Tensor
    both_weight: torch.Tensor
    text_rows: torch.Tensor
    text_mask: torch.Tensor
    _by_device: dict[torch.device, TokenLayout] = field(default_factory=dict, repr=False)
    _positions: list[tuple[torch.Tensor, torch.Tensor]] | None = field(default=None, repr=False)

    @classmethod
    def from_batch(cls, batch: Mapping[str, Any], config: Any) -> TokenLayout:
        """The layout of a collated batch (`input_ids` plus `attention_mask` or `position_ids`)."""
        return cls.from_classes(token_modality(batch, config), _packed_sequence_ids(batch))

    @classmethod
    def from_classes(cls, classes: torch.Tensor, sequence_ids: torch.Tensor | None = None) -> TokenLayout:
        """The layout from per-token classes (`PAD` / `TEXT` / media) and, optionally, per-token sequence ids.

        Without `sequence_ids` every row of `classes` is one sequence. Synchronises with the device at most twice
        (the number of packed sequences, the number of sequences with both modalities), once per micro-batch.
        """
        if classes.dim() == 1:
            classes = classes[None]
        if sequence_ids is None:
            num_sequences = classes.shape[0]
            sequence_ids = torch.arange(num_sequences, device=classes.device)[:, None].expand_as(classes)
        else:
            num_sequences = int(sequence_ids.max()) + 1 if sequence_ids.numel() else 0
        flat = classes.reshape(-1)
        seq = sequence_ids.reshape(-1).to(flat.device)
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
        text_weight = text_mean.sum(0)
        non_text_weight = non_text_mean.sum(0)
        both = (text_count > 0) & (non_text_count > 0)
        token_weight = text_weight + non_text_weight
        return cls(
            shape=classes.shape,
            num_sequences=num_sequences,
            sequences_with_both=int(both.sum()),
            text_index=text_index,
            text_sequence=text_sequence,
            non_text_index=non_text_index,
            non_text_sequence=non_text_sequence,
            text_count=text_count,
            non_text_count=non_text_count,
            membership=membership,
            text_mean=text_mean,
            non_text_mean=non_text_mean,
            text_weight=text_weight,
            non_text_weight=non_text_weight,
            group_mean=torch.cat([text_mean, non_text_mean]),
            group=torch.where(non_text, seq + num_sequences, torch.where(text, seq, 0)),
            token_weight=token_weight,
            both_groups=both.float().repeat(2),
            both_weight=token_weight * both[seq].float(),
            text_rows=text.float()[:, None],
            text_mask=text[:, None],
        )

    @property
    def has_non_text(self) -> bool:
        """Whether any non-text token is present."""
        return self.non_text_index.numel() > 0

    def aligned(self, hidden: torch.Tensor) -> bool:
        """Whether a layer input `(..., features)` has one row per token of this batch."""
        return tuple(hidden.shape[:-1]) == tuple(self.shape)

    def to(self, device: torch.device) -> TokenLayout:
        """This layout with its tensors on `device` (cached per device)."""
        if self.text_index.device == device:
            return self
        if device not in self._by_device:
            values = {
                f.name: getattr(self, f.name).to(device)
                if isinstance(getattr(self, f.name), torch.Tensor)
                else getattr(self, f.name)
                for f in fields(self)
                if not f.name.startswith("_")
            }
            self._by_device[device] = TokenLayout(**values)
        return self._by_device[device]

    def sequence_positions(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per sequence, the flat positions of its `(text, non-text)` tokens (computed once)."""
        if self._positions is None:
            self._positions = [
                (self.text_index[self.text_sequence == s], self.non_text_index[self.non_text_sequence == s])
                for s in range(self.num_sequences)
            ]
        return self._positions


def _packed_sequence_ids(batch: Mapping[str, Any]) -> torch.Tensor | None:
    """Per-token sequence ids of a padding-free batch (segments restart `position_ids` at 0), else `None`."""
    if batch.get("attention_mask") is not None:
        return None
    position_ids = batch.get("position_ids")
    input_ids = batch["input_ids"]
    if not isinstance(position_ids, torch.Tensor) or position_ids.shape != input_ids.shape:
        return None
    starts = (position_ids == 0).reshape(-1).long()
    starts[0] = 1
    return (torch.cumsum(starts, 0) - 1).reshape(input_ids.shape)
