"""The offline test kit itself: tiny tokenizers, models, processors and datasets work with transformers and TRL."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from peft import LoraConfig
from PIL import Image
from transformers import AutoProcessor, AutoTokenizer, PreTrainedModel, ProcessorMixin
from trl import SFTConfig, SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

from tests.kit import (
    AUDIO_FAMILIES,
    FAMILIES,
    NO_GRADIENT_BY_DESIGN,
    PROCESSOR_FAMILIES,
    TOWER_MODULES,
    VLM_FAMILIES,
    as_iterable,
    audio_text_dataset,
    auto_model_class,
    image_text_dataset,
    make_processor,
    make_tokenizer,
    mixed_dataset,
    placeholder_ids,
    save_tiny,
    text_dataset,
    tiny_config,
    tiny_model,
)
from tests.kit.tokenizer import CHAT_PLACEHOLDERS, _build

VLM_PROCESSOR_FAMILIES = [f for f in VLM_FAMILIES if f in PROCESSOR_FAMILIES]
CONVERSATIONS = [
    [{"role": "user", "content": "What is 7 + 5?"}, {"role": "assistant", "content": "12"}],
    [
        {"role": "user", "content": "What is two plus three? Answer in one word."},
        {"role": "assistant", "content": "five"},
    ],
]


def _text_batch(family: str) -> dict[str, torch.Tensor]:
    """Two chat rows through the family's tokenizer and chat template; labels are the input ids minus padding."""
    batch = make_tokenizer(family).apply_chat_template(
        CONVERSATIONS, return_dict=True, padding=True, return_tensors="pt"
    )
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return dict(batch)


def _forward_backward(model: PreTrainedModel, batch: dict[str, Any]) -> float:
    model.train()
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss)
    return loss.item()


def _params_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- tokenizers -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_is_small_deterministic_and_copied(family):
    tok = make_tokenizer(family)
    assert 400 <= len(tok) <= 1000
    assert tok.pad_token == tok.eos_token == "<|endoftext|>"
    fresh = _build.__wrapped__(family)
    assert fresh.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()
    tok.add_tokens(["<extra>"])
    assert len(make_tokenizer(family)) == len(tok) - 1  # the cached original is never handed out
    text = "What is 7 + 5? The quick brown fox."
    assert tok.decode(tok(text)["input_ids"]) == text


