"""`MMTrainerMixin`: attaches mm-trainer's core to a TRL trainer through the Trainer's public hooks.

A trainer class is `class MMXTrainer(MMTrainerMixin, XTrainer)`. Its `__init__` calls, in this order:

1. [`MMTrainerMixin.mm_prepare`] with the trainer's arguments, before `XTrainer.__init__`: it profiles the data,
   loads a model given by path, maps the towers, plans the targets (with a probe batch the trainer builds with its
   own collator), releases unreached towers and prepares a 4-bit base. It returns the model, processing class and
   resolved `peft_config` to hand to `XTrainer.__init__`, which wraps the model with PEFT as usual.
2. `XTrainer.__init__`.
3. [`MMTrainerMixin.mm_attach`], which builds the [`~mm_trainer.core.run.MultimodalCore`] on the wrapped model and
   adds the callback that re-binds it after `accelerator.prepare` and marks checkpoints complete.

The mixin then follows the training loop through `compute_loss`, `training_step`, `log`, `save_model`, `train`,
`push_to_hub` and `create_model_card`, always calling `super()`; everything it does there is a call into the core
with explicit arguments. The core never reads the trainer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..core.planning import (
    RunPlan,
    check_model_fits_data,
    check_unloaded_towers,
    every_batch_reaches_all_targets,
    plan_targets,
    profile_training_data,
    release_allowed_by_data,
    should_release,
    warn_peak_once,
)
from ..core.run import MultimodalCore, Progress
from ..distributed.engine import detect_engine
from ..distributed.sharding import gathered
from ..imod import check_imod_data
from ..model.peft_names import is_peft_model
from ..model.release import releasable_roots, release_towers, release_unloaded_towers
from ..model.towers import map_towers
from ..quant import QuantizedBase, check_peft_config
from ..upstream import trainer_save
from ..utils.checkpoints import resolve_resume_checkpoint, unmark_checkpoint
from .callbacks import MMTrainerCallback
from .loading import load_model_and_processor

logger = logging.getLogger(__name__)

InputError = Callable[[Any, Any], Exception | None]
"""`(model, processing_class) -> exception`: the error the TRL trainer itself raises on this input (or `None`)."""

WithHint = Callable[[Exception, BaseException], Exception]
"""`(trl_error, our_error) -> exception`: TRL's error with mm-trainer's hint added."""

ProbeBatch = Callable[[Any, Any], Mapping[str, Any]]
"""`(model, processing_class) -> batch`: a few training rows collated as the trainer's collator will."""


