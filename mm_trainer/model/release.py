"""Release the weights of towers the data never reaches (e.g. the vision tower of a VLM trained on text only).

Only the *weights* go: every parameter and buffer of the tower is replaced by an empty (0-element) tensor of the same
dtype on the same device. The module itself stays where it was, with its class, `config`, `.device` and `.dtype`
(models read these on text-only forwards, e.g. Qwen2-Audio's `self.audio_tower.device`), so `_no_split_modules`
and any `transformer_layer_cls_to_wrap` keep naming classes that exist, and sharding engines wrap the model as they
would the full one. Calling any module of a released tower raises an error that says how to fix it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..distributed.engine import Engine, is_zero3_partitioned
from .targets import TargetPlan
from .towers import NON_TEXT_TOWERS

logger = logging.getLogger(__name__)


class ReleasedTowerError(RuntimeError):
    """A module of a tower whose weights mm-trainer released was called (the data needs the tower after all)."""


@dataclass
class ReleaseRecord:
    """One released tower.

    Attributes:
        path: Module path of the tower root in the base model.
        tower: Its tower name (`vision`, `audio`).
        module_class: Class name of the tower root.
        params: Parameters released (their element count before the release).
        bytes: Bytes of parameters and buffers released.
        kept_shared: Tensors left in place because a module outside the tower shares them (tied weights).
    """

    path: str
    tower: str
    module_class: str
    params: int
    bytes: int
    kept_shared: int = 0
    hooks: list[Any] = field(default_factory=list, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "path": self.path,
            "tower": self.tower,
            "class": self.module_class,
            "params": self.params,
            "bytes": self.bytes,
            "kept_shared": self.kept_shared,
        }


def releasable_roots(plan: TargetPlan) -> list[tuple[str, str]]:
    """Tower roots `(path, tower)` that are safe to release under `plan`.

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


def _refuse(path: str, module_class: str) -> Any:
    def hook(module: nn.Module, args: Any, kwargs: Any) -> None:
        raise ReleasedTowerError(
            f"The {module_class} at `{path}` was released by mm_trainer (its weights were freed) because the training "
            "data never reaches it (`free_unreached_towers`). The data now fed to the model needs it: set "
            "`free_unreached_towers=False` in MMSFTConfig, or declare the modalities your data holds with "
            "`data_modalities=[...]`; for inference with this kind of input, load the saved adapter onto a fresh base "
            "model."
        )

    return hook


def _own_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters registered on `module` itself (not its children), shared ones under each name."""
    return list(module.named_parameters(recurse=False, remove_duplicate=False))


def _own_buffers(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The buffers registered on `module` itself (not its children), shared ones under each name."""
    return list(module.named_buffers(recurse=False, remove_duplicate=False))


