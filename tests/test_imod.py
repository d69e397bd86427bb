"""IMoD inside MMSFTTrainer on the tiny Qwen2.5-VL: the gradient a training step leaves, accumulation, checkpointing,
saving / merging / resuming, text-only refusal, logging, and the Non-Text Dominance Rate."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model_state_dict
from transformers import TrainerCallback

from mm_trainer import MMSFTConfig, MMSFTTrainer
from mm_trainer.model.modality import token_modality
from tests.imod_reference import causal_lm_loss, reference_constraints
from tests.kit import image_text_dataset, make_processor, mixed_dataset, text_dataset, tiny_model, training_args

FAMILY = "qwen2_5_vl"
SUFFIXES = ["q_proj", "v_proj", "down_proj"]  # down_proj also matches the vision tower's MLPs


def _args(tmp_path, **kw):
    imod_defaults = {"gradient_checkpointing": False, "max_length": None, "imod": True, "dominance_steps": 0}
    return training_args(tmp_path, MMSFTConfig, **{**imod_defaults, **kw})


def _trainer(tmp_path, data=None, init_lora_weights=False, **kw) -> MMSFTTrainer:
    return MMSFTTrainer(
        model=tiny_model(FAMILY),
        args=_args(tmp_path, **kw),
        train_dataset=data if data is not None else image_text_dataset(8, family=FAMILY),
        processing_class=make_processor(FAMILY),
        # Random B (init_lora_weights=False) so the task gradient on A is not zero at the first step.
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=SUFFIXES, init_lora_weights=init_lora_weights),
    )


class _GradCapture(TrainerCallback):
    """The adapters' gradients of each optimizer step, after accumulation and DDP, before the optimizer (no clipping)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.steps.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})


def _train_grads(trainer: MMSFTTrainer) -> dict[str, torch.Tensor]:
    capture = _GradCapture()
    trainer.add_callback(capture)
    trainer.train()
    return capture.steps[0]


def _adapter_state(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(trainer.model).items()}


# ---------------------------------------------------------------------------------------------------------------------
# The gradient of one training step
# ---------------------------------------------------------------------------------------------------------------------
def test_training_step_leaves_task_plus_injected_gradient(tmp_path):
    lambda_msd, lambda_ma = 1.0, 0.5  # a large λ2 so that an error in MAAC shows at 1e-5
    trainer = _trainer(
        tmp_path, data=mixed_dataset(6, family=FAMILY), imod_lambda_msd=lambda_msd, imod_lambda_ma=lambda_ma
    )
    balance = trainer.modality_balance
    assert balance is not None and balance.injector is not None
    constrained = {a.name for a in balance.injector.adapters}
    assert constrained == {a.name for a in trainer.adapters if a.tower == "language"}
    assert any(a.tower == "vision" for a in trainer.adapters)  # vision down_proj adapters: plain LoRA

    # Rows 0 (text only), 1 and 3 (image): MAAC applies to two of the three sequences.
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in (0, 1, 3)]))
    trainer.current_gradient_accumulation_steps = 1
    model = trainer.model
    model.train()
    loss = trainer.training_step(model, dict(batch))
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)

    # Independent reference: task loss from the logits, constraints written out per sequence, one autograd backward.
    captured: dict[str, torch.Tensor] = {}

    def capture(name, args):
        captured.setdefault(name, args[0].detach())  # returns None: a pre-hook's return value would replace the input

    handles = [
        a.module.register_forward_pre_hook(lambda m, args, _n=a.name: capture(_n, args))
        for a in trainer.adapters
        if a.name in constrained
    ]
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    for h in handles:
        h.remove()
    task = causal_lm_loss(logits, batch["labels"])
    assert loss.item() == pytest.approx(task.item(), rel=1e-5)  # the returned (logged) loss is the task loss
    classes = token_modality(batch, model.config)
    assert (classes == 2).any(dim=1).tolist() == [False, True, True]
    constraint = 0.0
    for adapter in balance.injector.adapters:
        zone = balance.masks.by_name[adapter.name].zone
        msd, ma = reference_constraints(adapter.lora_A, zone, captured[adapter.name], classes)
        constraint = constraint + lambda_msd * msd + lambda_ma * ma
    task_grads = torch.autograd.grad(task, [p for p in model.parameters() if p.requires_grad], retain_graph=True)
    (task + constraint).backward()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for name, task_grad in zip(names, task_grads):
        ref = dict(model.named_parameters())[name].grad
        torch.testing.assert_close(got[name], ref, atol=1e-5, rtol=0, msg=name)
        if "lora_A" in name and any(c + "." in name for c in constrained):
            assert (got[name] - task_grad).abs().max() > 1e-3, name  # the injection is really there
        else:  # B everywhere and A outside the language model: the task gradient only
            torch.testing.assert_close(got[name], task_grad, atol=1e-6, rtol=0, msg=name)


