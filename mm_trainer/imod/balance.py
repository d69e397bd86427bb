"""`ModalityBalance`: IMoD injection and the Non-Text Dominance Rate, driven by a training loop's hooks.

The training loop calls, per micro-batch, [`ModalityBalance.begin_micro_step`] in `compute_loss` before the task
forward and [`~ModalityBalance.after_backward`] once `training_step`'s backward is done (the loss itself is not
changed: the constraint gradients travel inside LoRA's own `A` product, see [`mm_trainer.imod.inject`]);
[`~ModalityBalance.log_metrics`] when it logs; and [`~ModalityBalance.state_dict`] /
[`~ModalityBalance.load_state_dict`] at save / resume.

Which layers: LoRA `Linear` adapters of the language tower. Their input is the token sequence, checked batch by
batch (the input's leading dims must equal `input_ids.shape`; a layer that does not line up is skipped for that
batch and reported in the audit). Adapters on the vision / audio tower or the projector see patch or frame
features, not a mix of text and non-text tokens, so IMoD has nothing to split there: they train as plain LoRA.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any

from ..distributed.engine import Engine
from ..model.adapters import LoraAdapter
from ..model.modality import NON_TEXT_MODALITIES, ModalityProfile, placeholder_ids
from .dominance import DominanceTracker, lora_linear_modules
from .inject import IMoDInjector
from .masks import IMoDMasks
from .tokens import TokenLayout

logger = logging.getLogger(__name__)


def check_imod_data(args: Any, profile: ModalityProfile) -> None:
    """Refuse (`imod_text_only="error"`) or warn about (`"warn"`) `imod=True` on text-only data.

    Call before the trainer does any expensive work.

    Raises:
        ValueError: `imod=True`, the data is text-only and `imod_text_only="error"`.
    """
    if not getattr(args, "imod", False) or not profile.text_only:
        return
    seen = "declared by `data_modalities`" if profile.declared else f"found in {profile.rows_sampled} sampled rows"
    message = (
        f"imod=True needs training data with non-text tokens (images, video or audio), but the data is text-only "
        f"({seen}). IMoD splits each LoRA A into text / non-text / shared parts and builds its constraints from the "
        "non-text tokens of each batch, so on text-only data it would do nothing. Train on multimodal data, set "
        '`imod=False`, or set `imod_text_only="warn"` to train as plain LoRA.'
    )
    if args.imod_text_only == "error":
        raise ValueError(message)
    warnings.warn(message + " Training continues as plain LoRA (imod_text_only='warn').", UserWarning, stacklevel=4)


class ModalityBalance:
    """IMoD gradient injection (`imod=True`) and the dominance rate (`dominance_steps > 0`, multimodal data).

    Build it with [`build`].

    Attributes:
        injector: The [`~mm_trainer.imod.inject.IMoDInjector`] (`None` when IMoD is off).
        masks: Its masks (`None` when IMoD is off).
        dominance: The [`~mm_trainer.imod.dominance.DominanceTracker`] (`None` when off).
        dominance_steps: Measuring interval.
    """

    def __init__(
        self,
        injector: IMoDInjector | None,
        dominance: DominanceTracker | None,
        dominance_steps: int,
    ) -> None:
        self.injector = injector
        self.masks = injector.masks if injector is not None else None
        self.dominance = dominance
        self.dominance_steps = int(dominance_steps)
        self._warned_unused = False

    @classmethod
    def build(
        cls, args: Any, profile: ModalityProfile, adapters: list[LoraAdapter], model: Any
    ) -> ModalityBalance | None:
        """The balance of a run (after PEFT wrapped the model), or `None` when there is nothing to do.

        Args:
            args: The training arguments (`imod`, `imod_*`, `dominance_steps`, `seed`, `n_gpu`).
            profile: The training data's modality profile.
            adapters: The run's LoRA adapters.
            model: The PEFT-wrapped model (its config names the placeholder tokens).

        Raises:
            ValueError: `imod=True` without LoRA adapters on the language model, with DoRA, or with
                `torch.nn.DataParallel`.
        """
        candidates = [a for a in adapters if a.tower == "language" and lora_linear_modules(a) is not None]
        imod_on = bool(args.imod) and not profile.text_only
        # Token positions come from placeholder ids: without them no batch can be split into modalities.
        known = placeholder_ids(model.config)
        unknown = sorted(m for m in profile.modalities if m in NON_TEXT_MODALITIES and m not in known)
        injector = None
        if imod_on:
            if unknown:
                raise ValueError(
                    f"imod=True needs the token id of the {', '.join(unknown)} placeholders to tell text from non-text "
                    "tokens, but the model config names none (e.g. `image_token_id`). Set it on the config, e.g. "
                    "`model.config.image_token_id = processor.tokenizer.convert_tokens_to_ids('<image>')`."
                )
            _check_imod_model(adapters, candidates, model, args.n_gpu)
            seed = args.imod_seed if args.imod_seed is not None else args.seed
            masks = IMoDMasks.build(candidates, model, seed, args.imod_shared_ratio, args.imod_alpha)
            injector = IMoDInjector(candidates, masks, args.imod_lambda_msd, args.imod_lambda_ma)
        dominance = None
        if args.dominance_steps > 0 and not profile.text_only and candidates:
            if unknown:
                logger.warning("Non-Text Dominance Rate off: the model config names no %s placeholder id.", unknown)
            else:
                dominance = DominanceTracker(candidates)
        if injector is None and dominance is None:
            return None
        return cls(injector, dominance, args.dominance_steps)

    def bind(self, adapters: list[LoraAdapter]) -> None:
        """Use the parameters of `adapters` (the prepared model's, matched by name) from now on."""
        by_name = {a.name: a for a in adapters}
        for part in (self.injector, self.dominance):
            if part is not None:
                part.adapters = [by_name[a.name] for a in part.adapters]

    # ---------------------------------------------------------------------------------------------------------------
    # Per micro-batch
    # ---------------------------------------------------------------------------------------------------------------
    def measures(self, step: int) -> bool:
        """Whether optimizer step `step` (1-based) is one the dominance rate is measured on."""
        return self.dominance is not None and (step == 1 or step % self.dominance_steps == 0)

    def begin_micro_step(self, inputs: dict[str, Any], step: int, accumulation_steps: int, config: Any) -> None:
        """Arm IMoD and the dominance hooks for the micro-batch `inputs` (call before the forward).

        They stay armed through the backward, until [`after_backward`] (or [`abort_micro_step`] when the
        forward or backward raised).

        Args:
            inputs: The micro-batch.
            step: The optimizer step it belongs to (1-based).
            accumulation_steps: Micro-batches in this optimizer step.
            config: The model config (placeholder token ids).
        """
        measure = self.measures(step)
        if self.injector is None and not measure:
            return
        layout = TokenLayout.from_batch(inputs, config)
        if self.injector is not None:
            self.injector.arm(layout, self.constraint_scale(accumulation_steps))
        if measure:
            self.dominance.arm(layout)

    @staticmethod
    def constraint_scale(accumulation_steps: int) -> float:
        """Factor of a micro-batch's constraint gradient: `1 / (micro-batches in this optimizer step)`.

        The injected gradient never passes through the loss, so neither `Trainer`'s division of the loss by the
        accumulation steps nor TRL's `num_items_in_batch` normalisation (and its `× num_processes` under
        `average_tokens_across_devices`) reaches it: we scale it ourselves. Each micro-batch's constraint is a mean
        over its sequences; times `1 / GA` and averaged over ranks by DDP like every gradient, the step injects the
        mean over all its micro-batches, whichever way TRL normalises the task loss.
        """
        return 1.0 / accumulation_steps

    def abort_micro_step(self) -> None:
        """Disarm IMoD and the dominance hooks after a forward or backward that raised (`training_step` does).

        The micro-batch's constraint gradient may be partly in `A.grad`; the trainer's error propagates, as with any
        failed step. Safe to call when nothing is armed.
        """
        if self.injector is not None:
            self.injector.disarm()
        if self.dominance is not None:
            self.dominance.disarm()

    def after_backward(self, step: int, step_done: bool, engine: Engine) -> None:
        """Disarm after the micro-batch's backward; on the last micro-batch of a measured step, finish the rate.

        Args:
            step: The optimizer step (1-based).
            step_done: Whether this was the step's last micro-batch (its gradients are complete).
            engine: The run's engine (the Fisher sums are added over its ranks).
        """
        if self.injector is not None:
            self.injector.disarm()
        if self.dominance is None or not self.dominance.measuring:
            return
        self.dominance.disarm()
        if step_done:
            self.dominance.finish_step(step, engine.sum if engine.distributed else None)

    # ---------------------------------------------------------------------------------------------------------------
    # Logging, audit, checkpoint
    # ---------------------------------------------------------------------------------------------------------------
    def log_metrics(self, engine: Engine) -> dict[str, float]:
        """`imod/msd`, `imod/ma` (means since the last log, over ranks) and `dominance/non_text_rate`.

        Runs a collective under several ranks: call it on every rank (`Trainer.log` of a training log is).
        """
        logs: dict[str, float] = {}
        if self.injector is not None:
            sums = engine.sum(self.injector.pop_metrics(engine.device))
            msd_sum, msd_n, ma_sum, ma_n = sums.tolist()
            if msd_n:
                logs["imod/msd"] = msd_sum / msd_n
            if ma_n:
                logs["imod/ma"] = ma_sum / ma_n
        if self.dominance is not None:
            rate = self.dominance.pop_pending()
            if rate is not None:
                logs["dominance/non_text_rate"] = rate
        return logs

    def audit_sections(self) -> dict[str, Callable[[], dict[str, Any]]]:
        """Audit sections: `imod` (when on) and `dominance` (when measured)."""
        sections: dict[str, Callable[[], dict[str, Any]]] = {}
        if self.injector is not None:
            sections["imod"] = self._imod_audit
        if self.dominance is not None:
            sections["dominance"] = self._dominance_audit
        return sections

    def _imod_audit(self) -> dict[str, Any]:
        injector = self.injector
        return {
            **self.masks.to_dict(),
            "lambda_msd": injector.lambda_msd,
            "lambda_ma": injector.lambda_ma,
            **injector.state(),
        }

    def _dominance_audit(self) -> dict[str, Any]:
        return {
            "definition": "share of watched LoRA A/B elements whose per-modality Fisher from non-text tokens exceeds "
            "that from text tokens",
            "dominance_steps": self.dominance_steps,
            "watched_adapters": len(self.dominance.adapters),
            "non_text_rate": self.dominance.latest["non_text_rate"] if self.dominance.latest else None,
            **self.dominance.state_dict(),
        }

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps: the mask settings and fingerprint, IMoD counters, the dominance history."""
        state: dict[str, Any] = {}
        if self.injector is not None:
            state["imod"] = {**self.masks.settings(), "fingerprint": self.masks.fingerprint(), **self.injector.state()}
        if self.dominance is not None:
            state["dominance"] = self.dominance.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any] | None, checkpoint: Any) -> None:
        """Restore a checkpoint's state; refuse to resume IMoD with masks other than the checkpoint's.

        Raises:
            ValueError: The checkpoint trained with IMoD masks that differ from this run's.
        """
        state = state or {}
        saved = state.get("imod")
        if saved is not None and self.masks is not None and saved.get("fingerprint") != self.masks.fingerprint():
            ours = self.masks.settings()
            theirs = {k: saved.get(k) for k in ours}
            hint = (
                "Resume with the checkpoint's `imod_seed`, `imod_shared_ratio` and `imod_alpha`"
                if theirs != ours
                else "The settings match but the masks differ (another mm_trainer version or other target modules); "
                "resume with the mm_trainer version and `peft_config` that wrote the checkpoint"
            )
            raise ValueError(
                f"The checkpoint at {checkpoint} trained with other IMoD masks than this run builds (checkpoint: "
                f"{theirs}, fingerprint {str(saved.get('fingerprint'))[:12]}; this run: {ours}, fingerprint "
                f"{self.masks.fingerprint()[:12]}). {hint}."
            )
        if saved is not None and self.injector is not None:
            self.injector.micro_steps = int(saved.get("micro_steps", 0))
            self.injector.micro_steps_with_non_text = int(saved.get("micro_steps_with_non_text", 0))
        if self.dominance is not None and state.get("dominance"):
            self.dominance.load_state_dict(state["dominance"])

    def warn_if_unused(self) -> None:
        """Warn when IMoD ran but never saw a non-text token, or no constrained layer lined up with the tokens."""
        injector = self.injector
        if injector is None or injector.micro_steps == 0 or self._warned_unused:
            return
        if injector.micro_steps_with_non_text == 0:
            message = (
                f"IMoD saw no non-text token in {injector.micro_steps} micro-batches: the constraints were zero and "
                "training was plain LoRA. Check that the batches carry images / video / audio and that the model "
                "config names their placeholder token ids (`image_token_id`, ...)."
            )
        elif not injector.aligned_layers:
            message = (
                f"No IMoD layer's input lined up with `input_ids` ({len(injector.adapters)} language-model LoRA "
                "layers): the constraints were never applied and training was plain LoRA."
            )
        else:
            return
        self._warned_unused = True
        warnings.warn(message, UserWarning, stacklevel=2)
        logger.warning(message)


def _check_imod_model(adapters: list[LoraAdapter], candidates: list, model: Any, n_gpu: int) -> None:
    """IMoD needs plain LoRA `Linear` adapters on the language model, and DDP rather than `DataParallel`."""
    if not adapters:
        raise ValueError(
            "imod=True needs LoRA adapters: pass `peft_config=LoraConfig(...)` (IMoD splits each LoRA A matrix)."
        )
    if not candidates:
        towers = sorted({a.tower for a in adapters})
        raise ValueError(
            f"imod=True constrains LoRA Linear layers of the language model, but all {len(adapters)} adapters "
            f"sit on {towers}. Include language-model modules in `target_modules` (e.g. `q_proj`, `v_proj`) and "
            '`"language"` in `target_towers`.'
        )
    peft_configs = getattr(model, "peft_config", {}) or {}
    if any(getattr(c, "use_dora", False) for c in peft_configs.values()):
        raise ValueError(
            "imod=True is defined for plain LoRA (W + s·BA); DoRA rescales the update by a learned magnitude. Set "
            "`use_dora=False` in the LoraConfig or `imod=False`."
        )
    if n_gpu > 1:
        raise ValueError(
            "imod=True does not support torch.nn.DataParallel (several GPUs in one process). Launch one process per "
            "GPU with `accelerate launch` or `torchrun` (DDP)."
        )
