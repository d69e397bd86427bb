"""The probe batch of `MMSFTTrainer`: a few raw training rows collated the way `SFTTrainer` will collate them.

TRL's `SFTTrainer` tokenizes the dataset in its `__init__`, after PEFT wraps the model, but the reachability probe
([`~mm_trainer.model.probe.probe_reachability`]) must run before that. So the probe batch is built here from raw
rows, with TRL's own collators (`DataCollatorForLanguageModeling`, `DataCollatorForVisionLanguageModeling`) and the
trainer's padding settings, tokenizing each row as TRL does.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..model.modality import row_modalities, sample_rows
from ..model.probe import choose_probe_rows
from ..upstream import trl_sft_collators

logger = logging.getLogger(__name__)


def build_probe_batch(
    rows: Sequence[Mapping[str, Any]],
    processing_class: Any,
    *,
    dataset_text_field: str = "text",
    max_length: int | None = 512,
    padding_free: bool = False,
    pad_to_multiple_of: int | None = None,
    completion_only_loss: bool | None = None,
    model_config: Any = None,
) -> dict[str, Any]:
    """Collate raw dataset rows into a model batch, the way TRL will at training time.

    Rows with images go through TRL's `DataCollatorForVisionLanguageModeling`; rows with audio through the
    processor's `audio=` argument; text rows are tokenized (`input_ids`, chat `messages`, `prompt` /
    `completion` or a text field, with the EOS TRL appends to plain text) and go through TRL's
    `DataCollatorForLanguageModeling`, with the trainer's padding settings.

    Args:
        rows: Raw rows of the training dataset.
        processing_class: The tokenizer or processor given to the trainer.
        dataset_text_field: Column holding plain text.
        max_length: Truncate each sequence to this many tokens (`None`: no truncation).
        padding_free: The trainer's padding-free mode (one flattened sequence, no attention mask).
        pad_to_multiple_of: The trainer's `pad_to_multiple_of`.
        completion_only_loss: Loss on the completion only for prompt-completion rows (`None`: as TRL, on when
            the rows have `prompt` and `completion`).
        model_config: The model's config; video rows get a probe clip built from it (see
            [`mm_trainer.model.video_probe`]).

    Returns:
        A batch with `input_ids`, `attention_mask`, `labels` and media features where present.
    """
    if not rows:
        raise ValueError("No rows to build a probe batch from.")
    kinds = set().union(*(row_modalities(r) for r in rows))
    if "audio" in kinds:
        return _audio_batch(rows, processing_class, max_length)
    if "image" in kinds:
        return _vision_batch(
            rows, processing_class, dataset_text_field, max_length, pad_to_multiple_of, completion_only_loss
        )
    if "video" in kinds:
        if model_config is None:
            raise NotImplementedError("Probing video rows needs the model config; set `target_probe=False`.")
        from ..model.video_probe import add_video  # video rows: a clip built from the config (no video processor here)

        text = _text_batch(rows, processing_class, dataset_text_field, max_length, False, None, completion_only_loss)
        return add_video(text, rows, model_config)
    return _text_batch(
        rows, processing_class, dataset_text_field, max_length, padding_free, pad_to_multiple_of, completion_only_loss
    )


def _tokenizer_of(processing_class: Any) -> Any:
    return getattr(processing_class, "tokenizer", processing_class)


def _text_batch(
    rows,
    processing_class,
    text_field: str,
    max_length: int | None,
    padding_free: bool,
    pad_to_multiple_of: int | None,
    completion_only_loss: bool | None,
) -> dict[str, Any]:
    DataCollatorForLanguageModeling, _ = trl_sft_collators()

    tokenizer = _tokenizer_of(processing_class)
    examples = []
    for row in rows:
        ids, prompt_len = _row_ids(row, tokenizer, text_field)
        if max_length is not None:
            ids = ids[:max_length]
        labels = list(ids)
        only_completion = completion_only_loss if completion_only_loss is not None else prompt_len > 0
        if only_completion and prompt_len:
            labels[:prompt_len] = [-100] * min(prompt_len, len(labels))
        examples.append({"input_ids": ids, "labels": labels})
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    collator = DataCollatorForLanguageModeling(
        pad_token_id=pad_id, padding_free=padding_free, pad_to_multiple_of=pad_to_multiple_of
    )
    return dict(collator(examples))


def _as_ids(encoded: Any) -> list[int]:
    if isinstance(encoded, Mapping):
        encoded = encoded["input_ids"]
    if torch.is_tensor(encoded):
        encoded = encoded.tolist()
    if encoded and isinstance(encoded[0], list):
        encoded = encoded[0]
    return list(encoded)


def _row_ids(row: Mapping[str, Any], tokenizer: Any, text_field: str) -> tuple[list[int], int]:
    """Token ids of a row as TRL tokenizes it, and the length of its prompt (0 when it has none)."""
    if "input_ids" in row:
        return list(row["input_ids"]), 0
    if "messages" in row:
        return _as_ids(tokenizer.apply_chat_template(_text_only(row["messages"]), tokenize=True)), 0
    if "prompt" in row and "completion" in row:
        prompt, completion = row["prompt"], row["completion"]
        if isinstance(prompt, list):
            prompt_ids = _as_ids(
                tokenizer.apply_chat_template(_text_only(prompt), tokenize=True, add_generation_prompt=True)
            )
            ids = _as_ids(tokenizer.apply_chat_template(_text_only(prompt + completion), tokenize=True))
            return ids, len(prompt_ids)
        eos = tokenizer.eos_token or ""
        completion = completion if completion.endswith(eos) else completion + eos
        prompt_ids = _as_ids(tokenizer(prompt, add_special_tokens=False))
        return prompt_ids + _as_ids(tokenizer(completion, add_special_tokens=False)), len(prompt_ids)
    if text_field in row:
        text, eos = row[text_field], tokenizer.eos_token or ""
        return _as_ids(tokenizer(text if text.endswith(eos) else text + eos)), 0
    raise KeyError(
        f"Cannot build a probe batch from a row with keys {sorted(row)}: expected 'input_ids', 'messages', "
        f"'prompt'+'completion' or '{text_field}'. Set `dataset_text_field`, or `target_probe=False` to map by "
        "structure only."
    )


def _text_only(messages: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Chat messages with list contents flattened to their text parts (a text tokenizer's template wants strings)."""
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            content = "".join(str(p.get("text") or "") for p in content if isinstance(p, Mapping))
        out.append({**m, "content": content})
    return out