def _empty_like(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(0, dtype=t.dtype, device=t.device)


def release_towers(model: nn.Module, roots: list[tuple[str, str]]) -> list[ReleaseRecord]:
    """Free the parameters and buffers of each tower root in `roots`, keeping the modules in place.

    Each parameter becomes a new frozen 0-element `nn.Parameter` (same dtype and device), each buffer a 0-element
    tensor; tensors tied to a module outside the tower are left as they are. Every module of the tower gets a forward
    pre-hook that raises [`ReleasedTowerError`] with the fix. Nothing in mm-trainer keeps a reference to the old
    tensors, so their memory is returned once the caller drops its own references.

    Args:
        model: The base model (before PEFT wraps it, before any engine shards it).
        roots: `(path, tower)` pairs, e.g. from [`releasable_roots`].

    Returns:
        What was released.
    """
    records = []
    for path, tower in roots:
        root = model.get_submodule(path)
        prefix = path + "."
        outside = {id(t) for n, t in model.named_parameters(remove_duplicate=False) if not n.startswith(prefix)}
        outside |= {id(t) for n, t in model.named_buffers(remove_duplicate=False) if not n.startswith(prefix)}
        replaced: dict[int, torch.Tensor] = {}  # old tensor id -> its empty stand-in (keeps ties inside the tower)
        params = nbytes = kept = 0
        for module in root.modules():
            for name, p in _own_parameters(module):
                if id(p) in outside:
                    kept += 1
                    continue
                if id(p) not in replaced:
                    params += p.numel()
                    nbytes += p.numel() * p.element_size()
                    replaced[id(p)] = nn.Parameter(_empty_like(p), requires_grad=False)
                setattr(module, name, replaced[id(p)])  # nn.Module keeps it registered as a parameter
            for name, b in _own_buffers(module):
                if id(b) in outside:
                    kept += 1
                    continue
                if id(b) not in replaced:
                    nbytes += b.numel() * b.element_size()
                    replaced[id(b)] = _empty_like(b)
                setattr(module, name, replaced[id(b)])  # and as a buffer (persistent or not, as it was)
        module_class = type(root).__name__
        hooks = [m.register_forward_pre_hook(_refuse(path, module_class), with_kwargs=True) for m in root.modules()]
        records.append(ReleaseRecord(path, tower, module_class, params, nbytes, kept, hooks))
        logger.info(
            "Released the weights of %s at %s: %s params, %.1f MB", module_class, path, f"{params:,}", nbytes / 2**20
        )
    return records


@dataclass(frozen=True)
class ReleaseBlocker:
    """Why towers are not released under an engine.

    Attributes:
        reason: The reason, with the fix where there is one.
        refuse: True when an explicit `free_unreached_towers=True` cannot work and must be refused at start-up.
    """

    reason: str
    refuse: bool


def release_blocker(engine: Engine, model: nn.Module) -> ReleaseBlocker | None:
    """Why the towers of `model` must not be released under `engine` (`None`: release composes with it).

    FSDP2 shards each released module's empty tensors like any others, DDP and ZeRO-1/2 ignore frozen empty
    parameters, and ZeRO-3 partitions them when the engine starts. FSDP1 flattens every wrapped module into one flat
    parameter and is not supported; weights that `zero.Init` partitioned at load are already spread over the ranks.
    """
    if engine.fsdp_version == 1:
        return ReleaseBlocker(
            "FSDP1 flattens each wrapped module's weights into one flat parameter, which mm-trainer does not release "
            "into. Use FSDP2 (`fsdp_config={'version': 2}` or `fsdp_version: 2` in the accelerate config), or set "
            "`free_unreached_towers=False`.",
            refuse=True,
        )
    if engine.zero_stage == 3 and is_zero3_partitioned(model):
        return ReleaseBlocker(
            "DeepSpeed ZeRO-3 partitioned the weights at load (`zero3_init_flag`), so each rank already holds only its "
            "1/world share of the unreached towers. Load the model without `zero3_init_flag` to release them.",
            refuse=False,
        )
    return None


def release_unloaded_towers(model: nn.Module, roots: list[tuple[str, str]]) -> list[ReleaseRecord]:
    """Release towers that were never loaded (their tensors left on the meta device at load, see
    [`mm_trainer.model.loading`]), ending in exactly the state [`release_towers`] leaves a loaded tower in.

    The records count the parameters and bytes the towers would have held (from the meta tensors' shapes and dtypes);
    every meta tensor of the towers then becomes a 0-element tensor of its dtype on the device the rest of the model
    is on (ties inside a tower kept).
    """
    records = release_towers(model, roots)
    prefixes = tuple(path + "." for path, _ in roots)
    device = next(
        (p.device for n, p in model.named_parameters() if not p.is_meta and not n.startswith(prefixes)),
        torch.device("cpu"),
    )
    for path, _ in roots:
        stand_ins: dict[int, torch.Tensor] = {}
        for module in model.get_submodule(path).modules():
            for name, p in _own_parameters(module):
                if p.is_meta:
                    if id(p) not in stand_ins:
                        stand_ins[id(p)] = nn.Parameter(torch.empty(0, dtype=p.dtype, device=device), False)
                    setattr(module, name, stand_ins[id(p)])
            for name, b in _own_buffers(module):
                if b.is_meta:
                    if id(b) not in stand_ins:
                        stand_ins[id(b)] = torch.empty(0, dtype=b.dtype, device=device)
                    setattr(module, name, stand_ins[id(b)])
    return records
