"""`MultimodalCore`: everything mm-trainer adds to a training run once PEFT has wrapped the model.

It is built from explicit inputs (the [`~mm_trainer.core.planning.RunPlan`] decided before the wrap, the PEFT model,
the training arguments, the processing class, a way to get training batches and a way to read the run's progress)
and driven by hook calls that take what they need as arguments: it never reads a trainer. A TRL trainer carries it
through [`~mm_trainer.training.mixin.MMTrainerMixin`], which calls each hook from the matching public hook of the
Trainer (`compute_loss`, `training_step`, `log`, `save_model`, `train`, `push_to_hub`, callbacks).

Per micro-batch: [`before_forward`] (batch guard, IMoD / dominance arming, dummy media), [`after_forward`],
[`after_backward`] (or [`abort_micro_step`]); per log: [`log_metrics`]; per save: [`write_files`] and, for a
checkpoint, [`mark_complete`]; on resume: [`restore`]; after training: [`finish_training`].
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..audit import TrainingAuditor
from ..audit.raw_loss import RawLoss
from ..audit.report import AuditInputs
from ..imod import ModalityBalance
from ..model.adapters import LoraAdapter, lora_adapters
from ..model.peft_names import peft_method
from ..quant import initialize_eva
from ..utils.atomic import atomic_write_json
from ..utils.checkpoints import is_checkpoint_dir, write_complete_marker
from ..utils.jsonable import jsonable
from .batch_guard import BatchModalityGuard
from .dummy_media import DummyMedia
from .planning import RunPlan
from .resume import (
    SETTINGS_KEY,
    STATE_FILE,
    CheckpointStateError,
    check_settings,
    checkpoint_settings,
    corrupt_state,
    read_state,
    run_settings,
)
from .telemetry import TowerTelemetry

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Progress:
    """Where a run stands: what the audit and the checkpoint state read from the training loop.

    Attributes:
        global_step: Optimizer steps done.
        epoch: The (fractional) epoch.
        log_history: Every logged entry so far (the Trainer's `state.log_history`).
    """

    global_step: int = 0
    epoch: float | None = None
    log_history: list[dict[str, Any]] = field(default_factory=list)


class MultimodalCore:
    """The parts of a run: adapters, telemetry, IMoD / dominance rate, batch guard, dummy media, audit.

    Args:
        plan: What was decided before PEFT wrapped the model.
        model: The PEFT-wrapped model (its adapters are initialised).
        args: The training arguments (mm-trainer's fields included).
        processing_class: The tokenizer or processor (dummy media inputs are built with it).
        train_batches: Returns the training batches (EVA initialisation reads a few; called only for EVA).
        progress: Returns the run's [`Progress`] (called at audits and saves).
        save: Saves the adapter and mm-trainer's files to a folder without a Hub push (the trainer's `save_model`):
            a push the audit refuses keeps the run this way.
        peft_config: The PEFT config the model was wrapped with (the start-up note on unaudited methods).

    Attributes:
        plan: The [`~mm_trainer.core.planning.RunPlan`].
        engine: The run's [`~mm_trainer.distributed.engine.Engine`].
        adapters: The LoRA adapters (re-bound to the prepared model's parameters by [`bind`]).
        eva: The [`~mm_trainer.quant.EvaReport`] when `init_lora_weights="eva"` (`None` otherwise).
        audit_sections: Feature sections of the audit: name -> callable returning a JSON-ready dict.
        telemetry: The [`~mm_trainer.core.telemetry.TowerTelemetry`] (`None` without adapters, or when both
            `tower_telemetry` and `audit` are off; with `audit` alone it tracks but logs nothing).
        modality_balance: IMoD and the Non-Text Dominance Rate (`None` when neither applies).
        batch_guard: Raises on a batch holding a modality the plan did not see (`None` without a target plan).
        dummy_media: Dummy media for sharding engines (`None` elsewhere).
        auditor: Writes the audit at every save (`None` when `audit=False` or without adapters).
        raw_loss: The unfiltered training loss (transformers' `logging_nan_inf_filter` hides NaN steps).
    """

    def __init__(
        self,
        plan: RunPlan,
        model: Any,
        args: Any,
        processing_class: Any,
        train_batches: Callable[[], Iterable[Mapping[str, Any]]],
        progress: Callable[[], Progress],
        save: Callable[[str], None],
        peft_config: Any = None,
    ) -> None:
        self.plan = plan
        self.engine = plan.engine
        self.model = model
        self.args = args
        self.progress = progress
        if plan.quantized_base is not None:
            plan.quantized_base.install_adapters(model)  # adapter dtype, LoftQ's initial factors
        self.eva = initialize_eva(  # EVA init (init_lora_weights="eva") on adapters every batch reaches; else None
            model, train_batches, plan.tower_map, plan.profile, not args.disable_tqdm, engine=self.engine
        )
        self.adapters: list[LoraAdapter] = lora_adapters(model, plan.tower_map)
        self.audit_sections: dict[str, Callable[[], dict[str, Any]]] = {}
        if plan.quantized_base is not None:
            self.audit_sections["quantization"] = plan.quantized_base.audit_section
        if self.eva is not None:
            self.audit_sections["eva"] = self.eva.to_dict
        self.telemetry: TowerTelemetry | None = None
        if self.adapters and (args.tower_telemetry or args.audit):
            self.telemetry = TowerTelemetry(self.adapters)
            self.telemetry.watch_forward()
        self.modality_balance: ModalityBalance | None = ModalityBalance.build(args, plan.profile, self.adapters, model)
        if self.modality_balance is not None:
            self.audit_sections.update(self.modality_balance.audit_sections())
        self.batch_guard: BatchModalityGuard | None = None
        self.dummy_media: DummyMedia | None = None
        if plan.target_plan is not None:
            released = [r.path for r in plan.released_towers]
            self.batch_guard = BatchModalityGuard(plan.profile, getattr(model, "config", None), released)
            # Sharded engines (FSDP, ZeRO-3): media towers run on every micro-batch, on a zero-contribution dummy
            # input where the micro-batch holds no such media, so that every rank's collectives match.
            self.dummy_media = DummyMedia.for_run(
                self.engine,
                plan.tower_map,
                [r.tower for r in plan.released_towers],
                plan.profile,
                model,
                processing_class,
                self.telemetry,
            )
        self._guard_hook: Any = None  # the forward hook that reads a deferred guard check (see bind)
        # Keep last: the audit's init record must see the adapters exactly as training starts from them.
        self.auditor: TrainingAuditor | None = None
        if args.audit and self.adapters:
            self.auditor = TrainingAuditor(self.adapters, model, args, self.audit_inputs, save)
        self.raw_loss: RawLoss | None = RawLoss() if self.auditor is not None else None
        _warn_if_not_audited(self.adapters, peft_config, args)

    # -- binding to the prepared model -------------------------------------------------------------------------------
    def bind(self, model: Any) -> None:
        """Re-bind the adapters (telemetry, audit, IMoD, dominance rate) to the parameters of the prepared `model`,
        and place the batch guard's hook (call once the engine has prepared the model: `on_train_begin`).

        `accelerator.prepare` may replace parameters (FSDP2 swaps every one for a sharded `DTensor`); the init record
        and every counter are keyed by module name, so they carry over.
        """
        self.model = model
        self._bind_batch_guard(model)
        if not self.adapters:
            return
        adapters = lora_adapters(model, self.plan.tower_map)
        if [a.name for a in adapters] != [a.name for a in self.adapters]:
            raise RuntimeError(
                "mm-trainer: the prepared model holds other LoRA adapters than the model given to the trainer "
                f"({len(adapters)} vs {len(self.adapters)}). Something replaced adapter modules between the trainer's "
                "construction and `train()`."
            )
        self.adapters = adapters
        engine = self.engine
        if engine.fsdp_version == 1 and self.auditor is not None:
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
                adapters,
                reduce_sum=engine.sum if engine.distributed else None,
                capture_gradients=engine.deepspeed,
                world_size=engine.world_size,
            )
        if self.modality_balance is not None:
            self.modality_balance.bind(adapters)

    def _bind_batch_guard(self, model: Any) -> None:
        """Under engines whose forward runs no collective (DeepSpeed ZeRO-0/1/2) the batch guard's all-reduce runs
        during the forward and is read by a hook at its end, instead of blocking before it; elsewhere it blocks."""
        if self._guard_hook is not None:
            self._guard_hook.remove()
            self._guard_hook = None
        if self.batch_guard is None or not self.engine.distributed or not self.engine.forward_without_collectives:
            return
        guard = self.batch_guard
        self._guard_hook = model.register_forward_hook(lambda *_: guard.resolve())

    @property
    def deferred_batch_check(self) -> bool:
        """Whether the batch guard's check is read at the end of the forward (see [`bind`])."""
        return self._guard_hook is not None

    # -- per micro-batch ---------------------------------------------------------------------------------------------
    def before_forward(self, inputs: dict[str, Any], step: int, training: bool, accumulation_steps: int) -> None:
        """Before the model's forward on the micro-batch `inputs` of optimizer step `step` (1-based).

        Raises:
            UnseenModalityError: The batch (on any rank) holds a modality the plan did not see.
        """
        if self.batch_guard is not None:  # an unseen modality fails here, on every rank, not deep in the forward
            self.batch_guard.check(inputs, step, self.engine, defer=self._guard_hook is not None)
        if self.modality_balance is not None and training:
            # Arms IMoD's gradient injection and the dominance-rate hooks for this micro-batch (disarmed after the
            # backward). The loss itself is not changed.
            self.modality_balance.begin_micro_step(inputs, step, accumulation_steps, self.model.config)
        if self.dummy_media is not None:
            self.dummy_media.begin_micro_step(inputs)  # arms a dummy for each media tower this micro-batch lacks

    def after_forward(self) -> None:
        """After the loss was computed: read a deferred batch check whose hook did not run."""
        if self.batch_guard is not None and self.batch_guard.pending:
            # The forward did not go through the hooked model: read the check here and block from now on.
            logger.warning(
                "mm-trainer: the model's forward did not run its batch-check hook; the per-batch modality check now "
                "completes before each forward."
            )
            self._guard_hook.remove()
            self._guard_hook = None
            self.batch_guard.resolve()

    def abort_micro_step(self) -> None:
        """After a forward or backward that raised: never leave `lora_A` forwards replaced or hooks on."""
        if self.modality_balance is not None:
            self.modality_balance.abort_micro_step()

    def after_backward(self, loss: torch.Tensor, step: int, step_done: bool) -> None:
        """After the micro-batch's backward (`loss` as the training step returns it); `step_done` on the last
        micro-batch of optimizer step `step`, whose gradients are then complete and not yet clipped."""
        if self.dummy_media is not None and step_done:
            # A tower that only dummies ran in this step gets None gradients (AdamW skips it, as under DDP).
            self.dummy_media.end_step(self.engine.sum)
        if self.raw_loss is not None:  # the audit's unfiltered loss
            self.raw_loss.add(loss, step_done)
        if self.modality_balance is not None:
            self.modality_balance.after_backward(step, step_done, self.engine)
        if self.telemetry is not None and step_done:
            # Gradients of the optimizer step are complete (accumulated, reduced across ranks) and not yet clipped.
            self.telemetry.collect()

    # -- logging -----------------------------------------------------------------------------------------------------
    def log_metrics(self, step: int) -> dict[str, float]:
        """The metrics a training log at optimizer step `step` adds (call on every rank: it holds collectives)."""
        logs: dict[str, float] = {}
        if self.telemetry is not None:
            metrics = self.telemetry.flush(step)
            if self.args.tower_telemetry:
                logs.update(metrics)
        if self.modality_balance is not None:
            logs.update(self.modality_balance.log_metrics(self.engine))
        if self.raw_loss is not None:
            self.raw_loss.flush(step, self.engine.mean if self.engine.distributed else None)
        return logs

    def synchronize(self) -> None:
        """Make every rank agree on which adapters fired (a rank may never have seen an image batch) and count the
        telemetry's steps not yet counted (FSDP2, DeepSpeed): a collective under several processes."""
        if self.telemetry is not None:
            self.telemetry.synchronize()

    # -- audit -------------------------------------------------------------------------------------------------------
    def audit_inputs(self) -> AuditInputs:
        """What the audit reads, as the run stands (references, no copies)."""
        progress = self.progress()
        telemetry = self.telemetry
        return AuditInputs(
            model=self.model,
            adapters=self.adapters,
            tower_map=self.plan.tower_map,
            released_towers=self.plan.released_towers,
            target_plan=self.plan.target_plan,
            modality_profile=self.plan.profile,
            args=self.args,
            global_step=progress.global_step,
            epoch=progress.epoch,
            log_history=progress.log_history,
            fired=telemetry.fired if telemetry is not None else set(),
            nonzero_steps=telemetry.nonzero_steps if telemetry is not None else {},
            telemetry_history=telemetry.history if telemetry is not None else [],
            raw_loss_history=self.raw_loss.history if self.raw_loss is not None else None,
            sections=self.audit_sections,
        )

    # -- saving ------------------------------------------------------------------------------------------------------
    def write_files(self, output_dir: Path, should_save: bool) -> None:
        """Write `mm_trainer_state.json`, `quantization.json` and the audit into `output_dir`, next to the adapter
        just saved there (every rank calls this; only the process that saves writes, each file atomically)."""
        self.synchronize()  # collective: every rank agrees on what fired before the audit is built
        if self.auditor is not None:
            self.auditor.prepare_save()  # every rank: whatever the audit must gather across processes
        if not should_save:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(output_dir / STATE_FILE, self.state_dict())
        if self.plan.quantized_base is not None:
            self.plan.quantized_base.save(output_dir)  # quantization.json: how to rebuild the 4-bit base
        if self.auditor is None:
            return
        audit = self.auditor.on_save(output_dir)  # never raises: a failed audit is reported, the adapter stays
        if audit is not None and is_checkpoint_dir(output_dir):
            # TRL writes the output_dir model card before a checkpoint's save: refresh its audit section now.
            self.auditor.on_model_card(Path(self.args.output_dir), audit)

    def mark_complete(self, checkpoint: Path, should_save: bool) -> None:
        """Mark `checkpoint` complete, after every file of it was written (`on_save`; the saving process only)."""
        if should_save:
            write_complete_marker(checkpoint, self.progress().global_step)

    def refresh_card(self, output_dir: Path) -> None:
        """Put the latest audit into the `README.md` model card in `output_dir` (after the card is written)."""
        if self.auditor is not None and self.auditor.last_audit is not None:
            self.auditor.on_model_card(output_dir, self.auditor.last_audit)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps beyond the adapter: kept targets, released towers, telemetry, the audit's init
        record and unfiltered loss, the settings a resume compares (JSON-ready: NaN / infinity as strings)."""
        plan = self.plan.target_plan
        return jsonable(
            {
                "kept_targets": plan.kept() if plan is not None else None,
                "released_towers": [r.to_dict() for r in self.plan.released_towers],
                "telemetry": self.telemetry.state_dict() if self.telemetry is not None else None,
                "audit_init": self.auditor.state_dict() if self.auditor is not None else None,
                "modality_balance": self.modality_balance.state_dict() if self.modality_balance is not None else None,
                "raw_loss": self.raw_loss.state_dict() if self.raw_loss is not None else None,
                SETTINGS_KEY: run_settings(self.model, self.args),
                "global_step": self.progress().global_step,
            }
        )

    # -- resuming ----------------------------------------------------------------------------------------------------
    def restore(self, checkpoint: Path) -> None:
        """Restore mm-trainer's state from `checkpoint` after checking that this run may continue it.

        Raises:
            ResumeMismatchError: Other kept targets, PEFT method, rank / alpha, IMoD on / off or quantization.
            CheckpointStateError: `mm_trainer_state.json` is unreadable or of the wrong shape.
        """
        state = read_state(checkpoint)
        check_settings(checkpoint, checkpoint_settings(checkpoint, state), run_settings(self.model, self.args))
        if state is None:
            logger.warning("%s has no %s: telemetry history restarts from this resume.", checkpoint, STATE_FILE)
            if self.auditor is not None:
                self.auditor.load_state_dict(None)
            return
        plan = self.plan.target_plan
        kept = state.get("kept_targets")
        if kept is not None and plan is not None and sorted(kept) != sorted(plan.kept()):
            only_ckpt = sorted(set(kept) - set(plan.kept()))[:5]
            only_now = sorted(set(plan.kept()) - set(kept))[:5]
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

    # -- end of training ---------------------------------------------------------------------------------------------
    def finish_training(self, is_main_process: bool) -> None:
        """After `train()`: every rank agrees on what fired, the audit of the final weights is built (every rank) and
        its summary printed (main process); IMoD says if it never applied."""
        self.synchronize()  # so that a save after training sees what every rank ran
        if self.auditor is not None:
            self.auditor.prepare_save()  # every rank, like a save: the summary is the audit of the final weights
            if is_main_process:
                self.auditor.print_summary()
        if self.modality_balance is not None:
            self.modality_balance.warn_if_unused()


def _warn_if_not_audited(adapters: list[LoraAdapter], peft_config: Any, args: Any) -> None:
    """Say at start-up when the audit and telemetry are off because the PEFT method has no LoRA A / B."""
    if adapters or peft_config is None or not (args.audit or args.tower_telemetry):
        return
    message = (
        f"mm-trainer audits and monitors LoRA adapters only: this {peft_method(peft_config)} run is NOT audited (no "
        "audit.json / AUDIT.md, no per-tower gradient telemetry, no push guard). Use a LoraConfig for an audited run."
    )
    logger.warning(message)
    warnings.warn(message, UserWarning, stacklevel=5)