@pytest.mark.parametrize("tokens_normalised", [False, True], ids=["trainer-divides", "num_items_in_batch"])
def test_gradient_accumulation_keeps_lambda(tmp_path, tokens_normalised):
    """GA=2 x batch 1 and GA=1 x batch 2 over the same two rows inject the same gradient."""
    injected = {}
    for ga, bs in ((2, 1), (1, 2)):
        grads = {}
        for imod in (True, False):
            trainer = _trainer(
                tmp_path / f"{ga}-{imod}",
                data=image_text_dataset(4, family=FAMILY),
                imod=imod,
                imod_lambda_ma=0.5,
                gradient_accumulation_steps=ga,
                per_device_train_batch_size=bs,
                max_steps=1,
                max_grad_norm=0.0,
            )
            # TRL normalises the task loss by the step's token count when the Trainer counts it; force that path.
            trainer.model_accepts_loss_kwargs = tokens_normalised
            scales = []
            if imod:
                balance = trainer.modality_balance
                scale_of = balance.constraint_scale
                balance.constraint_scale = lambda t, _log=scales, _f=scale_of: _log.append(_f(t)) or _log[-1]
            grads[imod] = _train_grads(trainer)
            if imod:
                assert scales == [1 / ga] * ga
        injected[ga] = {n: grads[True][n] - grads[False][n] for n in grads[True]}
    a_names = [n for n in injected[1] if "lora_A" in n and "language_model" in n]
    assert a_names
    for name in injected[1]:
        # Batch 2 pads the shorter row and runs other matmul shapes: agreement to float noise, 1e-5 of the scale.
        scale = float(injected[1][name].abs().max())
        torch.testing.assert_close(injected[2][name], injected[1][name], atol=1e-5 * max(scale, 1.0), rtol=0, msg=name)
        if name in a_names:
            assert injected[1][name].abs().max() > 1e-3
        else:
            assert injected[1][name].abs().max() < 1e-6  # B and non-language adapters get no injection


def test_short_last_accumulation_window_scales_by_its_own_micro_batches(tmp_path):
    """3 rows, batch 1, GA=2, one epoch: the second optimizer step has one micro-batch, and its constraint gradient is
    that micro-batch's whole (scale 1), not half of it (the configured accumulation steps)."""
    trainer = _trainer(
        tmp_path,
        data=image_text_dataset(3, family=FAMILY),
        gradient_accumulation_steps=2,
        per_device_train_batch_size=1,
        max_steps=-1,
        num_train_epochs=1,
    )
    balance = trainer.modality_balance
    scale_of = balance.constraint_scale
    scales: list[float] = []
    balance.constraint_scale = lambda t: scales.append(scale_of(t)) or scales[-1]
    trainer.train()
    assert trainer.state.global_step == 2
    assert scales == [0.5, 0.5, 1.0]


def test_gradient_checkpointing_gives_the_same_gradients_and_fisher(tmp_path):
    runs = []
    for gc, kwargs in ((False, None), (True, {"use_reentrant": False}), (True, {"use_reentrant": True})):
        trainer = _trainer(
            tmp_path / str(kwargs),
            data=mixed_dataset(6, family=FAMILY),
            imod_lambda_ma=0.5,
            gradient_checkpointing=gc,
            gradient_checkpointing_kwargs=kwargs,
            max_steps=1,
            max_grad_norm=0.0,
            dominance_steps=1,
        )
        grads = _train_grads(trainer)
        assert trainer.model.base_model.model.model.language_model.gradient_checkpointing is gc
        runs.append((grads, trainer.modality_balance.dominance.history[-1], trainer.modality_balance.dominance.latest))
    (grads0, hist0, latest0) = runs[0]
    for grads, hist, latest in runs[1:]:
        assert grads.keys() == grads0.keys()
        for name in grads0:
            torch.testing.assert_close(grads[name], grads0[name], atol=1e-6, rtol=1e-5, msg=name)
        assert hist["fisher_text"] == pytest.approx(hist0["fisher_text"], rel=1e-5)
        assert hist["fisher_non_text"] == pytest.approx(hist0["fisher_non_text"], rel=1e-5)
        assert latest["per_layer"] == pytest.approx(latest0["per_layer"])
    assert hist0["fisher_non_text"] > 0 and hist0["fisher_text"] > 0


