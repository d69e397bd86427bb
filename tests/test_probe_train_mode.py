"""The reachability probe runs the model as training does (issue 18): "reached" means an adapter there trains.

Gemma 3n is the real case: in training mode its AltUp reads ``correction_coefs.weight`` with ``F.linear`` and never
calls the module (an eval-mode probe saw it fire), and each layer's ``per_layer_input_gate`` is fed through the
zero-initialised, frozen ``altup.correct_output_scale``, so its input (and that of ``per_layer_projection``) is all
zeros for the whole run: the output gets a gradient, a LoRA adapter on it never does.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model_state_dict
from torch import nn

from mm_trainer import MMSFTTrainer
from mm_trainer.model.probe import ProbeSettings, probe_reachability
from mm_trainer.training.sft_probe_batch import build_probe_batch
from tests.kit import make_tokenizer, text_dataset, tiny_model, training_args
from tests.kit.models import GEMMA3N_LAYERS, tiny_gemma3n


def _linear_targets(model: nn.Module) -> list[str]:
    """What ``target_modules="all-linear"`` asks for, independently of mm_trainer: every linear but the output head."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]


def _trained_in_a_training_step(
    model: nn.Module, batch: dict, names: list[str], autocast_dtype: torch.dtype | None = None
) -> set[str]:
    """Independent reference: the modules that fire and whose own weight gets a non-zero gradient in one
    training-mode forward + backward of ``batch`` (a LoRA adapter's gradient is that weight gradient times ``A``)."""
    modules = dict(model.named_modules())
    fired: set[str] = set()
    for name in names:
        modules[name].register_forward_hook(lambda module, args, output, name=name: fired.add(name))
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        modules[name].weight.requires_grad_(True)
    model.train()
    autocast = torch.autocast("cpu", dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    with autocast:
        loss = model(**batch).loss
    loss.backward()
    grads = {n: modules[n].weight.grad for n in names}
    return {n for n in names if n in fired and grads[n] is not None and torch.count_nonzero(grads[n]) > 0}


def _statuses(output_dir: Path) -> tuple[dict[str, str], str]:
    """The saved audit's module statuses and its verdict."""
    audit = json.loads((output_dir / "audit.json").read_text())
    return {m["name"]: m["status"] for m in audit["modules"]}, audit["verdict"]


@pytest.mark.parametrize(
    "settings",
    [{"activation_checkpointing": False}, {"bf16": True}],
    ids=["fp32", "trl-defaults-bf16-autocast-checkpointing"],
)
def test_gemma3n_text_only_keeps_exactly_what_training_trains(tmp_path, settings):
    tokenizer = make_tokenizer("causal_lm")
    trainer = MMSFTTrainer(
        model=tiny_gemma3n(),
        args=training_args(tmp_path, max_steps=2, **settings),
        train_dataset=text_dataset(8),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, target_modules="all-linear"),
    )
    kept = set(trainer.target_plan.kept())

    # Reference on a fresh copy of the same base, with a batch from the trainer's own collator and dataset.
    reference_model = tiny_gemma3n()
    rows = [{k: v for k, v in trainer.train_dataset[i].items() if k in ("input_ids", "labels")} for i in range(2)]
    batch = trainer.data_collator(rows)
    autocast = torch.bfloat16 if settings.get("bf16") else None
    reference = _trained_in_a_training_step(reference_model, batch, _linear_targets(reference_model), autocast)
    assert kept == reference

    layers = range(GEMMA3N_LAYERS)
    never_called_in_training = {f"model.language_model.layers.{i}.altup.correction_coefs" for i in layers}
    gates = ("per_layer_input_gate", "per_layer_projection")
    zero_input = {f"model.language_model.layers.{i}.{m}" for i in layers for m in gates}
    assert not kept & (never_called_in_training | zero_input)
    probe = trainer.target_plan.probe
    assert all(probe.status(n) == "never_fired" for n in never_called_in_training)
    assert all(probe.status(n) == "zero_grad" and n in probe.zero_input for n in zero_input)
    assert probe.settings["training"] is True
    assert probe.settings["activation_checkpointing"] is trainer.args.activation_checkpointing
    assert probe.settings["autocast_dtype"] == ("bfloat16" if settings.get("bf16") else None)
    assert all(n.startswith("model.language_model.") for n in kept) and len(kept) >= 40

    trainer.train()
    trainer.save_model()
    statuses, verdict = _statuses(tmp_path)
    assert set(statuses) == kept
    assert verdict == "pass" and set(statuses.values()) == {"trained"}


