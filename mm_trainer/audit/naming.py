"""Compact module-name listings: `model.visual.blocks.0.mlp.down_proj` and `...1...` -> one `*` pattern."""

from __future__ import annotations

import re
from collections.abc import Iterable

_INDEX = re.compile(r"(?<=\.)\d+(?=\.|$)")


def name_pattern(name: str) -> str:
    """`name` with every numeric path segment (a layer / block index) replaced by `*`."""
    return _INDEX.sub("*", name)


def group_names(names: Iterable[str]) -> list[tuple[str, int]]:
    """`(pattern, count)` per distinct [`name_pattern`], in first-seen order."""
    counts: dict[str, int] = {}
    for name in names:
        pattern = name_pattern(name)
        counts[pattern] = counts.get(pattern, 0) + 1
    return list(counts.items())
