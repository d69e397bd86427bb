"""Which distributed engine a run's arguments select (read before the Trainer builds its accelerator)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from .sharding import is_zero3_param


@dataclass(frozen=True)
class Engine:
    """The engine a run will train under.

    Attributes:
        fsdp_version: 1 or 2 under FSDP, else ``None``.
        zero_stage: DeepSpeed ZeRO stage (0-3), else ``None``.
        cpu_ram_efficient_loading: FSDP loads the weights on the first rank only (the others hold meta tensors).
    """

    fsdp_version: int | None = None
    zero_stage: int | None = None
    cpu_ram_efficient_loading: bool = False

    @property
    def name(self) -> str:
        """``"fsdp1"``, ``"fsdp2"``, ``"zero<stage>"`` or ``"plain"`` (single process or DDP)."""
        if self.fsdp_version is not None:
            return f"fsdp{self.fsdp_version}"
        if self.zero_stage is not None:
            return f"zero{self.zero_stage}"
        return "plain"

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


def _env_true(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes")


def detect_engine(args: Any) -> Engine:
    """The engine selected by ``args`` (``TrainingArguments``) or by ``accelerate launch``'s environment."""
    plugin = getattr(args, "deepspeed_plugin", None)
    if plugin is not None:
        return Engine(zero_stage=int(getattr(plugin, "zero_stage", 0) or 0))
    fsdp_args = getattr(args, "fsdp_plugin_args", None)
    if fsdp_args:
        return Engine(
            fsdp_version=int(fsdp_args.get("fsdp_version", 2)),
            cpu_ram_efficient_loading=bool(fsdp_args.get("cpu_ram_efficient_loading", False)),
        )
    if _env_true("ACCELERATE_USE_FSDP"):
        return Engine(
            fsdp_version=int(os.environ.get("FSDP_VERSION", "1")),
            cpu_ram_efficient_loading=_env_true("FSDP_CPU_RAM_EFFICIENT_LOADING"),
        )
    if _env_true("ACCELERATE_USE_DEEPSPEED"):
        return Engine(zero_stage=int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")))
    return Engine()


def is_zero3_partitioned(model: Any) -> bool:
    """True when ``model``'s weights are already partitioned by DeepSpeed ZeRO-3 (``zero.Init`` at load)."""
    return any(is_zero3_param(p) for p in model.parameters())


def probe_blocker(model: Any, engine: Engine) -> str | None:
    """Why the reachability probe cannot run on ``model`` here (``None``: it can). The answer is the same on every
    rank, so every rank resolves the same targets."""
    if is_zero3_partitioned(model):
        return (
            "DeepSpeed ZeRO-3 partitioned the weights at load (`zero3_init_flag`), and a probe forward would need the "
            "whole model gathered on every rank"
        )
    if engine.fsdp_version is not None and engine.cpu_ram_efficient_loading:
        return "FSDP's `cpu_ram_efficient_loading` holds the weights on the first rank only"
    return None
