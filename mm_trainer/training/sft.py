"""`MMSFTTrainer`: TRL's `SFTTrainer` with LoRA targets derived from the data, for multimodal models."""

from __future__ import annotations

from typing import Any

from datasets import Dataset, IterableDataset
from transformers import PreTrainedModel, TrainingArguments
from trl import SFTConfig, SFTTrainer

from ..model.modality import check_dataset_columns
from ..utils.inputs import check_model_path
from .config import MMSFTConfig
from .mixin import MMTrainerMixin
from .sft_errors import sft_init_error, with_hint
from .sft_probe_batch import sft_probe_batch


class MMSFTTrainer(MMTrainerMixin, SFTTrainer):
    """Drop-in replacement for TRL's `SFTTrainer` that fits LoRA to what the data reaches in a multimodal model.

    It takes exactly `SFTTrainer`'s arguments. Before PEFT wraps the model it profiles the data's modalities, maps
    every module of the model to a tower and resolves `peft_config.target_modules` to the exact modules of the towers
    the data reaches (confirmed by a one-batch probe). It prints that plan once, keeps it for the audit, optionally
    releases towers the data never reaches, and logs per-tower gradient telemetry during training (see
    [`~mm_trainer.training.mixin.MMTrainerMixin`] for what it adds and its attributes).

    With a plain causal LM and text data nothing changes: the same modules are adapted, with the same initial values.

    What only SFT needs is here: the config (`MMSFTConfig`, named `<model>-SFT` by default as TRL names it), the
    check that the dataset has a text column, TRL's own refusals of the input ([`~mm_trainer.training.sft_errors`])
    and the probe batch built with SFT's collators ([`~mm_trainer.training.sft_probe_batch`]).
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
        model, processing_class, resolved_peft_config = self.mm_prepare(
            model,
            args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            peft_config=peft_config,
            quantization_config=quantization_config,
            probe_batch=lambda m, pc: sft_probe_batch(train_dataset, pc, args, getattr(m, "config", None)),
            input_error=lambda m, pc: sft_init_error(m, args, train_dataset, pc, peft_config),
            with_hint=with_hint,
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
            quantization_config=None,  # consumed by the load in mm_prepare
            peft_config=resolved_peft_config,
            formatting_func=formatting_func,
        )
        self.mm_attach(resolved_peft_config)


def _as_mm_config(args: Any, model: Any) -> MMSFTConfig:
    """The trainer's own `MMSFTConfig`: a copy of the user's config (never the user's object), which the trainer may
    then change, like `SFTTrainer` does its config, without the change reaching the user's object. Without `args`,
    the default is named as TRL names `SFTTrainer`'s (`<model name>-SFT`)."""
    if args is None:
        name = model if isinstance(model, str) else model.config.name_or_path
        return MMSFTConfig(f"{(name or 'model').split('/')[-1]}-SFT")
    if isinstance(args, TrainingArguments):
        return MMSFTConfig.extend(args)
    raise TypeError(f"`args` must be an MMSFTConfig, SFTConfig or TrainingArguments, got {type(args).__name__}.")
