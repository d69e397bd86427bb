"""Fingerprints of the trainable weights at init, to tell later, bit for bit, which ones moved.

Keeping a copy of every adapter would double its memory; a fingerprint is a SHA-256 digest (truncated to 128 bits) of
the tensor's raw bytes plus its norm and non-zero count. Any change of any bit changes the digest (collisions aside,
which at 128 bits do not happen by chance), so "untouched" and "moved" are told apart exactly, also when a move is
too small to show in a norm. Cost: one pass over the bytes on the host per tensor (SHA-256 runs at 2-3 GB/s on CPUs
with SHA extensions), only at init and at each save.

Sharded weights (FSDP2 `DTensor`, DeepSpeed ZeRO-3 partitions) are fingerprinted whole, gathered on every rank:
the record and every comparison are built on every rank at the same points (construction, `prepare_save`), so the
gathers match, and every rank holds the same fingerprints as a DDP run of the same weights.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..distributed.sharding import gathered
from ..model.adapters import LoraAdapter

RECORD_FORMAT = 1
"""Version of [`InitRecord.state_dict`]'s layout."""


@dataclass(frozen=True)
class Fingerprint:
    """What is kept of one tensor.

    Attributes:
        digest: SHA-256 of the tensor's bytes (with its dtype and shape), first 128 bits, hex.
        norm: Frobenius norm (`nan`/`inf` when the tensor holds a non-finite value).
        nonzero: Number of non-zero elements (exact; a norm can underflow to 0 for tiny values).
        numel: Number of elements.
    """

    digest: str
    norm: float
    nonzero: int
    numel: int

    @property
    def all_zero(self) -> bool:
        """Whether every element is exactly zero."""
        return self.nonzero == 0

    @property
    def finite(self) -> bool:
        """Whether every element is finite."""
        return math.isfinite(self.norm)


@torch.no_grad()
def fingerprint(tensor: torch.Tensor) -> Fingerprint:
    """The [`Fingerprint`] of `tensor` (any device, any dtype)."""
    data = tensor.detach()
    h = hashlib.sha256()
    h.update(f"{data.dtype}{tuple(data.shape)}".encode())
    if data.numel():
        raw = data.contiguous().reshape(-1).view(torch.uint8).cpu().numpy()
        h.update(memoryview(raw))
    if data.is_floating_point() or data.is_complex():
        # float64: the norm of finite float32 weights near 1e30 overflows in float32 and would read as "not finite".
        norm = float(torch.linalg.vector_norm(data, dtype=torch.float64)) if data.numel() else 0.0
    else:
        norm = float(torch.linalg.vector_norm(data.double())) if data.numel() else 0.0
    return Fingerprint(h.hexdigest()[:32], norm, int(torch.count_nonzero(data)), int(data.numel()))


@dataclass(frozen=True)
class Movement:
    """How one adapter's A and B compare with their init.

    Attributes:
        moved_a: Whether any bit of A differs from init.
        moved_b: Whether any bit of B differs from init.
        init_a: Fingerprint of A at init.
        init_b: Fingerprint of B at init.
        now_a: Fingerprint of A now.
        now_b: Fingerprint of B now.
    """

    moved_a: bool
    moved_b: bool
    init_a: Fingerprint
    init_b: Fingerprint
    now_a: Fingerprint
    now_b: Fingerprint

    @property
    def moved(self) -> bool:
        """Whether A or B differs from init."""
        return self.moved_a or self.moved_b

    @property
    def finite(self) -> bool:
        """Whether A and B hold only finite values now."""
        return self.now_a.finite and self.now_b.finite

    @property
    def no_op(self) -> bool:
        """Whether the adapter's update `B @ A` is exactly zero now (A or B all zero)."""
        return self.now_a.all_zero or self.now_b.all_zero


def _pairs(adapters: list[LoraAdapter]) -> list[tuple[Fingerprint, Fingerprint]]:
    """`(fingerprint of A, fingerprint of B)` per adapter, of the whole weights (gathered on every rank)."""
    with gathered([p for a in adapters for p in (a.lora_A, a.lora_B)]) as whole:
        prints = [fingerprint(t) for t in whole]
    return list(zip(prints[0::2], prints[1::2]))


def _fingerprints(params: dict[str, torch.nn.Parameter]) -> dict[str, Fingerprint]:
    """Name -> fingerprint of the whole parameter (gathered on every rank)."""
    with gathered(list(params.values())) as whole:
        return {n: fingerprint(t) for n, t in zip(params, whole)}


class InitRecord:
    """Fingerprints of every adapter's A and B (and of any other trainable parameter) as they were at init.

    Take it after PEFT has initialised the adapters (PiSSA, OLoRA, LoftQ and EVA change A and B there) and before
    the first optimizer step.

    Args:
        adapters: The adapters to record.
        other_trainable: Trainable parameters that are not LoRA A / B (`modules_to_save`, trainable tokens), by
            name.

    Attributes:
        adapters: Name -> `(fingerprint of A, fingerprint of B)`.
        other: Name -> fingerprint, for the other trainable parameters.
        restored: Whether the record was loaded from a checkpoint (a resumed run) rather than taken now.
        lost: Whether the run resumed from a checkpoint that held no record: comparisons with init are then
            meaningless and [`compare`] returns nothing.
    """

    def __init__(
        self, adapters: list[LoraAdapter], other_trainable: dict[str, torch.nn.Parameter] | None = None
    ) -> None:
        self.adapters: dict[str, tuple[Fingerprint, Fingerprint]] = dict(
            zip([a.name for a in adapters], _pairs(adapters))
        )
        self.other: dict[str, Fingerprint] = _fingerprints(other_trainable or {})
        self.restored = False
        self.lost = False

    def compare(self, adapters: list[LoraAdapter]) -> dict[str, Movement]:
        """Movement since init of each recorded adapter (empty when the record was lost on resume)."""
        if self.lost:
            return {}
        out: dict[str, Movement] = {}
        recorded = [a for a in adapters if a.name in self.adapters]
        for adapter, (now_a, now_b) in zip(recorded, _pairs(recorded)):
            init = self.adapters[adapter.name]
            out[adapter.name] = Movement(
                moved_a=now_a.digest != init[0].digest,
                moved_b=now_b.digest != init[1].digest,
                init_a=init[0],
                init_b=init[1],
                now_a=now_a,
                now_b=now_b,
            )
        return out

    def compare_other(self, params: dict[str, torch.nn.Parameter]) -> dict[str, bool]:
        """Name -> whether each recorded non-LoRA trainable parameter moved since init."""
        if self.lost:
            return {}
        now = _fingerprints({n: p for n, p in params.items() if n in self.other})
        return {n: f.digest != self.other[n].digest for n, f in now.items()}

    # ---------------------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """JSON-ready form, saved with each checkpoint so a resumed run compares with the original init."""
        return {
            "format": RECORD_FORMAT,
            "lost": self.lost,
            "adapters": {n: [asdict(a), asdict(b)] for n, (a, b) in self.adapters.items()},
            "other": {n: asdict(f) for n, f in self.other.items()},
        }

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore a record saved by [`state_dict`]; `None` (a checkpoint without one) marks it lost."""
        if not state or state.get("format") != RECORD_FORMAT:
            self.lost = True
            return
        self.adapters = {n: (Fingerprint(**a), Fingerprint(**b)) for n, (a, b) in state["adapters"].items()}
        self.other = {n: Fingerprint(**f) for n, f in state.get("other", {}).items()}
        self.lost = bool(state.get("lost", False))
        self.restored = True
