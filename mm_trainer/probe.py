"""Reachability probe: one forward + backward of a real batch tells which modules the data reaches.

A module is *reached* when it runs on the batch (fires) and the loss has a non-zero gradient with respect to its
output. That is exactly the condition for a LoRA adapter on it to ever get a non-zero gradient on ``lora_B``. It
catches what structure cannot: a vision tower fed a dummy image whose features are multiplied by zero, or
cross-attention layers of a language model that text-only input skips.

The probe adds a zero bias leaf to each candidate module's output and asks autograd for the gradient of the loss
with respect to those leaves only: no parameter gradient is stored and the weights are not touched.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .modality import batch_modalities, row_modalities

logger = logging.getLogger(__name__)


@dataclass
class ProbeResult:
    """What one probe batch reached.

    Attributes:
        candidates: Module paths that were watched.
        fired: Paths whose forward ran on the batch.
        nonzero_grad: Paths whose output got a non-zero loss gradient.
        batch_modalities: Non-text modalities the probe batch carried.
        loss: The probe loss.
        rows: Number of rows in the probe batch.
        tokens: Number of non-padding tokens in the probe batch.
    """

    candidates: list[str]
    fired: set[str] = field(default_factory=set)
    nonzero_grad: set[str] = field(default_factory=set)
    batch_modalities: set[str] = field(default_factory=set)
    loss: float = float("nan")
    rows: int = 0
    tokens: int = 0

    def status(self, name: str) -> str:
        """``"reached"``, ``"never_fired"`` or ``"zero_grad"`` for a watched module."""
        if name not in self.fired:
            return "never_fired"
        if name not in self.nonzero_grad:
            return "zero_grad"
        return "reached"

    def unreached(self) -> list[str]:
        """Watched modules that did not fire or got only a zero gradient, in watch order."""
        return [n for n in self.candidates if n not in self.nonzero_grad]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (module lists of unreached modules only, to stay small)."""
        return {
            "candidates": len(self.candidates),
            "reached": len(self.nonzero_grad & set(self.candidates)),
            "never_fired": [n for n in self.candidates if n not in self.fired],
            "zero_grad": [n for n in self.candidates if n in self.fired and n not in self.nonzero_grad],
            "batch_modalities": sorted(self.batch_modalities),
            "loss": self.loss,
            "rows": self.rows,
            "tokens": self.tokens,
        }


def _output_tensor(output: Any) -> torch.Tensor | None:
    if torch.is_tensor(output):
        return output
    return None


def probe_reachability(model: nn.Module, batch: Mapping[str, Any], module_names: Iterable[str]) -> ProbeResult:
    """Run one forward + backward of ``batch`` and report which of ``module_names`` the loss reaches.

    The model is put in eval mode (no dropout) for the probe and restored afterwards; parameters keep their values
    and gain no ``.grad``.

    Args:
        model: The base model (not yet PEFT-wrapped).
        batch: A collated batch with ``input_ids`` and ``labels`` (or from which a loss can be formed).
        module_names: Paths of the modules to watch (usually the LoRA target candidates).

    Returns:
        The :class:`ProbeResult`.
    """
    names = list(dict.fromkeys(module_names))
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise KeyError(f"Probe asked to watch modules the model does not have: {missing[:5]}")
    result = ProbeResult(candidates=names)
    leaves: dict[str, list[torch.Tensor]] = {}
    handles = []

    def make_hook(name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            result.fired.add(name)
            out = _output_tensor(output)
            if out is None or not out.is_floating_point():
                return None
            leaf = torch.zeros(out.shape[-1], dtype=out.dtype, device=out.device, requires_grad=True)
            leaves.setdefault(name, []).append(leaf)
            return out + leaf

        return hook

    for name in names:
        handles.append(modules[name].register_forward_hook(make_hook(name)))
    requires = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    try:
        for p in requires:
            p.requires_grad_(False)
        model.eval()
        batch = _to_device(batch, _model_device(model))
        with torch.enable_grad():
            outputs = model(**batch)
            loss = _loss_from(outputs, batch)
            flat = [leaf for name in names for leaf in leaves.get(name, [])]
            owners = [name for name in names for _ in leaves.get(name, [])]
            if flat and loss.requires_grad:
                grads = torch.autograd.grad(loss, flat, allow_unused=True)
                for owner, grad in zip(owners, grads):
                    if grad is not None and bool(torch.any(grad != 0)):
                        result.nonzero_grad.add(owner)
        result.loss = float(loss.detach().float())
    finally:
        for h in handles:
            h.remove()
        for p, flag in requires.items():
            p.requires_grad_(flag)
        model.train(was_training)
    input_ids = batch.get("input_ids")
    if input_ids is not None:
        result.rows = int(input_ids.shape[0])
        mask = batch.get("attention_mask")
        result.tokens = int(mask.sum()) if mask is not None else int(input_ids.numel())
    result.batch_modalities = batch_modalities(batch)
    return result


def _loss_from(outputs: Any, batch: Mapping[str, Any]) -> torch.Tensor:
    loss = getattr(outputs, "loss", None)
    if loss is None and isinstance(outputs, Mapping):
        loss = outputs.get("loss")
    if loss is not None:
        return loss
    logits = getattr(outputs, "logits", None)
    if logits is None:
        raise ValueError("The probe forward returned neither a loss nor logits; cannot tell what the data reaches.")
    labels = batch.get("labels")
    if labels is None:
        return logits.float().logsumexp(-1).mean()
    shift_logits = logits[..., :-1, :].float()
    shift_labels = labels[..., 1:].to(shift_logits.device)
    return nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=-100
    )


