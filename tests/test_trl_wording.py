"""Every error SFTTrainer raises on an input, MMSFTTrainer raises too: same type, TRL's words first.

Each case is built twice (trainers mutate their arguments) and given to both trainers with the same ``SFTConfig``.
"""

from __future__ import annotations

import pytest
from peft import LoraConfig, get_peft_model
from transformers import BitsAndBytesConfig
from trl import SFTConfig, SFTTrainer

from mm_trainer import MMSFTTrainer
from mm_trainer.training.sft_errors import HINT_PREFIX
from tests.kit import (
    FAST_CPU_TRAINING,
    image_text_dataset,
    make_processor,
    make_tokenizer,
    save_tiny,
    text_dataset,
    tiny_model,
)

LORA = {"r": 2, "target_modules": "all-linear"}


def _config(tmp_path, **overrides) -> SFTConfig:
    return SFTConfig(output_dir=str(tmp_path / "out"), **{**FAST_CPU_TRAINING, **overrides})


def _vlm(tmp_path, dataset_fn=lambda: image_text_dataset(4), **config):
    return {
        "model": tiny_model("qwen2_5_vl"),
        "args": _config(tmp_path, **config),
        "train_dataset": dataset_fn(),
        "processing_class": make_processor("qwen2_5_vl"),
        "peft_config": LoraConfig(**LORA),
    }


def _lm(tmp_path, **kw):
    case = {
        "model": tiny_model("causal_lm"),
        "args": _config(tmp_path),
        "train_dataset": text_dataset(4),
        "processing_class": make_tokenizer("causal_lm"),
        "peft_config": LoraConfig(**LORA),
    }
    case.update(kw)
    return case


def _peft_model_with_config(tmp_path):
    model = get_peft_model(tiny_model("causal_lm"), LoraConfig(**LORA))
    return _lm(tmp_path, model=model)


def _quantization_config_twice(tmp_path):
    path = save_tiny("causal_lm", tmp_path / "lm")
    quant = BitsAndBytesConfig(load_in_4bit=True)
    return {
        "model": str(path),
        "args": _config(tmp_path, model_init_kwargs={"quantization_config": quant}),
        "train_dataset": text_dataset(4),
        "quantization_config": quant,
    }


def _vision_data_text_model_by_path(tmp_path):
    # TRL's own test_vision_dataset_with_text_model_raises: a causal LM by path, its tokenizer loaded by the trainer.
    path = tmp_path / "lm"
    if not path.exists():
        save_tiny("causal_lm", path)
    return {"model": str(path), "args": _config(tmp_path), "train_dataset": image_text_dataset(4)}


CASES = {
    "vision_data_text_model_by_path": (_vision_data_text_model_by_path, True),
    "vision_data_text_model_with_lora": (
        lambda p: _lm(p, train_dataset=image_text_dataset(4)),
        True,  # mm-trainer adds: the model has no vision tower
    ),
    "vision_data_tokenizer_on_vlm": (lambda p: {**_vlm(p), "processing_class": make_tokenizer("qwen2_5_vl")}, True),
    "no_train_dataset": (lambda p: _lm(p, train_dataset=None), False),
    "list_train_dataset": (lambda p: _lm(p, train_dataset=list(text_dataset(4))), False),
    "processing_class_of_wrong_type": (lambda p: _lm(p, processing_class=object()), False),
    "eos_token_not_in_vocab": (lambda p: _lm(p, args=_config(p, eos_token="<no-such-token>")), False),
    "vision_packing": (lambda p: _vlm(p, packing=True), False),
    "vision_padding_free": (lambda p: _vlm(p, padding_free=True), False),
    "vision_keep_end": (lambda p: _vlm(p, max_length=64, truncation_mode="keep_end"), False),
    "peft_config_not_a_peft_config": (lambda p: _lm(p, peft_config={"r": 2}), False),
    "peft_model_with_peft_config": (_peft_model_with_config, False),
    "quantization_config_twice": (_quantization_config_twice, False),
}


def _raised(trainer_cls, kwargs) -> BaseException:
    with pytest.raises(Exception) as info:
        trainer_cls(**kwargs)
    return info.value


@pytest.mark.parametrize("case", sorted(CASES))
def test_error_type_and_words_are_trls(case, tmp_path):
    build, hinted = CASES[case]
    trl_error = _raised(SFTTrainer, build(tmp_path))
    mm_error = _raised(MMSFTTrainer, build(tmp_path))
    assert type(mm_error) is type(trl_error), (mm_error, trl_error)
    trl_message, mm_message = str(trl_error), str(mm_error)
    assert mm_message.startswith(trl_message), (mm_message, trl_message)
    # Where mm-trainer has its own diagnosis, it follows TRL's words; otherwise the message is TRL's alone.
    assert (HINT_PREFIX in mm_message) == hinted, mm_message


def test_hint_names_the_missing_tower_and_the_processor(tmp_path):
    text_model = _raised(MMSFTTrainer, CASES["vision_data_text_model_with_lora"][0](tmp_path))
    assert "vision-related" in str(text_model) and "has no vision tower" in str(text_model)
    tokenizer = _raised(MMSFTTrainer, CASES["vision_data_tokenizer_on_vlm"][0](tmp_path))
    assert "vision-language model" in str(tokenizer) and "Pass the model's processor" in str(tokenizer)