# ---------------------------------------------------------------------------------------------------------------------
# What a run produces
# ---------------------------------------------------------------------------------------------------------------------
def test_a_failing_training_step_leaves_no_patch_or_hook(tmp_path):
    trainer = _trainer(tmp_path, dominance_steps=1)
    balance = trainer.modality_balance
    lora_a = [a.module.lora_A["default"] for a in balance.injector.adapters]
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in (0, 1)]))
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    seen = {}

    def boom(module, args, output):
        seen["patched"] = all("forward" in m.__dict__ for m in lora_a)
        seen["hooks"] = all(m._forward_hooks for m in lora_a)
        raise RuntimeError("boom in the forward")

    layer = trainer.model.base_model.model.model.language_model.layers[-1]
    handle = layer.register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="boom in the forward"):
        trainer.training_step(trainer.model, dict(batch))
    handle.remove()
    assert seen == {"patched": True, "hooks": True}  # the step did arm IMoD and the dominance hooks
    assert not any("forward" in m.__dict__ or m._forward_hooks for m in lora_a)
    # The next step trains normally (and disarms again).
    trainer.model.zero_grad(set_to_none=True)
    assert torch.isfinite(trainer.training_step(trainer.model, dict(batch)))
    assert not any("forward" in m.__dict__ or m._forward_hooks for m in lora_a)


def test_logs_audit_and_standard_mergeable_adapter(tmp_path):
    plain = _trainer(tmp_path / "plain", imod=False, init_lora_weights=True)
    trainer = _trainer(tmp_path, init_lora_weights=True, dominance_steps=2)
    count = lambda t: sum(p.numel() for p in t.model.parameters() if p.requires_grad)  # noqa: E731
    assert count(trainer) == count(plain) > 0
    trainer.train()

    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 3
    assert all(math.isfinite(h["imod/msd"]) and h["imod/msd"] > 0 and math.isfinite(h["imod/ma"]) for h in logged)
    assert [h.get("dominance/non_text_rate") is not None for h in logged] == [True, True, False]
    audit = trainer.audit_sections["imod"]()
    assert audit["seed"] == 7 and audit["fingerprint"] == trainer.modality_balance.masks.fingerprint()
    ratios = {layer["name"]: layer["shared_ratio"] for layer in audit["layers"]}
    assert ratios["model.language_model.layers.0.self_attn.q_proj"] == pytest.approx(0.2)
    assert ratios["model.language_model.layers.1.self_attn.q_proj"] == pytest.approx(0.4)
    assert audit["micro_steps"] == 3 and audit["micro_steps_with_non_text"] == 3 and not audit["misaligned_layers"]
    dominance = trainer.audit_sections["dominance"]()
    assert [h["step"] for h in dominance["history"]] == [1, 2]
    assert 0.0 <= dominance["non_text_rate"] <= 1.0 and len(dominance["latest"]["per_layer"]) == 6
    json.dumps(audit), json.dumps(dominance)

    trainer.save_model(str(tmp_path / "final"))
    config = json.loads((tmp_path / "final" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    state = json.loads((tmp_path / "final" / "mm_trainer_state.json").read_text())
    assert state["modality_balance"]["imod"]["fingerprint"] == audit["fingerprint"]

    processor = make_processor(FAMILY)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in (0, 1)])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    trainer.model.eval()
    with torch.no_grad():
        trained = trainer.model(**inputs).logits
    loaded = PeftModel.from_pretrained(tiny_model(FAMILY), tmp_path / "final").eval()
    with torch.no_grad():
        reloaded = loaded(**inputs).logits
        merged = loaded.merge_and_unload()(**inputs).logits
    torch.testing.assert_close(reloaded, trained, atol=1e-5, rtol=0)
    torch.testing.assert_close(merged, trained, atol=1e-5, rtol=0)
    assert processor is not None


def test_resume_rebuilds_identical_masks_and_refuses_other_ones(tmp_path):
    first = _trainer(tmp_path, max_steps=2, save_strategy="steps", save_steps=2, dominance_steps=1)
    first.train()
    saved = json.loads((tmp_path / "checkpoint-2" / "mm_trainer_state.json").read_text())["modality_balance"]
    assert saved["imod"]["fingerprint"] == first.modality_balance.masks.fingerprint()

    second = _trainer(tmp_path, max_steps=3, dominance_steps=1)
    second.train(resume_from_checkpoint=True)
    assert second.modality_balance.masks.fingerprint() == saved["imod"]["fingerprint"]
    for a, b in zip(first.modality_balance.masks.layers, second.modality_balance.masks.layers):
        assert a.name == b.name and torch.equal(a.zone, b.zone)
    assert [h["step"] for h in second.modality_balance.dominance.history] == [1, 2, 3]
    assert second.modality_balance.injector.micro_steps == 3

    other = _trainer(tmp_path, max_steps=3, imod_seed=8)
    with pytest.raises(ValueError, match="other IMoD masks.*imod_seed"):
        other.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))


