"""Generation-based evaluation: greedy answers to chat prompts, scored by exact match (metric shipped, offline)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from ..distributed.engine import is_zero3_partitioned
from ..metrics import load_metric

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def weights_for_generation(model: Any) -> Iterator[None]:
    """Make `model`'s weights usable by `generate` for the duration of the block.

    Under DeepSpeed ZeRO-3 a model partitioned at load (`zero3_init_flag`) holds empty local weights until the
    engine wraps it; then the engine's hooks gather each module's weights in its forward. Before that, this gathers
    every weight on every rank (`deepspeed.zero.GatheredParameters`, read-only) and partitions them again after the
    block: the whole model must fit on each device for that time. Every rank must enter the block (a collective), and
    `generate` then runs with `synced_gpus` (transformers' default under ZeRO-3). Elsewhere it does nothing.
    """
    if not is_zero3_partitioned(model) or hasattr(model, "ds_id"):  # not partitioned, or the engine's hooks gather
        yield
        return
    import deepspeed

    params = list(model.parameters())
    logger.info(
        "ZeRO-3: gathering %s parameters on every rank for generation.",
        f"{sum(p.ds_numel if hasattr(p, 'ds_numel') else p.numel() for p in params):,}",
    )
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def _prompt_messages(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation up to (not including) the last assistant turn."""
    messages = list(messages)
    while messages and messages[-1].get("role") == "assistant":
        messages.pop()
    return messages


@torch.no_grad()
def generate_answers(
    model: Any,
    processing_class: Any,
    rows: Sequence[dict[str, Any]],
    *,
    max_new_tokens: int = 24,
    batch_size: int = 16,
    desc: str = "generating",
) -> list[str]:
    """Greedy completions of each row's chat prompt (its `messages` minus the final assistant turn).

    Rows with `images` go through the processor with their images; others through the tokenizer.

    Args:
        model: A causal or image-text-to-text model (PEFT-wrapped or not).
        processing_class: Its tokenizer or processor.
        rows: Dataset rows with `messages` (and optionally `images`).
        max_new_tokens: Generation budget per answer.
        batch_size: Prompts per `generate` call.
        desc: Progress-bar label.

    Returns:
        The decoded completions, special tokens removed, in row order.
    """
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    was_training = model.training
    model.eval()
    stop = [tokenizer.eos_token_id]
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        stop.append(im_end)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    answers: list[str] = []
    device = next(p.device for p in model.parameters() if p.device.type != "meta")
    try:
        with weights_for_generation(model):
            for start in tqdm(range(0, len(rows), batch_size), desc=desc, leave=False):
                chunk = [rows[i] for i in range(start, min(start + batch_size, len(rows)))]
                texts = [
                    tokenizer.apply_chat_template(
                        _prompt_messages(r["messages"]), tokenize=False, add_generation_prompt=True
                    )
                    for r in chunk
                ]
                images = [r.get("images") or [] for r in chunk]
                if any(images):
                    inputs = processing_class(text=texts, images=[im for ims in images for im in ims], return_tensors="pt",
                                              padding=True)  # fmt: skip
                else:
                    inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
                inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
                output = model.generate(
                    **inputs,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=stop,
                )
                new_tokens = output[:, inputs["input_ids"].shape[1] :]
                answers.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return answers


def exact_match_accuracy(
    model: Any,
    processing_class: Any,
    rows: Sequence[dict[str, Any]],
    extract: Callable[[str], str] = str.strip,
    *,
    answer_column: str = "answer",
    max_new_tokens: int = 24,
    batch_size: int = 16,
    desc: str = "exact match",
) -> dict[str, Any]:
    """Exact-match accuracy of greedy answers against `row[answer_column]`, with the shipped `exact_match` metric.

    Args:
        extract: Maps a generated answer to the string compared with the reference (e.g. the final number).

    Returns:
        `{"exact_match": float, "predictions": [...], "references": [...], "generations": [...]}`.
    """
    generations = generate_answers(
        model, processing_class, rows, max_new_tokens=max_new_tokens, batch_size=batch_size, desc=desc
    )
    predictions = [extract(g) for g in generations]
    references = [str(rows[i][answer_column]) for i in range(len(rows))]
    score = load_metric("exact_match").compute(predictions=predictions, references=references, ignore_case=True)
    return {**score, "predictions": predictions, "references": references, "generations": generations}
