"""IMoD masks: a seeded element-wise split of every LoRA `A` into text, non-text and shared zones.

For one LoRA layer with `A` of shape `r x d` the three binary masks `M_t` (text-exclusive), `M_o` (non-text
exclusive) and `M_s` (shared) cover `A` exactly once: `M_t + M_o + M_s = 1` element-wise. We store them as one
`uint8` *zone* tensor ([`TEXT_ZONE`], [`NON_TEXT_ZONE`], [`SHARED_ZONE`] per element), which makes
"covers exactly once" true by construction and costs one byte per element of `A`.

Choices where the paper is silent:

- **Layer position.** `r_s(l) = r_s(0) + alpha * l / L` with `l` the zero-based index of the block the adapter
  sits in and `L` the length of that block stack, read from the model (the *outermost* `nn.ModuleList` on the
  module's path, e.g. `model.language_model.layers`; a MoE expert list inside a layer does not count). The
  deepest block therefore gets `r_s(0) + alpha * (L - 1) / L`, as the formula says. A module that sits in no
  numbered stack (an `lm_head`, a projector) gets `r_s(0)` and is recorded with `layer = None`.
- **Exact counts.** `n = r * d` elements; `n_s = round(r_s * n)` shared, the rest split evenly,
  `n_t = (n - n_s) // 2` text and `n_o = n - n_s - n_t` non-text (the odd element goes to non-text).
- **Random interleaving.** One permutation of the `n` elements from NumPy's legacy `RandomState` (whose stream
  NumPy keeps frozen across versions), seeded by `sha256(f"{seed}:{module name}")`: the first `n_t` positions are
  text, the next `n_o` non-text, the rest shared. Masks depend only on (seed, name, shape, ratio), so every DDP rank
  and every resumed run builds the same ones; [`IMoDMasks.fingerprint`] (sha256 over names, shapes and zones)
  verifies it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..model.adapters import LoraAdapter
from ..model.peft_names import strip_peft_prefix

TEXT_ZONE, NON_TEXT_ZONE, SHARED_ZONE = 0, 1, 2
"""Zone codes of an element of `A`: text-exclusive (`M_t`), non-text-exclusive (`M_o`), shared (`M_s`)."""

_INDEX = re.compile(r"^\d+$")


def shared_ratio(base_ratio: float, alpha: float, layer: int | None, num_layers: int | None) -> float:
    """The shared ratio `r_s(l) = r_s(0) + alpha * l / L` (`r_s(0)` for a module outside a layer stack)."""
    if layer is None or not num_layers:
        return float(base_ratio)
    return float(base_ratio) + float(alpha) * layer / num_layers


def layer_stacks(model: nn.Module) -> dict[str, int]:
    """Every non-empty `nn.ModuleList` (the containers transformers builds layer stacks with): path -> length.

    `nn.Sequential` is left out: it holds the sub-layers of one block (a projector's MLP), not a stack of blocks.
    """
    stacks: dict[str, int] = {}
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            stacks[strip_peft_prefix(path)] = len(module)
    return stacks


def layer_position(name: str, stacks: dict[str, int]) -> tuple[int | None, int | None]:
    """`(l, L)` of module `name`: its index in the outermost numbered stack on its path, and that stack's length.

    Args:
        name: Module path as in the base model (`model.language_model.layers.3.self_attn.q_proj`).
        stacks: Output of [`layer_stacks`].

    Returns:
        `(None, None)` when no numbered stack holds the module.
    """
    parts = name.split(".")
    for i in range(1, len(parts)):
        prefix = ".".join(parts[:i])
        if prefix in stacks and _INDEX.match(parts[i]):
            return int(parts[i]), stacks[prefix]
    return None, None


def mask_seed(seed: int, name: str) -> int:
    """32-bit seed of one module's permutation, from the run seed and the module path."""
    digest = hashlib.sha256(f"{int(seed)}:{name}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def zone_counts(numel: int, ratio: float) -> tuple[int, int, int]:
    """`(n_t, n_o, n_s)` for `numel` elements and shared ratio `ratio`."""
    n_s = min(numel, max(0, round(ratio * numel)))
    n_t = (numel - n_s) // 2
    return n_t, numel - n_s - n_t, n_s


def build_zone(shape: tuple[int, int], ratio: float, seed: int, name: str) -> torch.Tensor:
    """The seeded zone tensor (`uint8`, `shape`) of one module; see the module docstring."""
    numel = int(shape[0]) * int(shape[1])
    n_t, n_o, _ = zone_counts(numel, ratio)
    order = np.random.RandomState(mask_seed(seed, name)).permutation(numel)
    zone = np.full(numel, SHARED_ZONE, dtype=np.uint8)
    zone[order[:n_t]] = TEXT_ZONE
    zone[order[n_t : n_t + n_o]] = NON_TEXT_ZONE
    return torch.from_numpy(zone.reshape(shape))


@dataclass
class LayerMask:
    """The IMoD masks of one LoRA `A`.

    Attributes:
        name: Adapted module path as in the base model.
        layer: Index `l` in its layer stack (`None` outside one).
        num_layers: Length `L` of that stack (`None` outside one).
        ratio: Target shared ratio `r_s(l)`.
        zone: `uint8` tensor shaped like `A` (CPU); [`TEXT_ZONE`] / [`NON_TEXT_ZONE`] / [`SHARED_ZONE`].
    """

    name: str
    layer: int | None
    num_layers: int | None
    ratio: float
    zone: torch.Tensor

    def masks(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(M_t, M_o, M_s)` as boolean tensors."""
        return self.zone == TEXT_ZONE, self.zone == NON_TEXT_ZONE, self.zone == SHARED_ZONE

    def counts(self) -> dict[str, int]:
        """Elements per zone."""
        binc = torch.bincount(self.zone.flatten().long(), minlength=3).tolist()
        return {"text": binc[TEXT_ZONE], "non_text": binc[NON_TEXT_ZONE], "shared": binc[SHARED_ZONE]}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no tensor)."""
        counts = self.counts()
        numel = self.zone.numel()
        return {
            "name": self.name,
            "layer": self.layer,
            "num_layers": self.num_layers,
            "shape": list(self.zone.shape),
            "shared_ratio": round(self.ratio, 6),
            "ratios": {k: round(v / numel, 6) for k, v in counts.items()},
            "counts": counts,
        }


class IMoDMasks:
    """The masks of every IMoD-constrained LoRA layer of one run.

    Args:
        layers: One [`LayerMask`] per adapter, in model order.
        seed: Seed the masks were drawn with.
        base_ratio: `r_s(0)`.
        alpha: Growth of the shared ratio with depth.
    """

    def __init__(self, layers: list[LayerMask], seed: int, base_ratio: float, alpha: float) -> None:
        self.layers = layers
        self.by_name = {m.name: m for m in layers}
        self.seed = int(seed)
        self.base_ratio = float(base_ratio)
        self.alpha = float(alpha)

    @classmethod
    def build(
        cls,
        adapters: Iterable[LoraAdapter],
        model: nn.Module,
        seed: int,
        base_ratio: float,
        alpha: float,
    ) -> IMoDMasks:
        """Draw the masks of `adapters` (their `lora_A` shapes), with layer positions read from `model`."""
        stacks = layer_stacks(model)
        layers = []
        for adapter in adapters:
            layer, num_layers = layer_position(adapter.name, stacks)
            ratio = shared_ratio(base_ratio, alpha, layer, num_layers)
            zone = build_zone(tuple(adapter.lora_A.shape), ratio, seed, adapter.name)
            layers.append(LayerMask(adapter.name, layer, num_layers, ratio, zone))
        return cls(layers, seed, base_ratio, alpha)

    def fingerprint(self) -> str:
        """sha256 over every layer's name, shape and zones: equal fingerprints mean identical masks."""
        digest = hashlib.sha256()
        for mask in sorted(self.layers, key=lambda m: m.name):
            digest.update(mask.name.encode())
            digest.update(str(tuple(mask.zone.shape)).encode())
            digest.update(mask.zone.contiguous().numpy().tobytes())
        return digest.hexdigest()

    def settings(self) -> dict[str, Any]:
        """What determines the masks besides the model: seed and ratios."""
        return {"seed": self.seed, "shared_ratio": self.base_ratio, "alpha": self.alpha}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record for the audit and the checkpoint state."""
        return {**self.settings(), "fingerprint": self.fingerprint(), "layers": [m.to_dict() for m in self.layers]}