# ---------------------------------------------------------------------------------------------------------------------
# Data IMoD cannot use
# ---------------------------------------------------------------------------------------------------------------------
def test_text_only_data_is_refused_or_trains_as_plain_lora(tmp_path):
    with pytest.raises(ValueError, match="imod=True needs training data with non-text tokens"):
        _trainer(tmp_path, data=text_dataset(6))
    with pytest.warns(UserWarning, match="non-text tokens.*plain LoRA"):
        warned = _trainer(tmp_path / "warn", data=text_dataset(6), imod_text_only="warn", dominance_steps=1)
    assert warned.modality_balance is None and "imod" not in warned.audit_sections
    warned.train()
    plain = _trainer(tmp_path / "plain", data=text_dataset(6), imod=False, dominance_steps=1)
    plain.train()
    for key, value in _adapter_state(plain).items():
        torch.testing.assert_close(_adapter_state(warned)[key], value, atol=0, rtol=0)


def test_batches_without_non_text_tokens_warn(tmp_path):
    # The modalities are declared, so the profile believes in images the batches never carry.
    trainer = _trainer(tmp_path, data=text_dataset(6), data_modalities=["text", "image"], max_steps=2)
    assert trainer.modality_balance.injector is not None
    with pytest.warns(UserWarning, match="IMoD saw no non-text token in 2 micro-batches"):
        trainer.train()
    assert trainer.audit_sections["imod"]()["micro_steps_with_non_text"] == 0


def test_imod_refuses_what_it_cannot_split(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="constrains LoRA Linear layers of the language model"):
        MMSFTTrainer(
            model=tiny_model(FAMILY),
            args=_args(tmp_path),
            train_dataset=image_text_dataset(4, family=FAMILY),
            processing_class=make_processor(FAMILY),
            peft_config=LoraConfig(r=4, target_modules=["qkv"]),
        )
    with pytest.raises(ValueError, match="use_dora=False"):
        MMSFTTrainer(
            model=tiny_model(FAMILY),
            args=_args(tmp_path),
            train_dataset=image_text_dataset(4, family=FAMILY),
            processing_class=make_processor(FAMILY),
            peft_config=LoraConfig(r=4, target_modules=["q_proj"], use_dora=True),
        )
    # A config that names no image placeholder id: no way to tell image tokens from text.
    monkeypatch.setattr("mm_trainer.imod.balance.placeholder_ids", lambda config: {})
    with pytest.raises(ValueError, match="token id of the image placeholders"):
        MMSFTTrainer(
            model=tiny_model(FAMILY),
            args=_args(tmp_path, target_probe=False),
            train_dataset=image_text_dataset(4, family=FAMILY),
            processing_class=make_processor(FAMILY),
            peft_config=LoraConfig(r=4, target_modules=["q_proj"]),
        )


# ---------------------------------------------------------------------------------------------------------------------
# Dominance rate without IMoD, bf16
# ---------------------------------------------------------------------------------------------------------------------
def test_dominance_rate_for_plain_lora_on_multimodal_data_only(tmp_path):
    trainer = _trainer(tmp_path, imod=False, dominance_steps=2, max_steps=2, init_lora_weights=True)
    assert trainer.modality_balance.injector is None and "imod" not in trainer.audit_sections
    trainer.train()
    rates = [h["dominance/non_text_rate"] for h in trainer.state.log_history if "dominance/non_text_rate" in h]
    assert len(rates) == 2 and all(0.0 <= r <= 1.0 for r in rates)
    history = trainer.audit_sections["dominance"]()["history"]
    assert history[0]["A"] == 0.0  # B starts at zero, so A has no task gradient at step 1
    assert history[1]["fisher_non_text"] > 0
    assert not any(k.startswith("imod/") for h in trainer.state.log_history for k in h)

    text = _trainer(tmp_path / "text", data=text_dataset(4), imod=False, dominance_steps=1)
    assert text.modality_balance is None


def test_bf16_training_with_fp32_constraints(tmp_path):
    trainer = _trainer(tmp_path, bf16=True, max_steps=2, dominance_steps=1)
    before = _adapter_state(trainer)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert all(math.isfinite(h["imod/msd"]) and math.isfinite(h["imod/ma"]) for h in logged)
    assert all(math.isfinite(h["dominance/non_text_rate"]) for h in logged)
    after = _adapter_state(trainer)
    assert any(not torch.equal(before[k], after[k]) for k in before if "lora_A" in k)
