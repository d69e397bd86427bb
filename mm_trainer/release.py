"""Release the weights of towers the data never reaches (e.g. the vision tower of a VLM trained on text only)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .targets import TargetPlan
from .towers import NON_TEXT_TOWERS

logger = logging.getLogger(__name__)


class ReleasedTower(nn.Module):
    """Stand-in for a tower whose weights were released: holds no parameters, refuses to run.

    It keeps the original ``config`` (models read settings such as ``spatial_merge_size`` from it) and says how to get
    the tower back if something calls it.
    """

    def __init__(self, path: str, original: nn.Module, params: int) -> None:
        super().__init__()
        self.released_path = path
        self.released_class = type(original).__name__
        self.released_params = params
        config = getattr(original, "config", None)
        if config is not None:
            self.config = config
        dtypes = {p.dtype for p in original.parameters()}
        self._released_dtype = next(iter(dtypes)) if len(dtypes) == 1 else torch.float32

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the released weights had (some models read ``tower.dtype``)."""
        return self._released_dtype

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(
            f"The {self.released_class} at `{self.released_path}` was released by mm_trainer because the training data "
            "never reaches it (free_unreached_towers). The data now fed to the model needs it: set "
            "`free_unreached_towers=False` in MMSFTConfig, or load the saved adapter onto a fresh base model for "
            "inference with this kind of input."
        )

    def extra_repr(self) -> str:
        return f"released {self.released_class} ({self.released_params:,} params)"


@dataclass
class ReleaseRecord:
    """One released tower."""

    path: str
    tower: str
    module_class: str
    params: int
    bytes: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "path": self.path,
            "tower": self.tower,
            "class": self.module_class,
            "params": self.params,
            "bytes": self.bytes,
        }


def releasable_roots(plan: TargetPlan) -> list[tuple[str, str]]:
    """Tower roots ``(path, tower)`` that are safe to release under ``plan``.

    A root is releasable when it is a vision / audio tower, the data never reaches it, no kept adapter sits inside it,
    and (when the probe ran) none of its watched modules fired.
    """
    reached = plan.profile.reached_towers()
    kept = plan.kept()
    fired = plan.probe.fired if plan.probe is not None else set()
    out = []
    for path, (tower, _why) in plan.tower_map.roots.items():
        if tower not in NON_TEXT_TOWERS or tower in reached or tower in plan.selected_towers:
            continue
        prefix = path + "."
        if any(n.startswith(prefix) for n in kept) or any(n.startswith(prefix) for n in fired):
            continue
        out.append((path, tower))
    return out


def release_towers(model: nn.Module, roots: list[tuple[str, str]]) -> list[ReleaseRecord]:
    """Replace each tower root in ``roots`` by a :class:`ReleasedTower`, freeing its weights.

    Args:
        model: The base model (before PEFT wraps it).
        roots: ``(path, tower)`` pairs, e.g. from :func:`releasable_roots`.

    Returns:
        What was released.
    """
    records = []
    for path, tower in roots:
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        original = getattr(parent, attr)
        tensors = {id(t): t for t in list(original.parameters()) + list(original.buffers())}
        params = sum(p.numel() for p in original.parameters())
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        setattr(parent, attr, ReleasedTower(path, original, params))
        records.append(ReleaseRecord(path, tower, type(original).__name__, params, nbytes))
        logger.info(
            "Released %s at %s: %s params, %.1f MB", type(original).__name__, path, f"{params:,}", nbytes / 2**20
        )
        del original, tensors
    return records
