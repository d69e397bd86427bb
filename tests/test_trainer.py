"""MMSFTTrainer as a drop-in SFTTrainer: identical on plain LMs, language-only on text data, mixed data, resume."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file
from transformers import TrainingArguments
from trl import SFTConfig, SFTTrainer

from mm_trainer import MMSFTConfig, MMSFTTrainer
from tests.kit import (
    as_iterable,
    image_text_dataset,
    make_processor,
    make_tokenizer,
    mixed_dataset,
    text_dataset,
    tiny_model,
    training_args,
)

SUFFIXES = ["q_proj", "v_proj", "down_proj"]


def _args(cls, tmp_path, **kw):
    return training_args(tmp_path, cls, **kw)


def _adapter(trainer) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(trainer.model).items()}


def test_plain_llm_identical_to_sft_trainer(tmp_path):
    data = text_dataset(12)
    tok = make_tokenizer("causal_lm")
    runs = {}
    for name, trainer_cls, config_cls in (("sft", SFTTrainer, SFTConfig), ("mm", MMSFTTrainer, MMSFTConfig)):
        trainer = trainer_cls(
            model=tiny_model("causal_lm"),
            args=_args(config_cls, tmp_path / name, gradient_accumulation_steps=2),
            train_dataset=data,
            processing_class=tok,
            peft_config=LoraConfig(r=4, target_modules=SUFFIXES),
        )
        trainer.train()
        runs[name] = _adapter(trainer)
    assert runs["sft"].keys() == runs["mm"].keys() and runs["mm"]
    for key in runs["sft"]:
        torch.testing.assert_close(runs["mm"][key], runs["sft"][key], atol=1e-6, rtol=0)
    moved = [k for k in runs["mm"] if "lora_B" in k and runs["mm"][k].abs().sum() > 0]
    assert len(moved) == len([k for k in runs["mm"] if "lora_B" in k])


def test_text_only_on_vlm_adapts_language_only(tmp_path):
    trainer = MMSFTTrainer(
        model=tiny_model("qwen2_5_vl"),
        args=_args(MMSFTConfig, tmp_path, free_unreached_towers=False),
        train_dataset=text_dataset(12),
        processing_class=make_tokenizer("qwen2_5_vl"),
        peft_config=LoraConfig(r=4, target_modules=SUFFIXES),
    )
    assert trainer.args.ddp_find_unused_parameters is False  # every adapter gets a gradient on every batch
    trainer.train()
    adapter = _adapter(trainer)
    assert adapter and all(k.startswith("base_model.model.model.language_model.") for k in adapter)
    assert all(adapter[k].abs().sum() > 0 for k in adapter if "lora_B" in k)
    history = [h for h in trainer.state.log_history if "grad_norm/language" in h]
    assert len(history) == 3 and all(h["active_adapters/language"] == 1.0 for h in history)
    assert not any(k.startswith("grad_norm/vision") for h in trainer.state.log_history for k in h)
    # The telemetry's tower norm is the adapters' gradient norm: the Trainer's own grad_norm (all trainables).
    assert history[0]["grad_norm/language"] == pytest.approx(history[0]["grad_norm"], rel=1e-5)


def test_iterable_dataset_and_model_path(tmp_path):
    from tests.kit import save_tiny

    path = save_tiny("qwen2_5_vl", tmp_path / "model")
    trainer = MMSFTTrainer(
        model=str(path),
        args=_args(MMSFTConfig, tmp_path / "out", max_steps=2),
        train_dataset=as_iterable(text_dataset(8)),
        peft_config=LoraConfig(r=4, target_modules="all-linear"),
    )
    assert {trainer.tower_map.tower_of(n) for n in trainer.target_plan.kept()} == {"language"}
    trainer.train()


def test_released_tower_adapter_loads_on_fresh_full_model(tmp_path):
    tok = make_tokenizer("qwen2_5_vl")
    trainer = MMSFTTrainer(
        model=tiny_model("qwen2_5_vl"),
        args=_args(MMSFTConfig, tmp_path),
        train_dataset=text_dataset(12),
        processing_class=tok,
        peft_config=LoraConfig(r=4, target_modules="all-linear"),
    )
    assert [r.path for r in trainer.released_towers] == ["model.visual"]
    assert sum(p.numel() for p in trainer.model.parameters()) < sum(
        p.numel() for p in tiny_model("qwen2_5_vl").parameters()
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    batch = tok(["What is 2 + 3?", "What is 9 + 9? It is"], return_tensors="pt", padding=True)
    trainer.model.eval()
    with torch.no_grad():
        before = trainer.model(**batch).logits
    fresh = tiny_model("qwen2_5_vl")
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "final")
    report = loaded.load_adapter(tmp_path / "final", adapter_name="check")
    assert not report.missing_keys and not report.unexpected_keys
    loaded.set_adapter("default")
    with torch.no_grad():
        after = loaded(**batch).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    state = json.loads((tmp_path / "final" / "mm_trainer_state.json").read_text())
    assert state["released_towers"][0]["path"] == "model.visual"


def test_released_tower_refuses_images(tmp_path):
    trainer = MMSFTTrainer(
        model=tiny_model("qwen2_5_vl"),
        args=_args(MMSFTConfig, tmp_path, free_unreached_towers=True),
        train_dataset=text_dataset(4),
        processing_class=make_tokenizer("qwen2_5_vl"),
        peft_config=LoraConfig(r=4, target_modules="all-linear"),
    )
    visual = trainer.model.get_base_model().model.visual
    with pytest.raises(RuntimeError, match="free_unreached_towers=False"):
        visual(torch.zeros(4, 3), grid_thw=torch.tensor([[1, 2, 2]]))


def test_mixed_dataset_with_accumulation_and_checkpointing(tmp_path):
    family = "qwen2_5_vl"
    trainer = MMSFTTrainer(
        model=tiny_model(family),
        args=_args(
            MMSFTConfig,
            tmp_path,
            per_device_train_batch_size=1,
            gradient_accumulation_steps=2,
            gradient_checkpointing=True,
            max_length=None,
        ),
        train_dataset=mixed_dataset(8, family=family),
        processing_class=make_processor(family),
        peft_config=LoraConfig(r=4, target_modules="all-linear"),
    )
    assert trainer.modality_profile.mixed
    assert trainer.args.ddp_find_unused_parameters is True  # text-only batches leave vision adapters without grad
    towers = {trainer.tower_map.tower_of(n) for n in trainer.target_plan.kept()}
    assert towers == {"language", "vision", "projector"}
    assert not trainer.released_towers
    trainer.train()
    adapter = _adapter(trainer)
    assert any("visual" in k and "lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())
    towers_logged = {k.split("/")[1] for h in trainer.state.log_history for k in h if k.startswith("grad_norm/")}
    assert towers_logged == {"language", "vision", "projector"}


def test_bf16_like_sft_trainer(tmp_path):
    data = text_dataset(8)
    tok = make_tokenizer("causal_lm")
    results = []
    for trainer_cls, config_cls in ((SFTTrainer, SFTConfig), (MMSFTTrainer, MMSFTConfig)):
        trainer = trainer_cls(
            model=tiny_model("causal_lm"),
            args=_args(config_cls, tmp_path / config_cls.__name__, bf16=True, max_steps=2),
            train_dataset=data,
            processing_class=tok,
            peft_config=LoraConfig(r=4, target_modules="all-linear"),
        )
        trainer.train()
        results.append(_adapter(trainer))
    assert results[0] and results[1].keys() == results[0].keys()
    assert {v.dtype for v in results[1].values()} == {v.dtype for v in results[0].values()}
    for key in results[0]:
        torch.testing.assert_close(results[1][key], results[0][key], atol=1e-6, rtol=0)


def test_resume_keeps_targets_and_telemetry(tmp_path):
    def make(max_steps):
        return MMSFTTrainer(
            model=tiny_model("qwen2_5_vl"),
            args=_args(MMSFTConfig, tmp_path, max_steps=max_steps, save_strategy="steps", save_steps=2),
            train_dataset=text_dataset(16),
            processing_class=make_tokenizer("qwen2_5_vl"),
            peft_config=LoraConfig(r=4, target_modules=SUFFIXES),
        )

    first = make(2)
    first.train()
    saved = json.loads((tmp_path / "checkpoint-2" / "mm_trainer_state.json").read_text())
    assert [h["step"] for h in saved["telemetry"]["history"]] == [1, 2]
    second = make(4)
    second.train(resume_from_checkpoint=True)
    assert [h["step"] for h in second.telemetry.history] == [1, 2, 3, 4]
    assert second.telemetry.history[:2] == saved["telemetry"]["history"]
    assert second.target_plan.kept() == first.target_plan.kept()
    config = json.loads((tmp_path / "checkpoint-4" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(first.target_plan.kept())


def test_resume_refuses_other_targets(tmp_path):
    args = _args(MMSFTConfig, tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    MMSFTTrainer(
        model=tiny_model("qwen2_5_vl"),
        args=args,
        train_dataset=text_dataset(8),
        processing_class=make_tokenizer("qwen2_5_vl"),
        peft_config=LoraConfig(r=4, target_modules=["q_proj"]),
    ).train()
    other = MMSFTTrainer(
        model=tiny_model("qwen2_5_vl"),
        args=_args(MMSFTConfig, tmp_path, max_steps=4),
        train_dataset=text_dataset(8),
        processing_class=make_tokenizer("qwen2_5_vl"),
        peft_config=LoraConfig(r=4, target_modules=["v_proj"]),
    )
    with pytest.raises(ValueError, match="other target modules"):
        other.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))


def test_images_with_a_text_only_model(tmp_path):
    with pytest.raises(ValueError, match="has no vision tower"):
        MMSFTTrainer(
            model=tiny_model("causal_lm"),
            args=_args(MMSFTConfig, tmp_path),
            train_dataset=image_text_dataset(4),
            processing_class=make_tokenizer("causal_lm"),
            peft_config=LoraConfig(r=4, target_modules="all-linear"),
        )


def test_images_with_a_tokenizer(tmp_path):
    with pytest.raises(ValueError, match="processor"):
        MMSFTTrainer(
            model=tiny_model("qwen2_5_vl"),
            args=_args(MMSFTConfig, tmp_path),
            train_dataset=mixed_dataset(4),
            processing_class=make_tokenizer("qwen2_5_vl"),
            peft_config=LoraConfig(r=4, target_modules="all-linear"),
        )


def test_unknown_tower_and_empty_resolution(tmp_path):
    with pytest.raises(ValueError, match="Unknown tower name"):
        MMSFTConfig(output_dir=str(tmp_path), target_towers=["language", "retina"], use_cpu=True)
    with pytest.raises(ValueError, match="none of which the data reaches"):
        MMSFTTrainer(
            model=tiny_model("qwen2_5_vl"),
            args=_args(MMSFTConfig, tmp_path),
            train_dataset=text_dataset(4),
            processing_class=make_tokenizer("qwen2_5_vl"),
            peft_config=LoraConfig(r=4, target_modules=["qkv", "attn.proj"]),
        )


def test_config_from_cli_style_values(tmp_path):
    config = MMSFTConfig(output_dir=str(tmp_path), target_towers=["auto"], use_cpu=True)
    assert config.target_towers == "auto"
    sft = SFTConfig(output_dir=str(tmp_path), learning_rate=3e-4, use_cpu=True, report_to="none")
    trainer = MMSFTTrainer(
        model=tiny_model("causal_lm"),
        args=sft,
        train_dataset=text_dataset(4),
        processing_class=make_tokenizer("causal_lm"),
        peft_config=LoraConfig(r=4, target_modules=["q_proj"]),
    )
    assert isinstance(trainer.args, MMSFTConfig) and trainer.args.learning_rate == 3e-4


def test_adapter_file_has_no_vision_keys(tmp_path):
    trainer = MMSFTTrainer(
        model=tiny_model("llava"),
        args=_args(MMSFTConfig, tmp_path, max_steps=1),
        train_dataset=text_dataset(4),
        processing_class=make_tokenizer("llava"),
        peft_config=LoraConfig(r=4, target_modules=SUFFIXES),
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    keys = load_file(tmp_path / "final" / "adapter_model.safetensors").keys()
    assert keys and not [k for k in keys if "vision_tower" in k]


def test_vlm_on_mixed_data_matches_sft_trainer(tmp_path):
    """Where the data reaches every matched module, MMSFTTrainer trains exactly what SFTTrainer trains."""
    family = "qwen2_5_vl"
    runs = {}
    for name, trainer_cls, config_cls in (("sft", SFTTrainer, SFTConfig), ("mm", MMSFTTrainer, MMSFTConfig)):
        trainer = trainer_cls(
            model=tiny_model(family),
            args=_args(
                config_cls,
                tmp_path / name,
                per_device_train_batch_size=1,
                gradient_accumulation_steps=2,
                gradient_checkpointing=True,
                max_length=None,
            ),
            train_dataset=mixed_dataset(8, family=family),
            processing_class=make_processor(family),
            peft_config=LoraConfig(r=4, target_modules="all-linear"),
        )
        trainer.train()
        runs[name] = _adapter(trainer)
    assert runs["mm"].keys() == runs["sft"].keys()
    for key in runs["sft"]:
        torch.testing.assert_close(runs["mm"][key], runs["sft"][key], atol=1e-6, rtol=0)


def test_model_path_loads_as_sft_trainer_loads_it(tmp_path):
    """MMSFTTrainer loads a path itself (TRL has no hook between its load and PEFT's wrap): same class, dtype,
    weights and processor as SFTTrainer's own load, from the same `model_init_kwargs`."""
    from tests.kit import save_tiny

    path = str(save_tiny("qwen2_5_vl", tmp_path / "model"))
    loaded = {}
    for name, trainer_cls, config_cls in (("sft", SFTTrainer, SFTConfig), ("mm", MMSFTTrainer, MMSFTConfig)):
        keep = {"free_unreached_towers": False} if config_cls is MMSFTConfig else {}  # keep the unused vision tower
        args = _args(config_cls, tmp_path / name, model_init_kwargs={"dtype": "bfloat16"}, **keep)
        trainer = trainer_cls(
            model=path,
            args=args,
            train_dataset=text_dataset(4),
            peft_config=LoraConfig(r=4, target_modules=["q_proj"]),
        )
        base = trainer.model.get_base_model()
        weights = {k: v for k, v in base.state_dict().items() if "lora_" not in k}
        loaded[name] = (type(base), type(trainer.processing_class), weights)
    (sft_cls, sft_proc, sft_weights), (mm_cls, mm_proc, mm_weights) = loaded["sft"], loaded["mm"]
    assert (mm_cls, mm_proc) == (sft_cls, sft_proc)
    assert mm_weights.keys() == sft_weights.keys()
    assert {v.dtype for v in mm_weights.values()} == {v.dtype for v in sft_weights.values()} == {torch.bfloat16}
    for key in sft_weights:
        assert torch.equal(mm_weights[key], sft_weights[key]), key


@pytest.mark.parametrize("config_cls", [MMSFTConfig, SFTConfig, TrainingArguments])
def test_user_config_is_never_changed(tmp_path, config_cls):
    from tests.kit import save_tiny

    path = str(save_tiny("qwen2_5_vl", tmp_path / "model"))
    args = config_cls(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", hub_token="secret")
    if config_cls is not TrainingArguments:
        args.model_init_kwargs = {"dtype": "float32"}
    before = (copy.deepcopy(args.to_dict()), copy.deepcopy(vars(args)).keys(), args.ddp_find_unused_parameters)
    trainer = MMSFTTrainer(
        model=path, args=args, train_dataset=text_dataset(4), peft_config=LoraConfig(r=4, target_modules="all-linear")
    )
    assert trainer.args is not args and isinstance(trainer.args, MMSFTConfig)
    assert trainer.args.ddp_find_unused_parameters is False  # decided on the trainer's copy
    assert (args.to_dict(), vars(args).keys(), args.ddp_find_unused_parameters) == before
    assert type(args) is config_cls and args.hub_token == trainer.args.hub_token == "secret"
    if config_cls is not TrainingArguments:
        assert args.model_init_kwargs == {"dtype": "float32"}


def test_extend_keeps_every_value_and_takes_changes(tmp_path):
    sft = SFTConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to="none",
        learning_rate=3e-4,
        lr_scheduler_type="cosine",
        max_length=77,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        hub_token="secret",
    )
    extended = MMSFTConfig.extend(sft, target_towers=["language"])
    assert type(sft) is SFTConfig and not hasattr(sft, "target_towers")
    assert {k: v for k, v in extended.to_dict().items() if k in sft.to_dict()} == sft.to_dict()
    assert extended.hub_token == "secret" and extended.target_towers == ["language"]
    assert extended.gradient_checkpointing_kwargs is not sft.gradient_checkpointing_kwargs
    with pytest.raises(ValueError, match="Unknown tower name"):
        MMSFTConfig.extend(sft, target_towers=["eyes"])
    with pytest.raises(TypeError, match="no field"):
        MMSFTConfig.extend(sft, not_a_field=1)


def test_default_args_are_named_as_sft_trainer_names_them(tmp_path, monkeypatch):
    # Without `args`, MMSFTTrainer builds its config before SFTTrainer.__init__ runs: the output_dir must be the one
    # SFTTrainer names (`<model name>-SFT`). The default configs ask for bf16, which a CPU-only machine refuses without
    # `use_cpu`: both trainers' default config classes get CPU defaults here, nothing else.
    import trl.trainer.sft_trainer as trl_sft

    import mm_trainer.training.sft as mm_sft

    def on_cpu(config_cls):
        class OnCpu(config_cls):
            def __init__(self, output_dir, **kwargs):
                super().__init__(
                    output_dir=output_dir, **{"use_cpu": True, "bf16": False, "report_to": "none", **kwargs}
                )

        return OnCpu

    monkeypatch.chdir(tmp_path)
    names = {}
    for cls, module, config_name, config_cls in (
        (SFTTrainer, trl_sft, "SFTConfig", SFTConfig),
        (MMSFTTrainer, mm_sft, "MMSFTConfig", MMSFTConfig),
    ):
        model = tiny_model("causal_lm")
        model.config.name_or_path = "some-org/tiny-causal"
        with monkeypatch.context() as patch:
            patch.setattr(module, config_name, on_cpu(config_cls))
            trainer = cls(model=model, train_dataset=text_dataset(4), processing_class=make_tokenizer("causal_lm"))
        names[cls.__name__] = trainer.args.output_dir
    assert names["MMSFTTrainer"] == names["SFTTrainer"] == "tiny-causal-SFT"
