"""Mixture-of-experts: per-expert linears are judged with their block; fused 3-D experts follow the data.

Two kinds of tiny MoE VLM, trained on text: Qwen3-VL-MoE from its config class (fused ``experts.gate_up_proj`` /
``down_proj`` parameters, reached by PEFT's ``target_parameters``), and a custom VLM whose language MoE keeps a
``ModuleList`` of per-expert linears beside a router biased so that the probe batch never routes a token to experts
2 and 3, and whose vision tower holds fused experts too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
import transformers
from peft import LoraConfig
from torch import nn
from transformers import AutoModelForImageTextToText, GenerationConfig, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from mm_trainer import MMSFTConfig, MMSFTTrainer
from mm_trainer.model.matching import expert_groups
from tests.kit import make_tokenizer, text_dataset, training_args
from tests.kit.shrink import shrink_config

EXPERTS = 4


@dataclass
class HydraOutput(CausalLMOutput):
    last_hidden_state: torch.Tensor | None = None


class FusedExperts(nn.Module):
    """transformers-5 style experts: one 3-D parameter per projection, indexed by the routed expert."""

    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(EXPERTS, inner, hidden) * 0.1)
        self.down_proj = nn.Parameter(torch.randn(EXPERTS, hidden, inner) * 0.1)

    def forward(self, flat, choice):
        inner = torch.einsum("tih,th->ti", self.gate_up_proj[choice], flat).relu()
        return torch.einsum("thi,ti->th", self.down_proj[choice], inner)


class Expert(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.up = nn.Linear(hidden, 2 * hidden)
        self.down = nn.Linear(2 * hidden, hidden)

    def forward(self, x):
        return self.down(self.up(x).relu())


class MoEBlock(nn.Module):
    """Top-1 routing over a ModuleList of experts (named ``ffns``: found by its router, not by name) plus fused
    experts; an expert runs only on the tokens routed to it."""

    def __init__(self, hidden: int):
        super().__init__()
        self.router = nn.Linear(hidden, EXPERTS)
        with torch.no_grad():
            self.router.bias.copy_(torch.tensor([8.0, 8.0, -8.0, -8.0]))  # experts 2, 3: no token in a probe
        self.ffns = nn.ModuleList(Expert(hidden) for _ in range(EXPERTS))
        self.experts = FusedExperts(hidden, 2 * hidden)

    def forward(self, h):
        flat = h.reshape(-1, h.shape[-1])
        probs = self.router(flat).softmax(-1)
        choice = probs.argmax(-1)
        out = self.experts(flat, choice)
        for i, expert in enumerate(self.ffns):
            idx = torch.nonzero(choice == i).flatten()
            if idx.numel():
                out = out.index_add(0, idx, expert(flat[idx]) * probs[idx, i : i + 1])
        return h + out.reshape(h.shape)


class EyeConfig(PretrainedConfig):
    model_type = "moe_eye_vision"

    def __init__(self, hidden: int = 16, **kwargs):
        self.hidden = hidden
        super().__init__(**kwargs)


class TalkConfig(PretrainedConfig):
    model_type = "moe_talk_text"

    def __init__(self, hidden: int = 16, vocab: int = 64, **kwargs):
        self.hidden, self.vocab = hidden, vocab
        super().__init__(**kwargs)


class HydraConfig(PretrainedConfig):
    model_type = "hydra"
    sub_configs = {"vision_config": EyeConfig, "text_config": TalkConfig}

    def __init__(self, vision_config=None, text_config=None, **kwargs):
        self.vision_config = (
            vision_config if isinstance(vision_config, EyeConfig) else EyeConfig(**(vision_config or {}))
        )
        self.text_config = text_config if isinstance(text_config, TalkConfig) else TalkConfig(**(text_config or {}))
        super().__init__(**kwargs)


class Eye(nn.Module):
    def __init__(self, config: EyeConfig):
        super().__init__()
        self.config = config
        self.stem = nn.Linear(12, config.hidden)
        self.experts = FusedExperts(config.hidden, config.hidden)

    def forward(self, pixel_values):
        flat = self.stem(pixel_values)
        return self.experts(flat, torch.zeros(flat.shape[0], dtype=torch.long))


class Talk(nn.Module):
    def __init__(self, config: TalkConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab, config.hidden)
        self.layers = nn.ModuleList(nn.ModuleDict({"q_proj": nn.Linear(config.hidden, config.hidden)}) for _ in "ab")
        self.moe = nn.ModuleList(MoEBlock(config.hidden) for _ in "ab")

    def forward(self, inputs_embeds):
        h = inputs_embeds
        for layer, moe in zip(self.layers, self.moe):
            h = moe(h + torch.tanh(layer["q_proj"](h)))
        return h


class HydraForCausalLM(PreTrainedModel):
    config_class = HydraConfig

    def __init__(self, config: HydraConfig):
        super().__init__(config)
        self.eye = Eye(config.vision_config)
        self.bridge = nn.Linear(config.vision_config.hidden, config.text_config.hidden)
        self.talk = Talk(config.text_config)
        self.lm_head = nn.Linear(config.text_config.hidden, config.text_config.vocab, bias=False)
        self.generation_config = GenerationConfig()  # TRL reads it (eos tokens) at save
        self.post_init()

    def _init_weights(self, module):  # keep the constructors' values (router bias)
        pass

    def get_input_embeddings(self):
        return self.talk.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, attention_mask=None, labels=None, pixel_values=None, **kwargs):
        h = self.talk.embed_tokens(input_ids)
        if pixel_values is not None:
            h = h + self.bridge(self.eye(pixel_values)).mean(0)
        hidden = self.talk(h)
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return HydraOutput(loss=loss, logits=logits, last_hidden_state=hidden)  # TRL's fused head reads the last


def _audit(path) -> dict[str, dict]:
    audit = json.loads((path / "audit.json").read_text())
    return {m["name"]: m for m in audit["modules"]}


def test_expert_groups_found_by_router_not_layers():
    groups = expert_groups(HydraForCausalLM(HydraConfig()))
    assert set(groups.values()) == {"talk.moe.0", "talk.moe.1"}
    assert "talk.moe.1.ffns.3.down" in groups and not any(".layers." in g for g in groups)


def test_per_expert_linears_kept_as_a_group_fused_experts_follow_the_data(tmp_path):
    tokenizer = make_tokenizer("causal_lm")
    model = HydraForCausalLM(HydraConfig(text_config={"vocab": len(tokenizer)}))
    trainer = MMSFTTrainer(
        model=model,
        args=training_args(tmp_path, MMSFTConfig, max_steps=1, gradient_checkpointing=False),
        train_dataset=text_dataset(4),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=2, target_modules="all-linear", target_parameters=["experts.gate_up_proj"]),
    )
    plan = trainer.target_plan
    probe = plan.probe
    assert probe is not None and probe.status("talk.moe.0.ffns.3.up") == "never_fired"  # the probe missed it ...
    kept = set(plan.kept())
    experts = {f"talk.moe.{b}.ffns.{e}.{p}" for b in "01" for e in range(EXPERTS) for p in ("up", "down")}
    assert experts <= kept  # ... and the group keeps it
    reason = next(d.reason for d in plan.decisions if d.name == "talk.moe.0.ffns.3.up")
    assert "MoE block talk.moe.0" in reason
    # Fused experts: kept on the language tower, dropped on the vision tower the text never reaches.
    assert {"talk.moe.0.experts.gate_up_proj", "talk.moe.1.experts.gate_up_proj"} <= kept
    assert "eye.experts.gate_up_proj" in plan.dropped() and "eye.stem" in plan.dropped()
    assert plan.peft_config.target_parameters == ["talk.moe.0.experts.gate_up_proj", "talk.moe.1.experts.gate_up_proj"]
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    modules = _audit(tmp_path / "final")
    assert modules["talk.moe.1.experts.gate_up_proj"]["tower"] == "language"
    assert modules["talk.moe.1.experts.gate_up_proj"]["status"] == "trained"
    assert "eye.experts.gate_up_proj" not in modules


def test_qwen3_vl_moe_fused_experts_on_text(tmp_path):
    config = shrink_config(transformers.Qwen3VLMoeConfig())
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config)
    trainer = MMSFTTrainer(
        model=model,
        args=training_args(tmp_path, MMSFTConfig, max_steps=1),
        train_dataset=text_dataset(4),
        processing_class=make_tokenizer("qwen3_vl"),
        peft_config=LoraConfig(
            r=2, target_modules=["q_proj", "v_proj"], target_parameters=["experts.gate_up_proj", "experts.down_proj"]
        ),
    )
    params = trainer.target_plan.peft_config.target_parameters
    layers = config.text_config.num_hidden_layers
    assert sorted(params) == sorted(
        f"model.language_model.layers.{i}.mlp.experts.{p}"
        for i in range(layers)
        for p in ("gate_up_proj", "down_proj")
    )
    assert all(not k.startswith("model.visual") for k in trainer.target_plan.kept())
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    modules = _audit(tmp_path / "final")
    fused = {n: m for n, m in modules.items() if ".experts." in n}
    assert len(fused) == 2 * layers and all(
        m["status"] == "trained" and m["tower"] == "language" for m in fused.values()
    )
