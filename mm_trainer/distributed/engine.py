"""The engine a run trains under, as one value: which one, whether it shards parameters, and its collectives.

[`detect_engine`] computes it once from the training arguments (and `accelerate launch`'s environment), before the
Trainer builds its accelerator, so that the decisions taken before the model is wrapped (probe, tower release,
loading) and the ones taken while training (sums over ranks, sharded saves, gradient capture) read the same value.
Every sum over ranks in mm-trainer goes through [`Engine.sum`] (or [`Engine.mean`], [`Engine.start_sum`]).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

from .sharding import is_zero3_param

ENGINE_NAMES: tuple[str, ...] = ("single", "ddp", "fsdp1", "fsdp2", "zero0", "zero1", "zero2", "zero3")
"""Every value [`Engine.name`] takes."""


@dataclass(frozen=True)
class Engine:
    """The engine a run trains under.

    Attributes:
        fsdp_version: 1 or 2 under FSDP, else `None`.
        zero_stage: DeepSpeed ZeRO stage (0-3), else `None`.
        cpu_ram_efficient_loading: FSDP loads the weights on the first rank only (the others hold meta tensors).
        world_size: Number of processes (ranks).
        device: The device this rank's collectives run on (the process's accelerator device).
    """

    fsdp_version: int | None = None
    zero_stage: int | None = None
    cpu_ram_efficient_loading: bool = False
    world_size: int = 1
    device: torch.device = field(default=torch.device("cpu"), compare=False)

    @property
    def name(self) -> str:
        """One of [`ENGINE_NAMES`]: `"fsdp1"`, `"fsdp2"`, `"zero<stage>"`, `"ddp"` (any other multi-process data
        parallel) or `"single"`."""
        if self.fsdp_version is not None:
            return f"fsdp{self.fsdp_version}"
        if self.zero_stage is not None:
            return f"zero{self.zero_stage}"
        return "ddp" if self.distributed else "single"

    @property
    def distributed(self) -> bool:
        """Whether several ranks train together (every sum over ranks is then a collective)."""
        return self.world_size > 1

    @property
    def deepspeed(self) -> bool:
        """Whether DeepSpeed runs the model: its optimizer step runs inside `accelerator.backward`, and `p.grad` is
        gone afterwards (gradients live in its own partitions)."""
        return self.zero_stage is not None

    @property
    def fsdp2(self) -> bool:
        """Whether FSDP2 shards the model (every parameter a `DTensor` after `accelerator.prepare`)."""
        return self.fsdp_version == 2

    @property
    def shards_parameters(self) -> bool:
        """True when parameters are sharded across ranks and gathered in each module's forward (FSDP, ZeRO-3): then
        every rank must run the same modules on every micro-batch, or the gathers stop matching."""
        return self.fsdp_version is not None or self.zero_stage == 3

    @property
    def forward_without_collectives(self) -> bool:
        """True when the model's forward runs no collective (DeepSpeed ZeRO-0/1/2): one started just before it can
        complete while it runs. DDP broadcasts buffers as its forward starts; FSDP and ZeRO-3 gather parameters."""
        return self.zero_stage is not None and self.zero_stage < 3

    # -- collectives ------------------------------------------------------------------------------------------------
    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` summed over the ranks, on [`device`] (`tensor` itself on one rank). A collective: every rank
        calls it at the same point with a tensor of the same shape."""
        if not self.distributed:
            return tensor
        from accelerate.utils import reduce

        return reduce(tensor.to(self.device), reduction="sum")

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` averaged over the ranks (see [`sum`])."""
        if not self.distributed:
            return tensor
        from accelerate.utils import reduce

        return reduce(tensor.to(self.device), reduction="mean")

    def start_sum(self, tensor: torch.Tensor) -> Any:
        """Start summing `tensor` over the ranks in place, without waiting; returns the work handle (`.wait()`).

        For a sum that may complete while other work runs: only where no other collective runs before the handle is
        waited on (see [`forward_without_collectives`]).
        """
        return torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM, async_op=True)


def _env_true(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes")


def detect_engine(args: Any) -> Engine:
    """The engine selected by `args` (`TrainingArguments`) or by `accelerate launch`'s environment."""
    world_size = int(getattr(args, "world_size", 1) or 1)
    device = getattr(args, "device", None)
    common = {"world_size": world_size, "device": device if isinstance(device, torch.device) else torch.device("cpu")}
    plugin = getattr(args, "deepspeed_plugin", None)
    if plugin is not None:
        return Engine(zero_stage=int(getattr(plugin, "zero_stage", 0) or 0), **common)
    fsdp_args = getattr(args, "fsdp_plugin_args", None)
    if fsdp_args:
        return Engine(
            fsdp_version=int(fsdp_args.get("fsdp_version", 2)),
            cpu_ram_efficient_loading=bool(fsdp_args.get("cpu_ram_efficient_loading", False)),
            **common,
        )
    if _env_true("ACCELERATE_USE_FSDP"):
        return Engine(
            fsdp_version=int(os.environ.get("FSDP_VERSION", "1")),
            cpu_ram_efficient_loading=_env_true("FSDP_CPU_RAM_EFFICIENT_LOADING"),
            **common,
        )
    if _env_true("ACCELERATE_USE_DEEPSPEED"):
        return Engine(zero_stage=int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")), **common)
    return Engine(**common)


def is_zero3_partitioned(model: Any) -> bool:
    """True when `model`'s weights are already partitioned by DeepSpeed ZeRO-3 (`zero.Init` at load)."""
    return any(is_zero3_param(p) for p in model.parameters())
