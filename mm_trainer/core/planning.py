"""What a run decides before PEFT wraps the model: the data's modalities, the tower map, the targets, the release.

Every function takes its inputs explicitly: the training arguments (a `TrainingArguments` with mm-trainer's fields,
see [`~mm_trainer.training.config.MultimodalArguments`]), the model, the PEFT config, the modality profile, the
[`~mm_trainer.distributed.engine.Engine`] and, for the probe, a function that returns a collated batch of training
rows (each trainer builds it with its own collator). [`RunPlan`] holds the result.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..distributed.engine import Engine, is_zero3_partitioned
from ..model.modality import NON_TEXT_MODALITIES, ModalityProfile, profile_dataset
from ..model.plan_report import print_plan
from ..model.probe import ProbeResult, ProbeSettings, probe_reachability
from ..model.release import ReleasedTowerError, ReleaseRecord, releasable_roots, release_blocker
from ..model.targets import TargetPlan, matched_modules, resolve_targets
from ..model.towers import NON_TEXT_TOWERS, TowerMap

logger = logging.getLogger(__name__)

_TOWER_OF_MODALITY = {"image": "vision", "video": "vision", "audio": "audio"}


@dataclass
class RunPlan:
    """What a run decided before PEFT wrapped the model.

    Attributes:
        engine: The engine the run trains under.
        profile: The training data's modality profile.
        tower_map: The base model's tower map (built before any release: it counts every tower's parameters).
        target_plan: The resolved targets (`None` without a `peft_config`, or for a model already PEFT-wrapped).
        released_towers: Towers whose weights were released (or never loaded).
        quantized_base: The 4-bit base of a `quantization="qlora"` / `"loftq"` run (`None` otherwise).
    """

    engine: Engine
    profile: ModalityProfile
    tower_map: TowerMap
    target_plan: TargetPlan | None = None
    released_towers: list[ReleaseRecord] = field(default_factory=list)
    quantized_base: Any = None


def profile_training_data(dataset: Any, args: Any) -> ModalityProfile:
    """The modality profile of the training data: declared by `args.data_modalities`, else sampled."""
    if args.data_modalities:
        return ModalityProfile.declare(args.data_modalities)
    return profile_dataset(dataset, max_rows=args.modality_sample_rows)


def release_allowed_by_data(args: Any, profile: ModalityProfile, eval_dataset: Any) -> bool:
    """Whether the settings and the data (known before the model loads) let unreached towers be released."""
    if args.free_unreached_towers is not None:
        return bool(args.free_unreached_towers)
    # Unset: only when it is safe, i.e. text-only training *and* evaluation data.
    if not profile.text_only or profile.declared:
        return False
    evals = eval_dataset.values() if isinstance(eval_dataset, dict) else [eval_dataset] if eval_dataset else []
    return all(profile_dataset(ds, max_rows=args.modality_sample_rows).text_only for ds in evals)


def check_model_fits_data(model: Any, tower_map: TowerMap, profile: ModalityProfile, processing_class: Any) -> None:
    """Fail early, with the fix, when the data holds a modality the model or processor cannot take.

    Raises:
        ValueError: The model has no tower for a modality of the data, or `processing_class` only handles text.
    """
    from transformers import ProcessorMixin

    present = {m for m in profile.modalities if m in NON_TEXT_MODALITIES}
    if not present:
        return
    have = set(tower_map.present_towers())
    for modality in sorted(present):
        if _TOWER_OF_MODALITY[modality] not in have:
            raise ValueError(
                f"The training data holds {modality} ({profile.rows_with.get(modality, '?')} of "
                f"{profile.rows_sampled} sampled rows) but {type(model).__name__} has no "
                f"{_TOWER_OF_MODALITY[modality]} tower. Use a model that takes {modality} input, or drop the "
                f"{modality} columns / content parts from the dataset."
            )
    if not isinstance(processing_class, ProcessorMixin):
        raise ValueError(
            f"The training data holds {', '.join(sorted(present))} but `processing_class` is a "
            f"{type(processing_class).__name__}, which only handles text. Pass the model's processor, e.g. "
            "`AutoProcessor.from_pretrained(model_id)`."
        )


def probe_blocker(model: Any, engine: Engine) -> str | None:
    """Why the reachability probe cannot run on `model` here (`None`: it can). The answer is the same on every
    rank, so every rank resolves the same targets."""
    if is_zero3_partitioned(model):
        return (
            "DeepSpeed ZeRO-3 partitioned the weights at load (`zero3_init_flag`), and a probe forward would need the "
            "whole model gathered on every rank"
        )
    if engine.fsdp_version is not None and engine.cpu_ram_efficient_loading:
        return "FSDP's `cpu_ram_efficient_loading` holds the weights on the first rank only"
    return None


def plan_targets(
    model: Any,
    peft_config: Any,
    profile: ModalityProfile,
    tower_map: TowerMap,
    args: Any,
    engine: Engine,
    probe_batch: Callable[[], Mapping[str, Any]] | None,
    show: bool = True,
) -> TargetPlan:
    """Resolve `peft_config`'s targets to the modules the data reaches, confirmed by the probe when it can run.

    Args:
        model: The base model (not PEFT-wrapped).
        peft_config: The user's PEFT config.
        profile: The training data's modality profile.
        tower_map: The model's tower map.
        args: The training arguments (`target_towers`, `dead_targets`, `target_probe`; the probe runs as they say).
        engine: The run's engine.
        probe_batch: Returns a collated batch of a few training rows, as the trainer's collator builds it (`None`:
            no probe).
        show: Print the plan (the main process does).
    """
    probe = None
    if args.target_probe and probe_batch is not None and hasattr(peft_config, "target_modules"):
        probe = _run_probe(model, peft_config, profile, args, engine, probe_batch)
    plan = resolve_targets(
        model,
        peft_config,
        profile,
        target_towers=args.target_towers,
        dead_targets=args.dead_targets,
        probe=probe,
        tower_map=tower_map,
    )
    if show:
        print_plan(plan)
    return plan


def _run_probe(
    model: Any,
    peft_config: Any,
    profile: ModalityProfile,
    args: Any,
    engine: Engine,
    probe_batch: Callable[[], Mapping[str, Any]],
) -> ProbeResult | None:
    try:
        candidates = matched_modules(model, peft_config)
    except Exception:
        return None  # resolve_targets reports a bad target spec with its own message
    if not candidates:
        return None
    blocker = probe_blocker(model, engine)
    if blocker is not None:
        logger.warning(
            "Reachability probe skipped: %s. Targets follow the tower structure and the data's modalities: "
            "adapters are kept on every tower the data reaches (%s), including modules such input may skip "
            "(e.g. cross-attention layers on text-only data); the audit reports any that stay dead. To probe, "
            "load the model without that option (the probe then runs before the engine shards the weights).",
            blocker,
            ", ".join(sorted(profile.reached_towers())) or "language",
        )
        return None
    try:
        # The batch the trainer's collator builds and the model run as training runs it (train mode, checkpointing,
        # autocast), so that "reached" means an adapter there trains.
        return probe_reachability(model, probe_batch(), candidates, ProbeSettings.from_training_args(args))
    except ReleasedTowerError:
        raise  # a tower left out at load is needed by this data: its message says how to fix it
    except (KeyError, NotImplementedError, RuntimeError, TypeError, ValueError) as err:
        logger.warning("Reachability probe skipped (%s); targets follow the tower structure.", err)
        return None


def every_batch_reaches_all_targets(plan: TargetPlan | None, profile: ModalityProfile) -> bool:
    """True when every batch gives every kept adapter a gradient, so DDP need not look for unused parameters."""
    if plan is None or plan.dead_kept():
        return False
    if profile.text_only:
        return True
    kept_towers = {d.tower for d in plan.decisions if d.kept}
    if not kept_towers & {*NON_TEXT_TOWERS, "projector"}:
        return True
    # Adapters on a media tower are used by a batch only if it holds that media: every sampled row must.
    return not profile.declared and all(c == profile.rows_sampled for c in profile.rows_with.values())


def should_release(args: Any, plan: TargetPlan | None, engine: Engine, model: Any, allowed_by_data: bool) -> bool:
    """Whether to release the towers the plan leaves unreached (see [`~mm_trainer.model.release`]).

    Raises:
        ValueError: `free_unreached_towers=True` under an engine the release cannot go with.
    """
    if args.free_unreached_towers is False or plan is None:
        return False
    if not releasable_roots(plan):
        return False
    blocker = release_blocker(engine, model)  # engines the release cannot (or need not) go with
    if blocker is not None:
        if args.free_unreached_towers is True and blocker.refuse:
            raise ValueError(f"`free_unreached_towers=True` cannot be used here: {blocker.reason}")
        logger.warning("Unreached towers are kept (not released): %s", blocker.reason)
        return False
    return allowed_by_data


def check_unloaded_towers(plan: TargetPlan, unloaded: list[tuple[str, str]]) -> None:
    """Every tower left out at load must be one the plan releases (the decision used the same facts)."""
    releasable = {path for path, _ in releasable_roots(plan)}
    wrong = [path for path, _ in unloaded if path not in releasable]
    if wrong:
        raise RuntimeError(
            f"mm-trainer left {wrong} unloaded, but the target plan needs them. Set `free_unreached_towers=False` "
            "(the full model is loaded) and report this with the model and the config."
        )


_PEAK_WARNED = False


def warn_peak_once(roots: list[tuple[str, str]], model: Any) -> None:
    """Say once per process that a model instance held its unreached towers at its peak, and how to avoid it."""
    global _PEAK_WARNED
    if _PEAK_WARNED:
        return
    _PEAK_WARNED = True
    name = getattr(getattr(model, "config", None), "name_or_path", None) or "<model path or Hub id>"
    logger.warning(
        "Released the unreached tower(s) %s after the model was built, so peak memory still held them. Pass the model "
        "as a path or Hub id (`MMSFTTrainer(model=%r, ...)`) and mm-trainer never loads them.",
        ", ".join(path for path, _ in roots),
        name,
    )
