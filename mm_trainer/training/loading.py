"""Load a model given by path / Hub id, and its processor, before a TRL trainer wraps the model with PEFT.

TRL's trainers load a path and wrap it with PEFT in one go (TRL 1.16 has no hook between the two), but the tower map,
the reachability probe and the 4-bit preparation need the loaded model before PEFT wraps it. So the load happens
here, with TRL's own `create_model_from_path` (its dtype, device-map and architecture defaults) and the arguments the
trainer would pass it (the rules TRL applies to them are listed in [`~mm_trainer.upstream.UPSTREAM`] (kind `mirror`) and pinned by
`tests/test_trainer.py`: the loaded model equals the one `SFTTrainer` loads itself). mm-trainer adds only the 4-bit
load arguments ([`~mm_trainer.quant.quantized_load_kwargs`]) and, where towers are to be released, leaves them
unloaded ([`~mm_trainer.model.loading`]).
"""

from __future__ import annotations

import logging
from typing import Any

from transformers import AutoConfig, AutoProcessor, set_seed

from ..distributed.engine import Engine
from ..model.loading import UnloadedTowers, load_without, plan_unloaded
from ..model.modality import ModalityProfile
from ..model.model_class import meta_model
from ..quant import check_loaded_model, quantized_load_kwargs
from ..upstream import trl_create_model_from_path, trl_default_device_map

logger = logging.getLogger(__name__)


def load_model_and_processor(
    model: Any,
    args: Any,
    quantization_config: Any,
    processing_class: Any,
    profile: ModalityProfile,
    release: bool,
    engine: Engine,
) -> tuple[Any, Any, list[tuple[str, str]]]:
    """The model (loaded when given by path / id) and its processor, as the TRL trainer would have them.

    Args:
        model: A path / Hub id, or a model instance (returned as it is).
        args: The trainer's own copy of its config (`model_init_kwargs` is consumed on it).
        quantization_config: The trainer's `quantization_config` argument.
        processing_class: The trainer's `processing_class` argument (`None`: loaded from the model's path).
        profile: The training data's modality profile (which towers a path load may leave out).
        release: Whether towers the data never reaches are to be released: they are then never materialized.
        engine: The run's engine.

    Returns:
        The model, the processor and the `(path, tower)` roots of the towers left unloaded.
    """
    set_seed(args.seed)  # as TRL: adapter init and any missing weights depend on the seed
    revision = None
    unloaded: list[tuple[str, str]] = []
    if isinstance(model, str):
        kwargs = dict(args.model_init_kwargs or {})
        if quantization_config is not None:
            if "quantization_config" in kwargs:
                raise ValueError(  # TRL's words (SFTTrainer raises the same on this input)
                    "You set `quantization_config` both as a trainer argument and in `args.model_init_kwargs`. "
                    "Please set it in only one place, preferably as a trainer argument."
                )
            kwargs["quantization_config"] = quantization_config
        if args.distributed_state.distributed_type in ("MULTI_GPU", "DEEPSPEED"):
            kwargs["device_map"] = None  # as TRL: "auto" fails under distributed training
        kwargs.setdefault("trust_remote_code", args.trust_remote_code)
        revision = kwargs.get("revision")
        if args.quantization is not None:
            kwargs = quantized_load_kwargs(model, kwargs, args)  # nf4 with full-precision towers (QLoRA)
        plan = unloaded_towers(model, kwargs, args, profile, engine) if release else None
        if plan is not None:
            model_id = model
            model = load_without(trl_create_model_from_path, model_id, kwargs, plan)
            unloaded = plan.roots
        else:
            model = trl_create_model_from_path(model, **kwargs)
        args.model_init_kwargs = None  # consumed (on the trainer's copy): TRL would warn they are ignored
    check_loaded_model(model, args.quantization)  # refuses other quantization methods
    if processing_class is None:
        processing_class = AutoProcessor.from_pretrained(
            model.config.name_or_path, revision=revision, trust_remote_code=args.trust_remote_code
        )
    return model, processing_class, unloaded


def unloaded_towers(
    model_id: str, kwargs: dict[str, Any], args: Any, profile: ModalityProfile, engine: Engine
) -> UnloadedTowers | None:
    """The towers a load of `model_id` can leave out: unreached by the data, not selected, under an engine the
    release goes with (`None` when there are none, or the load cannot place them apart)."""
    if engine.shards_parameters:
        # FSDP1 refuses the release, FSDP's cpu_ram_efficient_loading and ZeRO-3's zero.Init place weights at load
        # themselves: under sharded engines the towers are loaded, then released as decided on the loaded model.
        return None
    reached = set(profile.reached_towers())
    selected = set(args.target_towers) if isinstance(args.target_towers, (list, tuple)) else set()
    trust = bool(kwargs.get("trust_remote_code"))
    config = AutoConfig.from_pretrained(model_id, revision=kwargs.get("revision"), trust_remote_code=trust)
    meta = meta_model(config, trust)
    plan, reason = plan_unloaded(meta, kwargs.get("device_map", trl_default_device_map()), reached, selected)
    if reason is not None:
        logger.warning("Unreached towers are loaded, then released (the peak memory holds them): %s.", reason)
    return plan