def _model_device(model: nn.Module) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device) and device.type != "meta":
        return device
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def _to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


# --------------------------------------------------------------------------------------------------------------------
# Building a probe batch from raw dataset rows, before TRL tokenizes the dataset.
# --------------------------------------------------------------------------------------------------------------------


def choose_probe_rows(rows: Sequence[Mapping[str, Any]], k: int) -> list[dict[str, Any]]:
    """Pick up to ``k`` rows that together cover every modality present in ``rows`` (text-only rows included)."""
    if k < 1:
        raise ValueError(f"`k` must be >= 1, got {k}.")
    by_kind: dict[frozenset[str], list[Mapping[str, Any]]] = {}
    for row in rows:
        by_kind.setdefault(frozenset(row_modalities(row)), []).append(row)
    chosen: list[Mapping[str, Any]] = []
    # Round-robin over kinds so a mixed dataset puts both text-only and media rows in the batch.
    kinds = sorted(by_kind, key=lambda s: (len(s), sorted(s)))
    i = 0
    while len(chosen) < k and any(by_kind.values()):
        kind = kinds[i % len(kinds)]
        if by_kind[kind]:
            chosen.append(by_kind[kind].pop(0))
        i += 1
    return [dict(r) for r in chosen]


def build_probe_batch(
    rows: Sequence[Mapping[str, Any]],
    processing_class: Any,
    *,
    dataset_text_field: str = "text",
    max_length: int | None = 512,
) -> dict[str, Any]:
    """Collate raw dataset rows into a model batch, the way TRL will at training time.

    Rows with images go through TRL's ``DataCollatorForVisionLanguageModeling``; rows with audio through the
    processor's ``audio=`` argument; text rows are tokenized (``input_ids``, chat ``messages``, ``prompt`` /
    ``completion`` or a text field).

    Args:
        rows: Raw rows of the training dataset.
        processing_class: The tokenizer or processor given to the trainer.
        dataset_text_field: Column holding plain text.
        max_length: Truncate each sequence to this many tokens (``None``: no truncation).

    Returns:
        A batch with ``input_ids``, ``attention_mask``, ``labels`` and media features where present.
    """
    if not rows:
        raise ValueError("No rows to build a probe batch from.")
    kinds = set().union(*(row_modalities(r) for r in rows))
    if "audio" in kinds:
        return _audio_batch(rows, processing_class, max_length)
    if "image" in kinds:
        return _vision_batch(rows, processing_class, dataset_text_field, max_length)
    if "video" in kinds:
        raise NotImplementedError("Probing video rows is not supported yet; set `target_probe=False`.")
    return _text_batch(rows, processing_class, dataset_text_field, max_length)


def _tokenizer_of(processing_class: Any) -> Any:
    return getattr(processing_class, "tokenizer", processing_class)


def _text_batch(rows, processing_class, text_field: str, max_length: int | None) -> dict[str, Any]:
    tokenizer = _tokenizer_of(processing_class)
    sequences = [_row_ids(row, tokenizer, text_field) for row in rows]
    if max_length is not None:
        sequences = [s[:max_length] for s in sequences]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        input_ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[i, : len(seq)] = 1
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _as_ids(encoded: Any) -> list[int]:
    if isinstance(encoded, Mapping):
        encoded = encoded["input_ids"]
    if torch.is_tensor(encoded):
        encoded = encoded.tolist()
    if encoded and isinstance(encoded[0], list):
        encoded = encoded[0]
    return list(encoded)


def _row_ids(row: Mapping[str, Any], tokenizer: Any, text_field: str) -> list[int]:
    if "input_ids" in row:
        return list(row["input_ids"])
    if "messages" in row:
        return _as_ids(tokenizer.apply_chat_template(_text_only(row["messages"]), tokenize=True))
    if "prompt" in row and "completion" in row:
        prompt, completion = row["prompt"], row["completion"]
        if isinstance(prompt, list):
            return _as_ids(tokenizer.apply_chat_template(_text_only(prompt + completion), tokenize=True))
        return _as_ids(tokenizer(prompt + completion, add_special_tokens=False))
    if text_field in row:
        return _as_ids(tokenizer(row[text_field]))
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


def _vision_batch(rows, processor: Any, text_field: str, max_length: int | None) -> dict[str, Any]:
    from transformers import ProcessorMixin
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

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
    collator = DataCollatorForVisionLanguageModeling(
        processor=processor, max_length=max_length, dataset_text_field=text_field
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