class MMTrainerMixin:
    """Attaches mm-trainer to a TRL trainer (see the module docstring).

    Attributes:
        mm_plan: What was decided before PEFT wrapped the model ([`~mm_trainer.core.planning.RunPlan`]).
        mm: The run's [`~mm_trainer.core.run.MultimodalCore`] (after construction).
    """

    mm_plan: RunPlan
    mm: MultimodalCore

    # -- construction ------------------------------------------------------------------------------------------------
    def mm_prepare(
        self,
        model: Any,
        args: Any,
        *,
        train_dataset: Any,
        eval_dataset: Any,
        processing_class: Any,
        peft_config: Any,
        quantization_config: Any,
        probe_batch: ProbeBatch | None,
        input_error: InputError | None = None,
        with_hint: WithHint | None = None,
    ) -> tuple[Any, Any, Any]:
        """Everything before the TRL trainer's `__init__`; returns `(model, processing_class, peft_config)` for it.

        Args:
            model: The trainer's `model` argument (instance, path or Hub id).
            args: The trainer's own copy of its config (it may be changed, as TRL changes its config).
            train_dataset: The training dataset.
            eval_dataset: The evaluation dataset(s).
            processing_class: The trainer's `processing_class` argument.
            peft_config: The user's PEFT config.
            quantization_config: The trainer's `quantization_config` argument (consumed by a path load).
            probe_batch: Builds the probe batch with the trainer's collator (`None`: no probe).
            input_error: The error the TRL trainer raises on this input before it wraps the model, if any: raised
                before any planning, with mm-trainer's hint when mm-trainer would refuse the input too.
            with_hint: Combines TRL's error with mm-trainer's (without it, TRL's error is raised as it is).
        """
        engine = detect_engine(args)
        check_peft_config(args.quantization, peft_config, model)
        # Known before any weight is read: the data's modalities decide which towers a path load can leave out.
        profile = profile_training_data(train_dataset, args)
        release_at_load = peft_config is not None and release_allowed_by_data(args, profile, eval_dataset)
        given_instance = not isinstance(model, str)
        model, processing_class, unloaded = load_model_and_processor(
            model, args, quantization_config, processing_class, profile, release_at_load, engine
        )
        trl_error = input_error(model, processing_class) if input_error is not None else None
        try:
            tower_map = map_towers(model)  # before the release below: it counts the towers' parameters
            # Towers the load left on the meta device end exactly as released ones (records, empty tensors, hooks).
            released = release_unloaded_towers(model, unloaded) if unloaded else []
            check_model_fits_data(model, tower_map, profile, processing_class)
            check_imod_data(args, profile)
        except (TypeError, ValueError) as err:
            if trl_error is None:
                raise
            raise (with_hint(trl_error, err) if with_hint is not None else trl_error) from err
        if trl_error is not None:
            raise trl_error
        plan = RunPlan(engine, profile, tower_map, released_towers=released)
        self.mm_plan = plan
        if peft_config is not None and not is_peft_model(model):
            batch = (lambda: probe_batch(model, processing_class)) if probe_batch is not None else None
            plan.target_plan = plan_targets(
                model, peft_config, profile, tower_map, args, engine, batch, show=args.process_index == 0
            )
            peft_config = plan.target_plan.peft_config
            if args.ddp_find_unused_parameters is None:  # set on the trainer's copy of the user's config
                # Every kept adapter gets a gradient on every batch only when no kept tower can be skipped by a batch.
                args.ddp_find_unused_parameters = not every_batch_reaches_all_targets(plan.target_plan, profile)
            check_unloaded_towers(plan.target_plan, unloaded)
            if should_release(args, plan.target_plan, engine, model, release_at_load):
                done = {r.path for r in plan.released_towers}
                roots = [root for root in releasable_roots(plan.target_plan) if root[0] not in done]
                if roots and given_instance:
                    warn_peak_once(roots, model)
                plan.released_towers += release_towers(model, roots)
        # 4-bit base (in-place nf4 / LoftQ on the kept targets), k-bit training preparation; None when not quantized.
        plan.quantized_base = QuantizedBase.prepare(model, args, plan.target_plan, tower_map)
        return model, processing_class, peft_config

    def mm_attach(self, peft_config: Any) -> None:
        """Build the core on the PEFT-wrapped model (after the TRL trainer's `__init__`) and add the callback."""
        self.mm = MultimodalCore(
            self.mm_plan,
            self.model,
            self.args,
            self.processing_class,
            train_batches=self.get_train_dataloader,
            progress=self._mm_progress,
            save=lambda folder: self.save_model(folder, _internal_call=True),
            peft_config=peft_config,
        )
        self.add_callback(MMTrainerCallback(self))  # re-binds after `accelerator.prepare`; marks checkpoints complete

    def _mm_progress(self) -> Progress:
        state = self.state
        return Progress(state.global_step, state.epoch, state.log_history)

    # -- what users read ---------------------------------------------------------------------------------------------
    @property
    def modality_profile(self) -> Any:
        """The training data's [`~mm_trainer.model.modality.ModalityProfile`]."""
        return self.mm_plan.profile

    @property
    def tower_map(self) -> Any:
        """The base model's [`~mm_trainer.model.towers.TowerMap`]."""
        return self.mm_plan.tower_map

    @property
    def target_plan(self) -> Any:
        """The [`~mm_trainer.model.targets.TargetPlan`] (`None` without `peft_config`)."""
        return self.mm_plan.target_plan

    @property
    def released_towers(self) -> list[Any]:
        """Towers whose weights were released (or never loaded)."""
        return self.mm_plan.released_towers

    @property
    def quantized_base(self) -> Any:
        """The [`~mm_trainer.quant.QuantizedBase`] of a 4-bit run (`None` otherwise)."""
        return self.mm_plan.quantized_base

    @property
    def adapters(self) -> list[Any]:
        """The run's LoRA adapters ([`~mm_trainer.model.adapters.LoraAdapter`])."""
        return self.mm.adapters

    @property
    def eva(self) -> Any:
        """The [`~mm_trainer.quant.EvaReport`] when `init_lora_weights="eva"` (`None` otherwise)."""
        return self.mm.eva

    @property
    def audit_sections(self) -> dict[str, Callable[[], dict[str, Any]]]:
        """Feature sections of the audit: name -> callable returning a JSON-ready dict."""
        return self.mm.audit_sections

    @property
    def telemetry(self) -> Any:
        """The [`~mm_trainer.core.telemetry.TowerTelemetry`] (`None` without adapters, or when both
        `tower_telemetry` and `audit` are off; with `audit` alone it tracks but logs nothing)."""
        return self.mm.telemetry

    @property
    def modality_balance(self) -> Any:
        """IMoD and the Non-Text Dominance Rate ([`~mm_trainer.imod.ModalityBalance`], `None` when neither
        applies)."""
        return self.mm.modality_balance

    @property
    def batch_guard(self) -> Any:
        """The per-batch modality check ([`~mm_trainer.core.batch_guard.BatchModalityGuard`])."""
        return self.mm.batch_guard

    @property
    def dummy_media(self) -> Any:
        """Dummy media under sharding engines ([`~mm_trainer.core.dummy_media.DummyMedia`], `None` elsewhere)."""
        return self.mm.dummy_media

    @property
    def auditor(self) -> Any:
        """The [`~mm_trainer.audit.TrainingAuditor`] that writes the audit at every save (`None` when `audit=False`
        or without adapters)."""
        return self.mm.auditor

    @property
    def raw_loss(self) -> Any:
        """The unfiltered training loss ([`~mm_trainer.audit.raw_loss.RawLoss`]) the audit reads."""
        return self.mm.raw_loss

    # -- the training loop -------------------------------------------------------------------------------------------
    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        accumulation = (
            getattr(self, "current_gradient_accumulation_steps", None) or self.args.gradient_accumulation_steps
        )
        self.mm.before_forward(inputs, self.state.global_step + 1, self.model.training, accumulation)
        result = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        self.mm.after_forward()
        return result

    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        try:
            loss = super().training_step(model, inputs, num_items_in_batch)
        except BaseException:
            self.mm.abort_micro_step()
            raise
        self.mm.after_backward(loss, self.state.global_step + 1, self.accelerator.sync_gradients)
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.model.training and "loss" in logs:
            logs.update(self.mm.log_metrics(self.state.global_step))  # collectives: every rank logs
        super().log(logs, start_time)

    # -- saving, pushing, resuming -----------------------------------------------------------------------------------
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the adapter as the TRL trainer does, then mm-trainer's files next to it (state, 4-bit recipe, audit).

        Call it on every process, as `Trainer.save_model` (the audit may gather sharded adapter weights). The adapter
        is written first and is kept whatever happens to the audit.
        """
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save:
            unmark_checkpoint(Path(output_dir))  # a checkpoint-N written again is unfinished until on_save
        if self.mm.engine.fsdp2 and self.is_fsdp_enabled and is_peft_model(self.model):
            self._save_fsdp2_adapter(output_dir)
        else:
            super().save_model(output_dir, _internal_call=True)  # the Hub push, if any, comes after our files below
        self.mm.write_files(Path(output_dir), self.args.should_save)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _save_fsdp2_adapter(self, output_dir: str) -> None:
        """Save the adapter of an FSDP2 run (every rank calls this).

        `Trainer.save_model` hands PEFT the state dict from `accelerator.get_state_dict`, whose LoRA tensors are still
        sharded `DTensor` s, and PEFT's save fails on them. Here every rank gathers the whole tensors of what PEFT
        keeps (the adapter weights, small), then the saving process writes them through the Trainer's own save
        (`save_pretrained` with that state dict, the processor, the training arguments).
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
            trainer_save(self, output_dir, whole)

    def bind_prepared_model(self) -> None:
        """Re-bind the adapters (telemetry, audit, IMoD, dominance rate) to the parameters of the prepared model
        (`on_train_begin`, after `accelerator.prepare`, which may replace them)."""
        self.mm.bind(self.model)

    def mark_checkpoint_complete(self, checkpoint: Path) -> None:
        """Mark `checkpoint` complete, after every file of it was written (`on_save`; the saving process only)."""
        self.mm.mark_complete(checkpoint, self.args.should_save)

    def mm_state(self) -> dict[str, Any]:
        """What a checkpoint keeps beyond the adapter (`mm_trainer_state.json`, see
        [`~mm_trainer.core.run.MultimodalCore.state_dict`])."""
        return self.mm.state_dict()

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        super().create_model_card(*args, **kwargs)
        if self.is_world_process_zero():
            self.mm.refresh_card(Path(self.args.output_dir))

    def push_to_hub(self, *args: Any, **kwargs: Any) -> Any:
        if self.mm.auditor is not None:
            self.mm.auditor.guard_push()  # AuditFailedError before any Hub call on a "fail" (the run is saved first)
        return super().push_to_hub(*args, **kwargs)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        if self.mm.auditor is not None and not self.mm.auditor.before_checkpoint_push(Path(checkpoint_folder)):
            return
        super()._push_from_checkpoint(checkpoint_folder)

    def train(
        self, resume_from_checkpoint: str | bool | None = None, trial: Any = None, ignore_keys_for_eval: Any = None
    ) -> Any:
        """`Trainer.train`; `resume_from_checkpoint=True` resumes from the newest *complete* checkpoint.

        Unfinished checkpoints (a kill during their save) are skipped with a warning naming them; a named unfinished
        checkpoint is refused with the name of the last complete one ([`~mm_trainer.utils.checkpoints`]). Before the
        Trainer loads anything, the checkpoint's settings are compared with this run's ([`~mm_trainer.core.resume`]).
        """
        checkpoint = resolve_resume_checkpoint(resume_from_checkpoint, self.args.output_dir)
        if checkpoint is not None and checkpoint.is_dir():
            self.mm.restore(checkpoint)
        output = super().train(
            resume_from_checkpoint=str(checkpoint) if checkpoint is not None else resume_from_checkpoint,
            trial=trial,
            ignore_keys_for_eval=ignore_keys_for_eval,
        )
        self.mm.finish_training(self.is_world_process_zero())
        return output