def test_gemma3n_gates_reached_with_a_pretrained_like_scale():
    """The per-layer gates are dropped for the zero scale, not for what they are: with a pretrained-like non-zero
    ``correct_output_scale`` the same probe reaches them (``correction_coefs`` still never runs in training)."""
    model = tiny_gemma3n()
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.altup.correct_output_scale.normal_(0.0, 0.5)
    batch = build_probe_batch(list(text_dataset(2)), make_tokenizer("causal_lm"))
    layer = "model.language_model.layers.0"
    names = [f"{layer}.per_layer_input_gate", f"{layer}.per_layer_projection", f"{layer}.altup.correction_coefs"]
    result = probe_reachability(model, batch, names)
    assert [result.status(n) for n in names] == ["reached", "reached", "never_fired"]
    assert probe_reachability(model, batch, names[2:], ProbeSettings(training=False)).status(names[2]) == "reached"


class _ModeBranches(nn.Module):
    """Wraps a final norm with a linear used only in training mode and another used only in eval mode."""

    def __init__(self, norm: nn.Module, hidden: int) -> None:
        super().__init__()
        self.norm = norm
        self.train_only = nn.Linear(hidden, hidden)
        self.eval_only = nn.Linear(hidden, hidden)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        h = self.norm(hidden_states)
        return h + (self.train_only(h) if self.training else self.eval_only(h))


def _branchy_lm(seed: int = 0) -> nn.Module:
    model = tiny_model("causal_lm", seed=seed)
    torch.manual_seed(seed + 1)
    model.model.norm = _ModeBranches(model.model.norm, model.config.hidden_size)
    return model


def test_training_only_branch_kept_eval_only_branch_dropped(tmp_path):
    trainer = MMSFTTrainer(
        model=_branchy_lm(),
        args=training_args(tmp_path, max_steps=2),
        train_dataset=text_dataset(8),
        processing_class=make_tokenizer("causal_lm"),
        peft_config=LoraConfig(r=4, target_modules="all-linear"),
    )
    kept = set(trainer.target_plan.kept())
    assert "model.norm.train_only" in kept and "model.norm.eval_only" not in kept
    assert trainer.target_plan.probe.status("model.norm.eval_only") == "never_fired"
    assert kept == set(_linear_targets(_branchy_lm())) - {"model.norm.eval_only"}
    trainer.train()
    trainer.save_model()
    statuses, verdict = _statuses(tmp_path)
    assert verdict == "pass" and statuses["model.norm.train_only"] == "trained"


def test_eval_mode_probe_sees_the_other_branch():
    """The mode is what decides: the same batch in eval mode reaches the eval-only branch and not the other."""
    model = _branchy_lm()
    batch = build_probe_batch(list(text_dataset(2)), make_tokenizer("causal_lm"))
    names = ["model.norm.train_only", "model.norm.eval_only"]
    trained = probe_reachability(model, batch, names)
    evaluated = probe_reachability(model, batch, names, ProbeSettings(training=False))
    assert [trained.status(n) for n in names] == ["reached", "never_fired"]
    assert [evaluated.status(n) for n in names] == ["never_fired", "reached"]


def _with_dropout(model: nn.Module, p: float = 0.2) -> nn.Module:
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = p
    return model