@pytest.mark.parametrize("family", FAMILIES)
def test_chat_template_renders_parts_and_marks_assistant(family):
    tok = make_tokenizer(family)
    parts = [{"type": kind} for kind in ("image", "video", "audio")] + [{"type": "text", "text": "Hi"}]
    messages = [{"role": "user", "content": parts}, {"role": "assistant", "content": [{"type": "text", "text": "ok"}]}]
    rendered = tok.apply_chat_template(messages, tokenize=False)
    expected = "".join(CHAT_PLACEHOLDERS[family].get(kind, "") for kind in ("image", "video", "audio"))
    assert f"<|im_start|>user\n{expected}Hi<|im_end|>\n<|im_start|>assistant\nok<|im_end|>\n" in rendered
    prompt = tok.apply_chat_template(CONVERSATIONS[0][:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nWhat is 7 + 5?<|im_end|>\n<|im_start|>assistant\n")
    out = tok.apply_chat_template(CONVERSATIONS[0], return_dict=True, return_assistant_tokens_mask=True)
    masked = [i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tok.decode(masked) == "12<|im_end|>"


# --- models ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_model_builds_deterministically_and_trains_on_text(family):
    tok = make_tokenizer(family)
    config = tiny_config(family)
    assert config.get_text_config().vocab_size >= len(tok)
    model = tiny_model(family)
    assert type(model).__name__ == config.architectures[0]
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    assert _params_equal(model, tiny_model(family))
    assert not _params_equal(model, tiny_model(family, seed=1))
    for modules in TOWER_MODULES[family].values():
        for path in modules:
            model.get_submodule(path)
    loss = _forward_backward(model, _text_batch(family))
    assert abs(loss - math.log(len(tok))) < 1.0  # random init: close to uniform


@pytest.mark.parametrize("family", FAMILIES)
def test_placeholder_ids_match_tokenizer(family):
    tok = make_tokenizer(family)
    ids = placeholder_ids(family)
    expected = {"qwen2_5_vl": {"image", "video"}, "qwen3_vl": {"image", "video"}, "qwen2_audio": {"audio"}}
    assert set(ids) == expected.get(family, {"image"} if family in VLM_FAMILIES else set())
    names = {"image": "image_token", "video": "video_token", "audio": "audio_token"}
    for modality, token_id in ids.items():
        assert tok.convert_ids_to_tokens(token_id) == getattr(tok, names[modality])


def test_qwen_mrope_sections_fit_head_dim():
    for family in ("qwen2_5_vl", "qwen3_vl"):
        text = tiny_config(family).text_config
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        assert sum(text.rope_parameters["mrope_section"]) == head_dim // 2


# --- processors + TRL collator -----------------------------------------------------------------------------------


def _vision_grads(model: PreTrainedModel, family: str) -> tuple[int, int]:
    """(parameters of the vision tower with a non-zero gradient, parameters expected to get one)."""
    root = TOWER_MODULES[family]["vision"][0]
    dead = NO_GRADIENT_BY_DESIGN.get(family, ())
    params = [(n, p) for n, p in model.named_parameters() if n.startswith(root + ".") and not n.startswith(dead)]
    return sum(1 for _, p in params if p.grad is not None and p.grad.abs().sum() > 0), len(params)


@pytest.mark.parametrize("family", VLM_PROCESSOR_FAMILIES)
def test_trl_collator_image_batch(family):
    processor = make_processor(family)
    assert isinstance(processor, ProcessorMixin)
    ds = image_text_dataset(2, family=family)
    batch = DataCollatorForVisionLanguageModeling(processor)([ds[0], ds[1]])
    image_id = placeholder_ids(family)["image"]
    n_placeholders = (batch["input_ids"] == image_id).sum(dim=1)
    assert (n_placeholders > 0).all()
    if family.startswith("qwen"):
        assert n_placeholders.tolist() == (batch["image_grid_thw"].prod(-1) // 4).tolist()
    model = tiny_model(family)
    _forward_backward(model, batch)
    with_grad, expected = _vision_grads(model, family)
    assert with_grad == expected > 0  # image features reached the loss


@pytest.mark.parametrize("family", VLM_PROCESSOR_FAMILIES)
def test_trl_collator_mixed_batch(family):
    ds = mixed_dataset(2, family=family)
    assert ds[0]["images"] == [] and len(ds[1]["images"]) == 1
    batch = DataCollatorForVisionLanguageModeling(make_processor(family))([ds[0], ds[1]])
    has_image = (batch["input_ids"] == placeholder_ids(family)["image"]).any(dim=1)
    assert has_image.tolist() == [False, True]
    _forward_backward(tiny_model(family), batch)


def test_trl_collator_assistant_only_loss_uses_generation_markers():
    processor = make_processor("qwen2_5_vl")
    ds = image_text_dataset(2, family="qwen2_5_vl")
    batch = DataCollatorForVisionLanguageModeling(processor, assistant_only_loss=True)([ds[0], ds[1]])
    kept = batch["input_ids"][0][batch["labels"][0] != -100]
    assert processor.tokenizer.decode(kept) == "red<|im_end|>"


@pytest.mark.parametrize("family", AUDIO_FAMILIES)
def test_audio_processor_batch(family):
    processor = make_processor(family)
    ds = audio_text_dataset(2)
    conversations = []
    for row in (ds[0], ds[1]):
        messages = copy.deepcopy(row["messages"])
        for part in messages[0]["content"]:
            if part["type"] == "audio":
                part["audio"] = row["audio"]["array"]
        conversations.append(messages)
    batch = processor.apply_chat_template(
        conversations, tokenize=True, return_dict=True, return_tensors="pt", processor_kwargs={"padding": True}
    )
    frames = batch["feature_attention_mask"].sum(-1)
    expected = (((frames - 1) // 2 + 1) - 2) // 2 + 1  # two strided convs, then pooling
    assert (batch["input_ids"] == placeholder_ids(family)["audio"]).sum(dim=1).tolist() == expected.tolist()
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    model = tiny_model(family)
    _forward_backward(model, dict(batch))
    tower = model.get_submodule(TOWER_MODULES[family]["audio"][0])
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in tower.layers.parameters())


# --- TRL SFTTrainer ----------------------------------------------------------------------------------------------


def _sft_args(tmp_path: Path, steps: int) -> SFTConfig:
    return SFTConfig(
        output_dir=str(tmp_path),
        max_steps=steps,
        per_device_train_batch_size=2,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        learning_rate=1e-3,
        logging_steps=1,
    )


def _lora() -> LoraConfig:
    return LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"])


def test_sft_text_only_leaves_vision_lora_untrained(tmp_path):
    """Stock TRL + PEFT on text-only data: the vision tower's LoRA never moves (the bug mm_trainer fixes)."""
    trainer = SFTTrainer(
        model=tiny_model("qwen2_5_vl"),
        args=_sft_args(tmp_path, 3),
        train_dataset=text_dataset(8),
        processing_class=make_tokenizer("qwen2_5_vl"),
        peft_config=_lora(),
    )
    trainer.train()
    assert [log["step"] for log in trainer.state.log_history if "loss" in log] == [1, 2, 3]
    lora_b = {n: p for n, p in trainer.model.named_parameters() if "lora_B" in n}
    vision = [p for n, p in lora_b.items() if ".visual.blocks." in n and ".mlp.down_proj." in n]
    language = [p for n, p in lora_b.items() if ".language_model." in n]
    assert len(vision) == 2 and all(torch.count_nonzero(p) == 0 for p in vision)
    assert language and all(torch.count_nonzero(p) > 0 for p in language)


def test_sft_image_text_with_processor(tmp_path):
    trainer = SFTTrainer(
        model=tiny_model("qwen2_5_vl"),
        args=_sft_args(tmp_path, 2),
        train_dataset=image_text_dataset(4, family="qwen2_5_vl"),
        processing_class=make_processor("qwen2_5_vl"),
        peft_config=_lora(),
    )
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    vision = [p for n, p in trainer.model.named_parameters() if "lora_B" in n and ".visual.blocks." in n]
    assert vision and all(torch.count_nonzero(p) > 0 for p in vision)


# --- save / reload -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_save_tiny_reloads_offline(family, tmp_path):
    path = save_tiny(family, tmp_path / family)
    assert (path / "model.safetensors").is_file()
    reloaded = auto_model_class(family).from_pretrained(path)
    original = tiny_model(family)
    assert type(reloaded) is type(original) and _params_equal(reloaded, original)
    tokenizer = AutoTokenizer.from_pretrained(path)
    batch = _text_batch(family)
    again = tokenizer.apply_chat_template(CONVERSATIONS, return_dict=True, padding=True, return_tensors="pt")
    assert torch.equal(again["input_ids"], batch["input_ids"])
    with torch.no_grad():
        assert torch.equal(original(**batch).logits, reloaded.eval()(**batch).logits)
    if family in PROCESSOR_FAMILIES:
        processor = AutoProcessor.from_pretrained(path)
        assert type(processor) is type(make_processor(family))


def test_reloaded_qwen_processor_gives_same_image_batch(tmp_path):
    path = save_tiny("qwen2_5_vl", tmp_path)
    ds = image_text_dataset(2, family="qwen2_5_vl")
    rows = [ds[0], ds[1]]
    fresh = DataCollatorForVisionLanguageModeling(make_processor("qwen2_5_vl"))(copy.deepcopy(rows))
    loaded = DataCollatorForVisionLanguageModeling(AutoProcessor.from_pretrained(path))(copy.deepcopy(rows))
    assert fresh.keys() == loaded.keys() and all(torch.equal(fresh[k], loaded[k]) for k in fresh)
    model = auto_model_class("qwen2_5_vl").from_pretrained(path).eval()
    with torch.no_grad():
        assert torch.equal(model(**loaded).logits, tiny_model("qwen2_5_vl")(**fresh).logits)


# --- datasets ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["messages", "text", "prompt_completion", "prompt_completion_text"])
def test_text_dataset_formats(fmt):
    ds = text_dataset(4, fmt=fmt)
    assert len(ds) == 4 and ds.to_list() == text_dataset(4, fmt=fmt).to_list()
    columns = {"messages": ["messages"], "text": ["text"]}.get(fmt, ["prompt", "completion"])
    assert ds.column_names == columns


def test_image_datasets():
    ds = image_text_dataset(3, family="llava")
    row = ds[0]
    assert isinstance(row["images"][0], Image.Image) and row["images"][0].size == (28, 28)
    assert [p["type"] for p in row["messages"][0]["content"]] == ["image", "text"]
    again = image_text_dataset(3, family="llava")
    assert all(np.array_equal(np.asarray(a["images"][0]), np.asarray(b["images"][0])) for a, b in zip(ds, again))
    mixed = mixed_dataset(8, image_every=4)
    assert [len(r["images"]) for r in mixed] == [0, 0, 0, 1, 0, 0, 0, 1]
    assert [len(r["images"]) for r in as_iterable(mixed)] == [0, 0, 0, 1, 0, 0, 0, 1]


def test_audio_dataset():
    ds = audio_text_dataset(2)
    for row in (ds[0], next(iter(as_iterable(ds)))):
        audio = row["audio"]
        assert isinstance(audio["array"], np.ndarray) and audio["array"].dtype == np.float32
        assert audio["sampling_rate"] == 16000 and audio["array"].shape == (8000,)
        assert [p["type"] for p in row["messages"][0]["content"]] == ["audio", "text"]
