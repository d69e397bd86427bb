"""EVA initialisation (Paischer et al., 2024) through PEFT, on the adapters every training batch reaches.

PEFT's `initialize_lora_eva_weights` hooks the input of *every* LoRA layer and needs each to fire on every batch
it sees: on its first batch it hashes each layer's input (a layer that did not run fails there), then it cycles the
data until each layer's components converge (a layer that never runs again never converges). On a VLM that is
broken twice over: vision / audio adapters do not run on text-only batches of mixed data, and some language layers
(Mllama's cross-attention) run only with images. Target resolution already drops modules the data never reaches;
here EVA additionally runs only on adapters every batch reaches:

* adapters of the language / output / other towers, and of a vision or audio tower (and the projector) only when
  every sampled row of the data holds that modality;
* of those, the ones that actually ran on the first EVA batch (agreed across ranks).

The other adapters keep PEFT's standard initialisation (`A` Kaiming-uniform, `B` zero). EVA reads activations
from a fixed list of training batches (at most [`EVA_MAX_BATCHES`]), with the adapters disabled, and the global
RNG state is restored afterwards so the training data order does not change.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import torch
from torch import nn

from ..distributed.engine import Engine
from ..model.adapters import lora_adapters
from ..model.peft_names import peft_path
from ..model.towers import TowerMap

logger = logging.getLogger(__name__)

EVA_MAX_BATCHES = 32
"""Training batches EVA cycles over (PEFT's loop runs until the components converge)."""

_VIEW_PREFIX = "model."


def eva_requested(peft_config: Any) -> bool:
    """Whether the config asks for EVA (`init_lora_weights="eva"`)."""
    return getattr(peft_config, "init_lora_weights", None) == "eva"


@dataclass
class EvaReport:
    """What EVA initialised.

    Attributes:
        modules: Adapters (base-model paths) whose `A` EVA set, with their final rank.
        standard_init: Adapters that kept PEFT's standard initialisation, with the reason.
        batches: Training batches EVA cycled over.
    """

    modules: dict[str, int] = field(default_factory=dict)
    standard_init: dict[str, str] = field(default_factory=dict)
    batches: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (the audit's `eva` section)."""
        return {
            "modules": len(self.modules),
            "ranks": self.modules,
            "standard_init": self.standard_init,
            "batches": self.batches,
        }


def towers_in_every_batch(profile: Any) -> set[str]:
    """Towers every batch of the data reaches: the text towers, plus a media tower (and the projector) when every
    sampled row holds that medium."""
    towers = {"language", "output", "other"}
    if getattr(profile, "declared", False):
        return towers
    rows = getattr(profile, "rows_sampled", 0)
    rows_with = getattr(profile, "rows_with", {}) or {}
    for modality, tower in (("image", "vision"), ("video", "vision"), ("audio", "audio")):
        if rows and rows_with.get(modality, 0) == rows:
            towers |= {tower, "projector"}
    return towers


class _BaseModelView(nn.Module):
    """The PEFT-wrapped transformers model seen without `peft_config`: PEFT's EVA then hooks exactly the modules
    named in the config it is given instead of every LoRA layer."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model


def _flatten_tokens(layer_input: Any, model_input: Any, layer_name: str) -> torch.Tensor:
    """Layer input as (tokens, features) for towers without a token mask (vision patches, audio frames)."""
    x = layer_input[0] if isinstance(layer_input, (tuple, list)) else layer_input
    return x.reshape(-1, x.shape[-1])


def _model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in batch.items() if k != "labels"}


def _fired_on(model: nn.Module, batch: dict[str, Any], names: list[str]) -> set[str]:
    """Which of `names` (paths inside `model`) run on `batch`."""
    fired: set[str] = set()
    handles = [model.get_submodule(n).register_forward_hook(lambda *_, n=n: fired.add(n)) for n in names]
    try:
        with torch.no_grad():
            model(**_model_inputs(batch), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return fired


def _agree_across_ranks(names: list[str], local: set[str], engine: Engine | None) -> set[str]:
    """The names in `local` on every rank (EVA gathers layer inputs across ranks: all must hook the same layers)."""
    if engine is None or not engine.distributed:
        return set(local)
    flags = engine.sum(torch.tensor([n in local for n in names], dtype=torch.int32, device=engine.device))
    return {n for n, f in zip(names, flags.tolist()) if f == engine.world_size}


def _batches(dataloader: Any, limit: int) -> list[dict[str, Any]]:
    """Up to `limit` batches, leaving the global RNG as it was (the Trainer's sampler draws its seed from it)."""
    cpu_state = torch.random.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        return list(islice(iter(dataloader), limit))
    finally:
        torch.random.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


def initialize_eva(
    peft_model: nn.Module,
    dataloader: Iterable[dict[str, Any]] | Callable[[], Iterable[dict[str, Any]]],
    tower_map: TowerMap,
    profile: Any,
    show_progress_bar: bool = True,
    adapter_name: str = "default",
    max_batches: int = EVA_MAX_BATCHES,
    engine: Engine | None = None,
) -> EvaReport | None:
    """EVA-initialise the adapters of `peft_model` that every batch of `dataloader` reaches.

    Args:
        peft_model: The PEFT model, created with `init_lora_weights="eva"` (`B` is zero, nothing trained yet).
        dataloader: Training batches, or a callable returning them (`trainer.get_train_dataloader`), called only
            when the config asks for EVA.
        tower_map: The base model's tower map.
        profile: The data's [`~mm_trainer.model.modality.ModalityProfile`].
        show_progress_bar: PEFT's convergence progress bar.
        adapter_name: The PEFT adapter.
        max_batches: Batches EVA cycles over.
        engine: The run's engine: under several ranks, the adapters EVA initialises are those every rank's first
            batch runs.

    Returns:
        The [`EvaReport`], or `None` when the config does not ask for EVA.
    """
    from peft.tuners.lora.eva import (
        get_eva_state_dict,
        initialize_lora_eva_weights,
        prepare_layer_inputs_fn_language_modeling,
        prepare_model_inputs_fn_language_modeling,
    )

    peft_configs = getattr(peft_model, "peft_config", None)
    if not isinstance(peft_configs, dict) or not eva_requested(peft_configs.get(adapter_name)):
        return None
    config = peft_configs[adapter_name]
    report = EvaReport()
    adapters = lora_adapters(peft_model, tower_map, adapter_name)
    every_batch = towers_in_every_batch(profile)
    candidates = []
    for adapter in adapters:
        if adapter.tower in every_batch and hasattr(adapter.module, "base_layer"):
            candidates.append(adapter)
        else:
            report.standard_init[adapter.name] = f"{adapter.tower} tower: not reached by every batch"
    batches = _batches(dataloader() if callable(dataloader) else dataloader, max_batches)
    if not batches:
        raise ValueError("EVA initialisation needs training batches, but the training dataloader is empty.")
    report.batches = len(batches)
    inner = peft_model.get_base_model()
    device = next(p for p in inner.parameters()).device
    batches = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()} for b in batches]
    was_training = peft_model.training
    peft_model.eval()
    with peft_model.disable_adapter():
        fired = _fired_on(inner, batches[0], [a.name for a in candidates])
    fired = _agree_across_ranks([a.name for a in candidates], fired, engine)
    for adapter in [a for a in candidates if a.name not in fired]:
        report.standard_init[adapter.name] = "did not run on the first EVA batch"
    candidates = [a for a in candidates if a.name in fired]
    if not candidates:
        raise ValueError(
            "EVA initialisation found no adapter that every training batch reaches. Use another `init_lora_weights`, "
            "or target modules of the language model."
        )

    hooked = {f"{_VIEW_PREFIX}{a.name}.base_layer": a for a in candidates}
    view_config = copy.copy(config)
    view_config.target_modules = set(hooked)
    view_config.exclude_modules = None
    view_config.layers_to_transform = None
    view_config.layers_pattern = None
    view_config.rank_pattern = {n: a.module.r[adapter_name] for n, a in hooked.items()}
    layer_fns = {
        n: prepare_layer_inputs_fn_language_modeling if a.tower in ("language", "output", "other") else _flatten_tokens
        for n, a in hooked.items()
    }

    def forward(view: nn.Module, batch: dict[str, Any]) -> Any:
        return view.model(**_model_inputs(batch), use_cache=False)

    try:
        with peft_model.disable_adapter():
            state = get_eva_state_dict(
                _BaseModelView(inner),
                dataloader=batches,
                peft_config=view_config,
                forward_fn=forward,
                prepare_model_inputs_fn=prepare_model_inputs_fn_language_modeling,
                prepare_layer_inputs_fn=layer_fns,
                adapter_name=adapter_name,
                show_progress_bar=show_progress_bar,
            )
        eva_state = {peft_path(hooked[n].name): v for n, v in state.items()}
        with warnings.catch_warnings():
            # PEFT warns that the adapters left out "are not supported by EVA"; they were left out on purpose.
            warnings.filterwarnings("ignore", message=".*not found in the eva state_dict.*")
            initialize_lora_eva_weights(peft_model, eva_state_dict=eva_state, adapter_name=adapter_name)
    finally:
        peft_model.train(was_training)
    modules = dict(peft_model.named_modules())
    for adapter in candidates:
        layer = modules.get(peft_path(adapter.name))
        rank = layer.r.get(adapter_name, 0) if layer is not None and hasattr(layer, "r") else 0
        report.modules[adapter.name] = int(rank)
    if report.standard_init:
        logger.info(
            "EVA initialised %d adapter(s); %d kept the standard init (not reached by every batch).",
            len(report.modules),
            len(report.standard_init),
        )
    return report
