"""TRL's own errors on the input a trainer is given, so that `MMSFTTrainer` fails exactly where `SFTTrainer` does.

`MMSFTTrainer` does its planning (tower map, modality profile, probe) before `SFTTrainer.__init__` runs. On input
that TRL refuses, mm-trainer would otherwise raise its own error first, with other words, and code that matches on
TRL's message (`pytest.raises(ValueError, match="vision-related")`, a `try` around the trainer) breaks. So the
trainer asks [`sft_init_error`] which error TRL's `SFTTrainer.__init__` raises on this input *before* it wraps
the model with PEFT, raises that one unchanged when mm-trainer has nothing to add, and otherwise raises it with
mm-trainer's own hint appended after TRL's words ([`with_hint`]): same type, same message prefix.

The conditions follow `trl/trainer/sft_trainer.py` (TRL 1.16) in its order; `tests/test_trl_wording.py` runs every
case through both trainers and compares the exception type and the message prefix, so a TRL upgrade that changes
any of them fails there.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase, ProcessorMixin

HINT_PREFIX = " [mm-trainer] "
"""Separates TRL's message from mm-trainer's hint in a combined error."""


def sft_init_error(
    model: Any, args: Any, train_dataset: Any, processing_class: Any, peft_config: Any
) -> Exception | None:
    """The exception `SFTTrainer.__init__` raises on this input before PEFT wraps the model, or `None`.

    Call it once the model is loaded and the processing class resolved (as TRL has them at these checks).

    Args:
        model: The loaded model.
        args: The trainer's `SFTConfig` (or subclass).
        train_dataset: The training dataset as given.
        processing_class: The resolved tokenizer or processor.
        peft_config: The PEFT config as given (`None` without PEFT).
    """
    from datasets import Dataset, IterableDataset

    if train_dataset is None:
        return ValueError("`train_dataset` is required")
    if not isinstance(train_dataset, (Dataset, IterableDataset)):
        return TypeError(
            f"`train_dataset` must be a `Dataset` or `IterableDataset`, got `{type(train_dataset).__name__}`."
        )
    if isinstance(processing_class, ProcessorMixin):
        tokenizer, is_vlm = processing_class.tokenizer, True
    elif isinstance(processing_class, PreTrainedTokenizerBase):
        tokenizer, is_vlm = processing_class, False
    else:
        return TypeError("The `processing_class` must be either a `PreTrainedTokenizerBase` or a `ProcessorMixin`")
    if args.eos_token is not None and args.eos_token not in tokenizer.get_vocab():
        return ValueError(
            f"The specified `eos_token` ('{args.eos_token}') is not found in the vocabulary of the given "
            f"`processing_class` ({processing_class.__class__.__name__}). Ensure that the `eos_token` exists "
            "in the vocabulary before using it as an EOS token."
        )
    if args.chat_template_path is not None:
        return None  # TRL may clone a template (and add tokens) here; its later checks are left to TRL itself
    first_row = next(iter(train_dataset))
    is_vision_dataset = "image" in first_row or "images" in first_row
    if is_vision_dataset and not is_vlm:
        return ValueError(
            "The dataset appears to be vision-related (contains 'image' or 'images' keys), but the provided "
            "model does not seem to be a vision-language model. Please check your model and dataset."
        )
    if is_vision_dataset and args.packing:
        return ValueError("Packing is not supported for vision datasets. Please set `packing=False` in the SFTConfig.")
    if is_vision_dataset and args.padding_free:
        return ValueError(
            "Padding-free training is yet not supported for vision datasets. Please set `padding_free=False` in "
            "the `SFTConfig`."
        )
    if is_vision_dataset and args.max_length is not None and args.truncation_mode == "keep_end":
        return ValueError(
            "truncation_mode='keep_end' is not supported for vision datasets. Image tokens reside "
            "inside the prompt portion of the sequence; depending on the example, keep_end may silently "
            "drop them, causing pixel_values to be forwarded to the model with no corresponding visual "
            "tokens in input_ids. Use truncation_mode='keep_start' (the default) or set max_length=None."
        )
    if peft_config is not None:
        from peft import PeftConfig, PeftModel

        if not isinstance(peft_config, PeftConfig):
            return TypeError(
                f"`peft_config` must be a `peft.PeftConfig` instance (e.g. `peft.LoraConfig`), "
                f"got {type(peft_config).__name__}."
            )
        if isinstance(model, PeftModel):
            return ValueError(
                "You passed a `PeftModel` instance together with a `peft_config` to the trainer. Please first merge "
                "and unload the existing adapter, save the resulting base model, and then pass that base model along "
                "with the new `peft_config` to the trainer."
            )
    return None


def with_hint(trl_error: Exception, hint: BaseException | str) -> Exception:
    """`trl_error`'s type and message, followed by mm-trainer's `hint`."""
    text = str(hint.args[0]) if isinstance(hint, BaseException) and hint.args else str(hint)
    message = str(trl_error.args[0]) if trl_error.args else str(trl_error)
    return type(trl_error)(f"{message}{HINT_PREFIX}{text}")