def test_probe_leaves_training_bit_identical(tmp_path):
    """Same targets with and without the probe: the adapters after 3 steps (dropout on, checkpointing on) are equal to
    the bit, so the probe's training-mode step leaves nothing behind that training sees."""
    adapters, plans = {}, {}
    for probe in (True, False):
        trainer = MMSFTTrainer(
            model=_with_dropout(tiny_model("causal_lm")),
            args=training_args(tmp_path / str(probe), target_probe=probe, activation_checkpointing=True),
            train_dataset=text_dataset(8),
            processing_class=make_tokenizer("causal_lm"),
            peft_config=LoraConfig(r=4, lora_dropout=0.1, target_modules="all-linear"),
        )
        assert (trainer.target_plan.probe is not None) is probe
        plans[probe] = trainer.target_plan.kept()
        trainer.train()
        adapters[probe] = get_peft_model_state_dict(trainer.model)
    assert plans[True] == plans[False]
    assert adapters[True].keys() == adapters[False].keys()
    for key, value in adapters[True].items():
        assert torch.equal(value, adapters[False][key]), key
    assert any(torch.count_nonzero(v) for k, v in adapters[True].items() if "lora_B" in k)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_probe_restores_mode_rng_buffers_and_checkpointing(use_reentrant):
    model = _with_dropout(tiny_model("causal_lm"))
    model.model.layers[0].train()  # a mixed-mode model: every module's own mode must come back
    modes = {n: m.training for n, m in model.named_modules()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    embedding_hooks = dict(model.get_input_embeddings()._forward_hooks)
    batch = build_probe_batch(list(text_dataset(2)), make_tokenizer("causal_lm"))
    names = _linear_targets(model)
    plain = probe_reachability(model, batch, names)
    rng = torch.get_rng_state()
    settings = ProbeSettings(
        activation_checkpointing=True,
        activation_checkpointing_kwargs={"use_reentrant": use_reentrant},
        autocast_dtype=torch.bfloat16,
    )
    checkpointed = probe_reachability(model, batch, names, settings)
    assert torch.equal(torch.get_rng_state(), rng)
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
    assert not model.is_activation_checkpointing
    assert dict(model.get_input_embeddings()._forward_hooks) == embedding_hooks
    assert not hasattr(model, "_require_grads_hooks")
    assert all(p.grad is None for p in model.parameters())
    # Checkpointing (either flavour) and bf16 autocast reach the same modules on this model: all of them.
    assert checkpointed.nonzero_grad == plain.nonzero_grad == set(names)


def test_zero_input_is_not_reached():
    """A linear whose input is all zeros gets a gradient at its output but its adapter never learns."""

    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(16, 8)
            self.scale = nn.Parameter(torch.zeros(8))  # zero-initialised and frozen under LoRA
            self.gate = nn.Linear(8, 8)
            self.head = nn.Linear(8, 16)

        def forward(self, input_ids, labels):
            h = self.embed(input_ids)
            logits = self.head(h + self.gate(h * self.scale))
            return {"loss": nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())}

    torch.manual_seed(0)
    model = Gate()
    batch = {"input_ids": torch.randint(0, 16, (2, 5)), "labels": torch.randint(0, 16, (2, 5))}
    result = probe_reachability(model, batch, ["gate", "head"])
    assert result.status("gate") == "zero_grad" and result.zero_input == {"gate"}
    assert result.status("head") == "reached"
    assert "zero-initialised" in result.reason("gate")
    with torch.no_grad():
        model.scale.fill_(1.0)
    assert probe_reachability(model, batch, ["gate"]).status("gate") == "reached"


def test_zero_on_the_first_step_only_is_reached_later():
    """A linear fed by a zero-initialised linear gets a zero gradient on step 1 only: once the adapter upstream has
    moved, its input is non-zero. The probe's second pass keeps it; real LoRA training confirms it trains."""

    class ZeroInitChain(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(16, 8)
            self.opener = nn.Linear(8, 8, bias=False)
            self.after = nn.Linear(8, 8)
            self.head = nn.Linear(8, 16)
            nn.init.zeros_(self.opener.weight)

        def forward(self, input_ids, labels):
            h = self.embed(input_ids)
            logits = self.head(h + self.after(self.opener(h)))
            return {"loss": nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())}

    torch.manual_seed(0)
    model = ZeroInitChain()
    batch = {"input_ids": torch.randint(0, 16, (2, 5)), "labels": torch.randint(0, 16, (2, 5))}
    result = probe_reachability(model, batch, ["opener", "after", "head"])
    assert result.nonzero_grad == {"opener", "after", "head"} and result.reached_later == {"after"}
    assert "first step" in result.reason("after")

    from peft import get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["opener", "after"]))
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.1)
    lora_b = peft_model.base_model.model.after.lora_B["default"].weight
    grads = []
    for _ in range(2):
        optimizer.zero_grad()
        peft_model(**batch)["loss"].backward()
        grads.append(torch.count_nonzero(lora_b.grad).item())
        optimizer.step()
    assert grads[0] == 0 and grads[1] > 0
