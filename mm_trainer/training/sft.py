"""``MMSFTTrainer``: TRL's ``SFTTrainer`` with LoRA targets derived from the data, for multimodal models."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from datasets import Dataset, IterableDataset
from transformers import AutoConfig, AutoProcessor, PreTrainedModel, ProcessorMixin, TrainingArguments, set_seed
from trl import SFTConfig, SFTTrainer
from trl.trainer.utils import create_model_from_path

from ..audit import TrainingAuditor
from ..audit.auditor import is_checkpoint_dir
from ..audit.raw_loss import RawLoss
from ..audit.report import jsonable
from ..core.batch_guard import BatchModalityGuard
from ..core.checkpoints import resolve_resume_checkpoint, unmark_checkpoint, write_complete_marker
from ..core.resume import (
    SETTINGS_KEY,
    STATE_FILE,
    CheckpointStateError,
    check_settings,
    checkpoint_settings,
    corrupt_state,
    read_state,
    run_settings,
)
from ..core.telemetry import TowerTelemetry
from ..distributed.dummy_media import DummyMedia
from ..distributed.engine import detect_engine, probe_blocker
from ..distributed.sharding import engine_name, gathered
from ..imod import ModalityBalance, check_imod_data
from ..model.adapters import LoraAdapter, lora_adapters
from ..model.loading import UnloadedTowers, load_without, plan_unloaded
from ..model.modality import NON_TEXT_MODALITIES, ModalityProfile, check_dataset_columns, profile_dataset, sample_rows
from ..model.model_class import meta_model
from ..model.plan_report import print_plan
from ..model.probe import ProbeResult, ProbeSettings, build_probe_batch, choose_probe_rows, probe_reachability
from ..model.release import (
    ReleasedTowerError,
    ReleaseRecord,
    releasable_roots,
    release_blocker,
    release_towers,
    release_unloaded_towers,
)
from ..model.targets import TargetPlan, matched_modules, resolve_targets
from ..model.towers import NON_TEXT_TOWERS, TowerMap, map_towers
from ..quant import QuantizedBase, check_loaded_model, check_peft_config, initialize_eva, quantized_load_kwargs
from ..utils.atomic import atomic_write_json
from ..utils.inputs import check_model_path
from .callbacks import MMTrainerCallback
from .config import MMSFTConfig
from .sft_errors import sft_init_error, with_hint

logger = logging.getLogger(__name__)


class MMSFTTrainer(SFTTrainer):
    """Drop-in replacement for TRL's ``SFTTrainer`` that fits LoRA to what the data reaches in a multimodal model.

    It takes exactly ``SFTTrainer``'s arguments. Before PEFT wraps the model it profiles the data's modalities, maps
    every module of the model to a tower and resolves ``peft_config.target_modules`` to the exact modules of the
    towers the data reaches (confirmed by a one-batch probe). It prints that plan once, keeps it for the audit,
    optionally releases towers the data never reaches, and logs per-tower gradient telemetry during training.

    With a plain causal LM and text data nothing changes: the same modules are adapted, with the same initial values.

    Attributes:
        target_plan: The :class:`~mm_trainer.model.targets.TargetPlan` (``None`` without ``peft_config``).
        modality_profile: The training data's :class:`~mm_trainer.model.modality.ModalityProfile`.
        tower_map: The base model's :class:`~mm_trainer.model.towers.TowerMap`.
        telemetry: The :class:`~mm_trainer.core.telemetry.TowerTelemetry` (``None`` without adapters, or when both
            ``tower_telemetry`` and ``audit`` are off; with ``audit`` alone it tracks but logs nothing).
        released_towers: Towers whose weights were released.
        auditor: The :class:`~mm_trainer.audit.TrainingAuditor` that writes the audit at every save (``None`` when
            ``audit=False`` or without adapters).
        quantized_base: The :class:`~mm_trainer.quant.QuantizedBase` of a 4-bit run (``None`` otherwise).
        eva: The :class:`~mm_trainer.quant.EvaReport` when ``init_lora_weights="eva"`` (``None`` otherwise).
    """

    _tag_names = ["trl", "sft", "mm-trainer"]

    def __init__(
        self,
        model: str | PreTrainedModel | Any,
        args: SFTConfig | TrainingArguments | None = None,
        data_collator: Any = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        compute_loss_func: Any = None,
        compute_metrics: Any = None,
        callbacks: Any = None,
        optimizers: tuple[Any, Any] = (None, None),
        optimizer_cls_and_kwargs: Any = None,
        preprocess_logits_for_metrics: Any = None,
        quantization_config: Any = None,
        peft_config: Any = None,
        formatting_func: Any = None,
    ) -> None:
        check_model_path(model)  # mm-trainer's message before transformers' "Repo id must be in the form ..."
        args = _as_mm_config(args, model)
        if train_dataset is None:
            raise ValueError("`train_dataset` is required")
        check_dataset_columns(train_dataset, args.dataset_text_field, formatting_func)
        check_peft_config(args.quantization, peft_config, model)

        # Known before any weight is read: the data's modalities decide which towers a path load can leave out.
        self.modality_profile: ModalityProfile = self._profile(train_dataset, args)
        self._release_at_load = peft_config is not None and self._release_safe(args, eval_dataset)
        given_instance = not isinstance(model, str)
        model, processing_class, unloaded = self._load_model_and_processor(
            model, args, quantization_config, processing_class, self._release_at_load
        )
        quantization_config = None  # consumed by the load above

        # TRL's own refusal of this input, if any (raised below with TRL's type and words, plus our hint).
        trl_error = sft_init_error(model, args, train_dataset, processing_class, peft_config)
        try:
            self.tower_map: TowerMap = map_towers(model)  # before the release below: it counts the towers' parameters
            # Towers the load left on the meta device end exactly as released ones (records, empty tensors, hooks).
            self.released_towers: list[ReleaseRecord] = release_unloaded_towers(model, unloaded) if unloaded else []
            self._check_model_fits_data(model, processing_class)
            check_imod_data(args, self.modality_profile)
        except (TypeError, ValueError) as err:
            if trl_error is None:
                raise
            raise with_hint(trl_error, err) from err
        if trl_error is not None:
            raise trl_error
        self.target_plan: TargetPlan | None = None
        if peft_config is not None and not _is_peft_model(model):
            self.target_plan = self._plan_targets(model, peft_config, train_dataset, processing_class, args)
            peft_config = self.target_plan.peft_config
            if args.ddp_find_unused_parameters is None:  # set on the trainer's copy of the user's config
                # Every kept adapter gets a gradient on every batch only when no kept tower can be skipped by a batch.
                args.ddp_find_unused_parameters = not self._every_batch_reaches_all_targets()
            self._check_unloaded_towers(unloaded)
            if self._should_release(args, eval_dataset, model):
                done = {r.path for r in self.released_towers}
                roots = [root for root in releasable_roots(self.target_plan) if root[0] not in done]
                if roots and given_instance:
                    _warn_peak_once(roots, model)
                self.released_towers += release_towers(model, roots)
        # 4-bit base (in-place nf4 / LoftQ on the kept targets), k-bit training preparation; None when not quantized.
        self.quantized_base: QuantizedBase | None = QuantizedBase.prepare(
            model, args, self.target_plan, self.tower_map
        )

        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_loss_func=compute_loss_func,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
            quantization_config=quantization_config,
            peft_config=peft_config,
            formatting_func=formatting_func,
        )

        if self.quantized_base is not None:
            self.quantized_base.install_adapters(self.model)  # adapter dtype, LoftQ's initial factors
        self.eva = initialize_eva(  # EVA init (init_lora_weights="eva") on adapters every batch reaches; else None
            self.model, self.get_train_dataloader, self.tower_map, self.modality_profile, not args.disable_tqdm
        )
        self.adapters: list[LoraAdapter] = lora_adapters(self.model, self.tower_map)
        # Features add their own section to the audit here: name -> callable returning a JSON-ready dict.
        self.audit_sections: dict[str, Callable[[], dict[str, Any]]] = {}
        if self.quantized_base is not None:
            self.audit_sections["quantization"] = self.quantized_base.audit_section
        if self.eva is not None:
            self.audit_sections["eva"] = self.eva.to_dict
        self.telemetry: TowerTelemetry | None = None
        if self.adapters and (self.args.tower_telemetry or self.args.audit):
            self.telemetry = TowerTelemetry(self.adapters)
            self.telemetry.watch_forward()
        # IMoD gradient injection and the Non-Text Dominance Rate (None when neither applies).
        self.modality_balance: ModalityBalance | None = ModalityBalance.for_trainer(self)
        if self.modality_balance is not None:
            self.audit_sections.update(self.modality_balance.audit_sections())
        # Batches holding a modality the plan did not see raise at their step (see mm_trainer/batch_guard.py).
        self.batch_guard: BatchModalityGuard | None = None
        if self.target_plan is not None:
            released = [r.path for r in self.released_towers]
            self.batch_guard = BatchModalityGuard(self.modality_profile, getattr(model, "config", None), released)
        self._guard_hook: Any = None  # the forward hook that reads a deferred guard check (see _bind_batch_guard)
        # Sharded engines (FSDP, ZeRO-3): media towers run on every micro-batch, on a zero-contribution dummy input
        # where the micro-batch holds no such media, so that every rank's collectives match (None elsewhere).
        self.dummy_media: DummyMedia | None = DummyMedia.for_trainer(self)
        # Keep last: the audit's init record must see the adapters exactly as training starts from them.
        self.auditor: TrainingAuditor | None = TrainingAuditor(self) if self.args.audit and self.adapters else None
        # The unfiltered training loss (transformers' logging_nan_inf_filter hides NaN steps from the logged loss).
        self.raw_loss: RawLoss | None = RawLoss() if self.auditor is not None else None
        self._warn_if_not_audited(peft_config)
        self.add_callback(MMTrainerCallback(self))  # re-binds after `accelerator.prepare`; marks checkpoints complete

    # ----------------------------------------------------------------------------------------------------------------
    # Set-up, before SFTTrainer.__init__
    # ----------------------------------------------------------------------------------------------------------------
    def _load_model_and_processor(
        self, model: Any, args: MMSFTConfig, quantization_config: Any, processing_class: Any, release: bool = False
    ) -> tuple[Any, Any, list[tuple[str, str]]]:
        """Load a model given by path / id, and its processor, before ``SFTTrainer.__init__``.

        ``SFTTrainer.__init__`` loads a path and wraps it with PEFT in one go (TRL 1.16 has no hook between the two),
        but the tower map, the reachability probe and the 4-bit preparation need the loaded model before PEFT wraps
        it. So the load happens here, with TRL's own ``create_model_from_path`` (its dtype, device-map and
        architecture defaults) and the arguments ``SFTTrainer`` would pass; mm-trainer adds only the 4-bit load
        arguments (:func:`~mm_trainer.quant.quantized_load_kwargs`). ``tests/test_trainer.py`` pins that the result
        equals the model ``SFTTrainer`` loads itself. ``args`` is the trainer's own copy (see :func:`_as_mm_config`).

        With ``release`` (towers the data never reaches are to be released), the towers that would be released are
        never materialized: they stay on the meta device (:mod:`mm_trainer.model.loading`). Returns the model, the
        processor and those towers' ``(path, tower)`` roots.
        """
        set_seed(args.seed)  # as SFTTrainer: adapter init and any missing weights depend on the seed
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
                kwargs["device_map"] = None  # as SFTTrainer: "auto" fails under distributed training
            kwargs.setdefault("trust_remote_code", args.trust_remote_code)
            revision = kwargs.get("revision")
            if args.quantization is not None:
                kwargs = quantized_load_kwargs(model, kwargs, args)  # nf4 with full-precision towers (QLoRA)
            plan = self._unloaded_towers(model, kwargs, args) if release else None
            if plan is not None:
                model_id = model
                model = load_without(create_model_from_path, model_id, kwargs, plan)
                unloaded = plan.roots
            else:
                model = create_model_from_path(model, **kwargs)
            args.model_init_kwargs = None  # consumed (on the trainer's copy): SFTTrainer would warn they are ignored
        check_loaded_model(model, args.quantization)  # refuses other quantization methods
        if processing_class is None:
            processing_class = AutoProcessor.from_pretrained(
                model.config.name_or_path, revision=revision, trust_remote_code=args.trust_remote_code
            )
        return model, processing_class, unloaded

    def _unloaded_towers(self, model_id: str, kwargs: dict[str, Any], args: MMSFTConfig) -> UnloadedTowers | None:
        """The towers a load of ``model_id`` can leave out: unreached by the data, not selected, under an engine the
        release goes with (``None`` when there are none, or the load cannot place them apart)."""
        engine = detect_engine(args)
        if engine.fsdp_version is not None or engine.zero_stage == 3:
            # FSDP1 refuses the release, FSDP's cpu_ram_efficient_loading and ZeRO-3's zero.Init place weights at load
            # themselves: under sharded engines the towers are loaded, then released as decided on the loaded model.
            return None
        reached = set(self.modality_profile.reached_towers())
        selected = set(args.target_towers) if isinstance(args.target_towers, (list, tuple)) else set()
        trust = bool(kwargs.get("trust_remote_code"))
        config = AutoConfig.from_pretrained(model_id, revision=kwargs.get("revision"), trust_remote_code=trust)
        meta = meta_model(config, trust)
        default_map = None if PartialState().device.type in ("cpu", "mps") else "auto"  # as create_model_from_path
        plan, reason = plan_unloaded(meta, kwargs.get("device_map", default_map), reached, selected)
        if reason is not None:
            logger.warning("Unreached towers are loaded, then released (the peak memory holds them): %s.", reason)
        return plan

    def _check_unloaded_towers(self, unloaded: list[tuple[str, str]]) -> None:
        """Every tower left out at load must be one the plan releases (the decision used the same facts)."""
        releasable = {path for path, _ in releasable_roots(self.target_plan)}
        wrong = [path for path, _ in unloaded if path not in releasable]
        if wrong:
            raise RuntimeError(
                f"mm-trainer left {wrong} unloaded, but the target plan needs them. Set `free_unreached_towers=False` "
                "(the full model is loaded) and report this with the model and the config."
            )

    @staticmethod
    def _profile(dataset: Any, args: MMSFTConfig) -> ModalityProfile:
        if args.data_modalities:
            return ModalityProfile.declare(args.data_modalities)
        return profile_dataset(dataset, max_rows=args.modality_sample_rows)

    def _check_model_fits_data(self, model: Any, processing_class: Any) -> None:
        """Fail early, with the fix, when the data holds a modality the model or processor cannot take."""
        present = {m for m in self.modality_profile.modalities if m in NON_TEXT_MODALITIES}
        if not present:
            return
        tower_needed = {"image": "vision", "video": "vision", "audio": "audio"}
        have = set(self.tower_map.present_towers())
        for modality in sorted(present):
            if tower_needed[modality] not in have:
                raise ValueError(
                    f"The training data holds {modality} ({self.modality_profile.rows_with.get(modality, '?')} of "
                    f"{self.modality_profile.rows_sampled} sampled rows) but {type(model).__name__} has no "
                    f"{tower_needed[modality]} tower. Use a model that takes {modality} input, or drop the "
                    f"{modality} columns / content parts from the dataset."
                )
        if not isinstance(processing_class, ProcessorMixin):
            raise ValueError(
                f"The training data holds {', '.join(sorted(present))} but `processing_class` is a "
                f"{type(processing_class).__name__}, which only handles text. Pass the model's processor, e.g. "
                "`AutoProcessor.from_pretrained(model_id)`."
            )

    def _plan_targets(
        self, model: Any, peft_config: Any, dataset: Any, processing_class: Any, args: MMSFTConfig
    ) -> TargetPlan:
        probe = None
        if args.target_probe and hasattr(peft_config, "target_modules"):
            probe = self._run_probe(model, peft_config, dataset, processing_class, args)
        plan = resolve_targets(
            model,
            peft_config,
            self.modality_profile,
            target_towers=args.target_towers,
            dead_targets=args.dead_targets,
            probe=probe,
            tower_map=self.tower_map,
        )
        if args.process_index == 0:
            print_plan(plan)
        return plan

    def _run_probe(
        self, model: Any, peft_config: Any, dataset: Any, processing_class: Any, args: MMSFTConfig
    ) -> ProbeResult | None:
        try:
            candidates = matched_modules(model, peft_config)
        except Exception:
            return None  # resolve_targets reports a bad target spec with its own message
        if not candidates:
            return None
        blocker = probe_blocker(model, detect_engine(args))
        if blocker is not None:
            logger.warning(
                "Reachability probe skipped: %s. Targets follow the tower structure and the data's modalities: "
                "adapters are kept on every tower the data reaches (%s), including modules such input may skip "
                "(e.g. cross-attention layers on text-only data); the audit reports any that stay dead. To probe, "
                "load the model without that option (the probe then runs before the engine shards the weights).",
                blocker,
                ", ".join(sorted(self.modality_profile.reached_towers())) or "language",
            )
            return None
        # A small spread sample is enough to find rows of every kind; it avoids decoding hundreds of images.
        pool = sample_rows(dataset, min(args.modality_sample_rows, 8 * args.target_probe_rows))
        rows = choose_probe_rows(pool, args.target_probe_rows)
        try:
            # The batch TRL's collator builds and the model run as training runs it (train mode, checkpointing,
            # autocast), so that "reached" means an adapter there trains.
            batch = build_probe_batch(
                rows,
                processing_class,
                dataset_text_field=args.dataset_text_field,
                max_length=args.max_length,
                padding_free=bool(
                    args.padding_free or (args.packing and args.packing_strategy in {"bfd", "bfd_split"})
                ),
                pad_to_multiple_of=args.pad_to_multiple_of,
                completion_only_loss=args.completion_only_loss,
                model_config=getattr(model, "config", None),
            )
            return probe_reachability(model, batch, candidates, ProbeSettings.from_training_args(args))
        except ReleasedTowerError:
            raise  # a tower left out at load is needed by this data: its message says how to fix it
        except (KeyError, NotImplementedError, RuntimeError, TypeError, ValueError) as err:
            logger.warning("Reachability probe skipped (%s); targets follow the tower structure.", err)
            return None

    def _warn_if_not_audited(self, peft_config: Any) -> None:
        """Say at start-up when the audit and telemetry are off because the PEFT method has no LoRA A / B."""
        if self.adapters or peft_config is None or not (self.args.audit or self.args.tower_telemetry):
            return
        method = _peft_method(peft_config)
        message = (
            f"mm-trainer audits and monitors LoRA adapters only: this {method} run is NOT audited (no audit.json / "
            "AUDIT.md, no per-tower gradient telemetry, no push guard). Use a LoraConfig for an audited run."
        )
        logger.warning(message)
        warnings.warn(message, UserWarning, stacklevel=3)

    def _every_batch_reaches_all_targets(self) -> bool:
        """True when every batch gives every kept adapter a gradient, so DDP need not look for unused parameters."""
        plan, profile = self.target_plan, self.modality_profile
        if plan is None or plan.dead_kept():
            return False
        if profile.text_only:
            return True
        kept_towers = {d.tower for d in plan.decisions if d.kept}
        if not kept_towers & {*NON_TEXT_TOWERS, "projector"}:
            return True
        # Adapters on a media tower are used by a batch only if it holds that media: every sampled row must.
        return not profile.declared and all(c == profile.rows_sampled for c in profile.rows_with.values())

    def _should_release(self, args: MMSFTConfig, eval_dataset: Any, model: Any) -> bool:
        if args.free_unreached_towers is False or self.target_plan is None:
            return False
        if not releasable_roots(self.target_plan):
            return False
        blocker = release_blocker(detect_engine(args), model)  # engines the release cannot (or need not) go with
        if blocker is not None:
            if args.free_unreached_towers is True and blocker.refuse:
                raise ValueError(f"`free_unreached_towers=True` cannot be used here: {blocker.reason}")
            logger.warning("Unreached towers are kept (not released): %s", blocker.reason)
            return False
        return self._release_at_load

    def _release_safe(self, args: MMSFTConfig, eval_dataset: Any) -> bool:
        """Whether the settings and the data (known before the model loads) let unreached towers be released."""
        if args.free_unreached_towers is not None:
            return bool(args.free_unreached_towers)
        # Unset: only when it is safe, i.e. text-only training *and* evaluation data.
        if not self.modality_profile.text_only or self.modality_profile.declared:
            return False
        evals = eval_dataset.values() if isinstance(eval_dataset, dict) else [eval_dataset] if eval_dataset else []
        return all(profile_dataset(ds, max_rows=args.modality_sample_rows).text_only for ds in evals)

    # ----------------------------------------------------------------------------------------------------------------
    # Training hooks
    # ----------------------------------------------------------------------------------------------------------------
    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        if self.batch_guard is not None:  # an unseen modality fails here, on every rank, not deep in the forward
            self.batch_guard.check(
                inputs, self.state.global_step + 1, self.accelerator, defer=self._guard_hook is not None
            )
        if self.modality_balance is not None and self.model.training:
            # Arms IMoD's gradient injection and the dominance-rate hooks for this micro-batch (disarmed after the
            # backward, in training_step). The loss itself is not changed.
            self.modality_balance.begin_micro_step(self, inputs)
        if self.dummy_media is not None:
            self.dummy_media.begin_micro_step(inputs)  # arms a dummy for each media tower this micro-batch lacks
        result = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        if self.batch_guard is not None and self.batch_guard.pending:
            # The forward did not go through the hooked model: read the check here and block from now on.
            logger.warning(
                "mm-trainer: the model's forward did not run its batch-check hook; the per-batch modality check now "
                "completes before each forward."
            )
            self._guard_hook.remove()
            self._guard_hook = None
            self.batch_guard.resolve()
        return result

    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        try:
            loss = super().training_step(model, inputs, num_items_in_batch)
        except BaseException:
            if self.modality_balance is not None:  # never leave lora_A forwards replaced or hooks on
                self.modality_balance.abort_micro_step()
            raise
        if self.dummy_media is not None and self.accelerator.sync_gradients:
            # A tower that only dummies ran in this step gets None gradients (AdamW skips it, as under DDP).
            self.dummy_media.end_step(self._sum_across_ranks)
        if self.raw_loss is not None:  # the audit's unfiltered loss
            self.raw_loss.add(loss, self.accelerator.sync_gradients)
        if self.modality_balance is not None:
            self.modality_balance.after_backward(self)
        if self.telemetry is not None and self.accelerator.sync_gradients:
            # Gradients of the optimizer step are complete (accumulated, reduced across ranks) and not yet clipped.
            self.telemetry.collect()
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.telemetry is not None and self.model.training and "loss" in logs:
            metrics = self.telemetry.flush(self.state.global_step)  # collective: every rank logs
            if self.args.tower_telemetry:
                logs.update(metrics)
        if self.modality_balance is not None and self.model.training and "loss" in logs:
            logs.update(self.modality_balance.log_metrics(self))
        if self.raw_loss is not None and self.model.training and "loss" in logs:
            mean = (
                (lambda t: self.accelerator.reduce(t, reduction="mean"))
                if self.accelerator.num_processes > 1
                else None
            )
            self.raw_loss.flush(self.state.global_step, mean)
        super().log(logs, start_time)

    def _sum_across_ranks(self, values: torch.Tensor) -> torch.Tensor:
        if self.accelerator.num_processes == 1:
            return values
        return self.accelerator.reduce(values.to(self.args.device), reduction="sum")

    def _sync_fired(self) -> None:
        """Make every rank agree on which adapters fired (a rank may never have seen an image batch) and count the
        telemetry's steps not yet counted (FSDP2, DeepSpeed): a collective under several processes."""
        if self.telemetry is not None:
            self.telemetry.synchronize()

    # ----------------------------------------------------------------------------------------------------------------
    # Saving and resuming
    # ----------------------------------------------------------------------------------------------------------------
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the adapter as ``SFTTrainer`` does, then mm-trainer's files next to it (state, 4-bit recipe, audit).

        Call it on every process, as ``Trainer.save_model`` (the audit may gather sharded adapter weights). The
        adapter is written first and is kept whatever happens to the audit.
        """
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save:
            unmark_checkpoint(Path(output_dir))  # a checkpoint-N written again is unfinished until on_save
        if self.is_fsdp_enabled and engine_name(self) == "fsdp2" and _is_peft_model(self.model):
            self._save_fsdp2_adapter(output_dir)
        else:
            super().save_model(output_dir, _internal_call=True)  # the Hub push, if any, comes after our files below
        self._save_mm_files(Path(output_dir))
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _save_fsdp2_adapter(self, output_dir: str) -> None:
        """Save the adapter of an FSDP2 run (every rank calls this).

        ``Trainer.save_model`` hands PEFT the state dict from ``accelerator.get_state_dict``, whose LoRA tensors are
        still sharded ``DTensor`` s, and PEFT's save fails on them. Here every rank gathers the whole tensors of what
        PEFT keeps (the adapter weights, small), then the saving process writes them through the Trainer's usual
        ``_save`` (``save_pretrained`` with that state dict, the processor, the training arguments).
        """
        from peft import get_peft_model_state_dict

        state = self.model.state_dict()  # DTensor values; nothing is gathered yet
        kept = {id(v) for v in get_peft_model_state_dict(self.model, state_dict=state).values()}
        whole = {}
        for key, value in state.items():  # same order on every rank: the gathers match
            if id(value) in kept:
                with gathered([value]) as (full,):
                    value = full.cpu()
            whole[key] = value
        if self.args.should_save:
            self._save(output_dir, state_dict=whole)

    def _save_mm_files(self, output_dir: Path) -> None:
        """Write ``mm_trainer_state.json``, ``quantization.json`` and the audit into ``output_dir`` (every rank calls
        this; only the process that saves writes, each file atomically)."""
        self._sync_fired()  # collective: every rank agrees on what fired before the audit is built
        if self.auditor is not None:
            self.auditor.prepare_save()  # every rank: whatever the audit must gather across processes
        if not self.args.should_save:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(output_dir / STATE_FILE, self.mm_state())
        if self.quantized_base is not None:
            self.quantized_base.save(output_dir)  # quantization.json: how to rebuild the 4-bit base
        if self.auditor is None:
            return
        audit = self.auditor.on_save(output_dir)  # never raises: a failed audit is reported, the adapter stays
        if audit is not None and is_checkpoint_dir(output_dir):
            # TRL writes the output_dir model card before a checkpoint's save: refresh its audit section now.
            self.auditor.on_model_card(Path(self.args.output_dir), audit)

    def mark_checkpoint_complete(self, checkpoint: Path) -> None:
        """Mark ``checkpoint`` complete, after every file of it was written (``on_save``; the saving process only)."""
        if self.args.should_save:
            write_complete_marker(checkpoint, self.state.global_step)

    def bind_prepared_model(self) -> None:
        """Re-bind the adapters (telemetry, audit, IMoD, dominance rate) to the parameters of the prepared model.

        ``accelerator.prepare`` may replace parameters (FSDP2 swaps every one for a sharded ``DTensor``); the init
        record and every counter are keyed by module name, so they carry over.
        """
        self._bind_batch_guard()
        if not self.adapters:
            return
        adapters = lora_adapters(self.model, self.tower_map)
        if [a.name for a in adapters] != [a.name for a in self.adapters]:
            raise RuntimeError(
                "mm-trainer: the prepared model holds other LoRA adapters than the model given to the trainer "
                f"({len(adapters)} vs {len(self.adapters)}). Something replaced adapter modules between the trainer's "
                "construction and `train()`."
            )
        self.adapters = adapters
        engine = engine_name(self)
        world = self.accelerator.num_processes
        reduce_sum = None
        if world > 1:  # on the process group's device (FSDP2 may offload gradients to the CPU)
            reduce_sum = lambda t: self.accelerator.reduce(t.to(self.accelerator.device), reduction="sum")  # noqa: E731
        if engine == "fsdp1" and self.auditor is not None:
            self.auditor.unknown_reason = (
                "FSDP1 flattens the adapter weights and gradients into shards that mm-trainer does not read, so "
                "gradient telemetry and the adapters' statuses are not checked under it (they are with FSDP2: set "
                "`fsdp_version: 2` in the accelerate config)."
            )
            logger.warning("mm-trainer: %s The audit's verdict will be 'unknown'.", self.auditor.unknown_reason)
        if self.telemetry is not None:
            # DeepSpeed runs its optimizer step inside `accelerator.backward`, after moving the reduced gradients into
            # its own partitions: telemetry reads each micro-batch's gradient as autograd delivers it instead.
            self.telemetry.bind(
                adapters, reduce_sum=reduce_sum, capture_gradients=engine == "deepspeed", world_size=world
            )
        if self.modality_balance is not None:
            self.modality_balance.bind(adapters)

    def _bind_batch_guard(self) -> None:
        """Under engines whose forward runs no collective (DeepSpeed ZeRO-0/1/2) the batch guard's all-reduce runs
        during the forward and is read by a hook at its end, instead of blocking before it; elsewhere it blocks."""
        if self._guard_hook is not None:
            self._guard_hook.remove()
            self._guard_hook = None
        if (
            self.batch_guard is None
            or self.accelerator.num_processes == 1
            or not detect_engine(self.args).forward_without_collectives
        ):
            return
        guard = self.batch_guard
        self._guard_hook = self.model.register_forward_hook(lambda *_: guard.resolve())

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        super().create_model_card(*args, **kwargs)
        if self.auditor is not None and self.is_world_process_zero() and self.auditor.last_audit is not None:
            self.auditor.on_model_card(Path(self.args.output_dir), self.auditor.last_audit)

    def push_to_hub(self, *args: Any, **kwargs: Any) -> Any:
        if self.auditor is not None:
            self.auditor.guard_push()  # raises AuditFailedError before any Hub call when the verdict is "fail"
        return super().push_to_hub(*args, **kwargs)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        if self.auditor is not None and not self.auditor.before_checkpoint_push(Path(checkpoint_folder)):
            return
        super()._push_from_checkpoint(checkpoint_folder)

    def mm_state(self) -> dict[str, Any]:
        """What a checkpoint keeps beyond the adapter: kept targets, released towers, telemetry, the audit's init
        record and unfiltered loss, the settings a resume compares (JSON-ready: NaN / infinity as strings)."""
        return jsonable(
            {
                "kept_targets": self.target_plan.kept() if self.target_plan is not None else None,
                "released_towers": [r.to_dict() for r in self.released_towers],
                "telemetry": self.telemetry.state_dict() if self.telemetry is not None else None,
                "audit_init": self.auditor.state_dict() if self.auditor is not None else None,
                "modality_balance": self.modality_balance.state_dict() if self.modality_balance is not None else None,
                "raw_loss": self.raw_loss.state_dict() if self.raw_loss is not None else None,
                SETTINGS_KEY: run_settings(self.model, self.args),
                "global_step": self.state.global_step,
            }
        )

    def train(
        self, resume_from_checkpoint: str | bool | None = None, trial: Any = None, ignore_keys_for_eval: Any = None
    ):
        """``Trainer.train``; ``resume_from_checkpoint=True`` resumes from the newest *complete* checkpoint.

        Unfinished checkpoints (a kill during their save) are skipped with a warning naming them; a named unfinished
        checkpoint is refused with the name of the last complete one (:mod:`mm_trainer.core.checkpoints`). Before the
        Trainer loads anything, the checkpoint's settings are compared with this run's (:mod:`mm_trainer.core.resume`).
        """
        checkpoint = resolve_resume_checkpoint(resume_from_checkpoint, self.args.output_dir)
        if checkpoint is not None and checkpoint.is_dir():
            self._load_state(checkpoint)
        output = super().train(
            resume_from_checkpoint=str(checkpoint) if checkpoint is not None else resume_from_checkpoint,
            trial=trial,
            ignore_keys_for_eval=ignore_keys_for_eval,
        )
        self._sync_fired()  # so that a save after training sees what every rank ran
        if self.auditor is not None:
            self.auditor.prepare_save()  # every rank, like a save: the summary is the audit of the final weights
            if self.is_world_process_zero():
                self.auditor.print_summary()
        if self.modality_balance is not None:
            self.modality_balance.warn_if_unused()
        return output

    def _load_state(self, checkpoint: Path) -> None:
        """Restore mm-trainer's state from ``checkpoint`` after checking that this run may continue it.

        Raises:
            ResumeMismatchError: Other kept targets, PEFT method, rank / alpha, IMoD on / off or quantization.
            CheckpointStateError: ``mm_trainer_state.json`` is unreadable or of the wrong shape.
        """
        state = read_state(checkpoint)
        check_settings(checkpoint, checkpoint_settings(checkpoint, state), run_settings(self.model, self.args))
        if state is None:
            logger.warning("%s has no %s: telemetry history restarts from this resume.", checkpoint, STATE_FILE)
            if self.auditor is not None:
                self.auditor.load_state_dict(None)
            return
        kept = state.get("kept_targets")
        if kept is not None and self.target_plan is not None and sorted(kept) != sorted(self.target_plan.kept()):
            only_ckpt = sorted(set(kept) - set(self.target_plan.kept()))[:5]
            only_now = sorted(set(self.target_plan.kept()) - set(kept))[:5]
            raise ValueError(
                f"The checkpoint at {checkpoint} was trained on other target modules than this run resolves to "
                f"(only in checkpoint: {only_ckpt}; only now: {only_now}). Resume with the same data, model and "
                "`peft_config`, or set `target_towers` / `data_modalities` explicitly so the targets match."
            )
        try:
            if self.telemetry is not None and state.get("telemetry"):
                self.telemetry.load_state_dict(state["telemetry"])
            if self.auditor is not None:
                self.auditor.load_state_dict(state.get("audit_init"))
            if self.raw_loss is not None:
                self.raw_loss.load_state_dict(state.get("raw_loss"))
        except CheckpointStateError:
            raise
        except (AttributeError, KeyError, TypeError, ValueError) as err:
            raise corrupt_state(checkpoint, f"{type(err).__name__}: {err}") from err
        if self.modality_balance is not None:
            try:
                self.modality_balance.load_state_dict(state.get("modality_balance"), checkpoint)
            except (AttributeError, KeyError, TypeError) as err:
                raise corrupt_state(checkpoint, f"{type(err).__name__} in `modality_balance`: {err}") from err


_PEAK_WARNED = False


def _warn_peak_once(roots: list[tuple[str, str]], model: Any) -> None:
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


def _is_peft_model(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PeftModel)


def _peft_method(peft_config: Any) -> str:
    """The PEFT method's name (``LoRA``, ``IA3``, ``LoHa``, ...) of a config."""
    peft_type = getattr(peft_config, "peft_type", None)
    name = str(getattr(peft_type, "value", peft_type) or type(peft_config).__name__.removesuffix("Config"))
    return "LoRA" if name.upper() == "LORA" else name


def _as_mm_config(args: Any, model: Any) -> MMSFTConfig:
    """The trainer's own ``MMSFTConfig``: a copy of the user's config (never the user's object), which the trainer may
    then change, like ``SFTTrainer`` does its config, without the change reaching the user's object."""
    if args is None:
        name = model if isinstance(model, str) else model.config.name_or_path
        return MMSFTConfig(f"{(name or 'model').split('/')[-1]}-SFT")
    if isinstance(args, TrainingArguments):
        return MMSFTConfig.extend(args)
    raise TypeError(f"`args` must be an MMSFTConfig, SFTConfig or TrainingArguments, got {type(args).__name__}.")