def _vision_batch(
    rows,
    processor: Any,
    text_field: str,
    max_length: int | None,
    pad_to_multiple_of: int | None,
    completion_only_loss: bool | None,
) -> dict[str, Any]:
    from transformers import ProcessorMixin

    _, DataCollatorForVisionLanguageModeling = trl_sft_collators()

    if not isinstance(processor, ProcessorMixin):
        raise ValueError(
            "The dataset holds images but `processing_class` is a tokenizer, not a processor: images cannot be "
            "turned into pixels. Pass the model's processor (e.g. `AutoProcessor.from_pretrained(...)`)."
        )
    examples = []
    for row in rows:
        example = {k: copy.deepcopy(v) if k in ("messages", "prompt", "completion") else v for k, v in row.items()}
        if "image" in example:
            image = example.pop("image")
            example["images"] = [image] if image is not None else []
        example.setdefault("images", [])
        example["images"] = [im for im in example["images"] if im is not None]
        examples.append(example)
    if completion_only_loss is None:
        completion_only_loss = all("prompt" in e and "completion" in e for e in examples)
    collator = DataCollatorForVisionLanguageModeling(
        processor=processor,
        max_length=max_length,
        dataset_text_field=text_field,
        pad_to_multiple_of=pad_to_multiple_of,
        completion_only_loss=completion_only_loss,
    )
    return dict(collator(examples))


def _audio_batch(rows, processor: Any, max_length: int | None) -> dict[str, Any]:
    from transformers import ProcessorMixin

    if not isinstance(processor, ProcessorMixin):
        raise ValueError(
            "The dataset holds audio but `processing_class` is a tokenizer, not a processor. Pass the model's "
            "processor (e.g. `AutoProcessor.from_pretrained(...)`)."
        )
    texts, audios = [], []
    sampling_rate = None
    for row in rows:
        messages = row.get("messages")
        if messages is None:
            texts.append(str(row.get("text", "")))
        else:
            texts.append(processor.apply_chat_template(messages, tokenize=False))
        for column in ("audio", "audios"):
            value = row.get(column)
            if value is None:
                continue
            for clip in value if isinstance(value, list) else [value]:
                if isinstance(clip, Mapping):
                    sampling_rate = clip.get("sampling_rate", sampling_rate)
                    clip = clip.get("array")
                audios.append(clip)
    kwargs: dict[str, Any] = {"text": texts, "return_tensors": "pt", "padding": True}
    if audios:
        kwargs["audio"] = audios
        if sampling_rate is not None:
            kwargs["sampling_rate"] = sampling_rate
    encoded = dict(processor(**kwargs))
    input_ids = encoded["input_ids"]
    attention_mask = encoded.get("attention_mask", torch.ones_like(input_ids))
    if max_length is not None and input_ids.shape[1] > max_length:
        logger.info("Probe batch longer than %d tokens is kept whole: audio placeholders must stay.", max_length)
    encoded["labels"] = input_ids.masked_fill(attention_mask == 0, -100)
    return encoded


def sft_probe_batch(dataset: Any, processing_class: Any, args: Any, model_config: Any) -> dict[str, Any]:
    """The probe batch of an `SFTTrainer` run: a few rows of `dataset` covering every modality it holds, collated
    with the trainer's settings (`dataset_text_field`, `max_length`, padding-free, `pad_to_multiple_of`,
    `completion_only_loss`).

    Args:
        dataset: The raw training dataset.
        processing_class: The tokenizer or processor.
        args: The trainer's `SFTConfig` (with mm-trainer's `modality_sample_rows` and `target_probe_rows`).
        model_config: The model's config (video rows get a clip built from it).
    """
    # A small spread sample is enough to find rows of every kind; it avoids decoding hundreds of images.
    pool = sample_rows(dataset, min(args.modality_sample_rows, 8 * args.target_probe_rows))
    rows = choose_probe_rows(pool, args.target_probe_rows)
    return build_probe_batch(
        rows,
        processing_class,
        dataset_text_field=args.dataset_text_field,
        max_length=args.max_length,
        padding_free=bool(args.padding_free or (args.packing and args.packing_strategy in {"bfd", "bfd_split"})),
        pad_to_multiple_of=args.pad_to_multiple_of,
        completion_only_loss=args.completion_only_loss,
        model_config=model_config,
    )
