"""Reachability probe: one forward + backward tells fired / zero-gradient / reached, without touching weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mm_trainer.model.matching import matched_modules
from mm_trainer.model.probe import choose_probe_rows, probe_reachability
from mm_trainer.training.sft_probe_batch import build_probe_batch
from tests.kit import image_text_dataset, make_processor, make_tokenizer, mixed_dataset, text_dataset, tiny_model


class DummyImageLM(nn.Module):
    """A toy LM that runs its vision encoder on a dummy image and adds ``0 * features`` (the DDP 'keep-alive' trick)."""

    def __init__(self):
        super().__init__()
        self.vision = nn.Sequential(nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 8))
        self.embed = nn.Embedding(20, 8)
        self.q_proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 20)

    def forward(self, input_ids, labels=None, attention_mask=None):
        dummy = self.vision(torch.zeros(1, 12))
        h = self.q_proj(self.embed(input_ids)) + 0.0 * dummy.sum()
        logits = self.head(h)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        return {"loss": loss, "logits": logits}


def test_dummy_image_trick_is_caught_as_zero_grad():
    model = DummyImageLM()
    batch = {"input_ids": torch.randint(0, 20, (2, 5)), "labels": torch.randint(0, 20, (2, 5))}
    result = probe_reachability(model, batch, ["vision.0", "vision.2", "q_proj", "head"])
    assert result.status("vision.0") == "zero_grad"
    assert result.status("vision.2") == "zero_grad"
    assert result.status("q_proj") == "reached" and result.status("head") == "reached"
    assert result.unreached() == ["vision.0", "vision.2"]


def test_probe_leaves_weights_and_grads_untouched():
    model = tiny_model("qwen2_5_vl")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    batch = build_probe_batch(list(text_dataset(2)), make_tokenizer("qwen2_5_vl"))
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    result = probe_reachability(model, batch, names)
    assert all(p.grad is None for p in model.parameters())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.training  # the kit returns eval-mode models; the probe restores the mode
    reached = {n for n in names if result.status(n) == "reached"}
    assert reached == {n for n in names if n.startswith("model.language_model.")} | {"lm_head"}
    assert all(result.status(n) == "never_fired" for n in names if n.startswith("model.visual."))


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava", "gemma3"])
def test_image_batch_reaches_the_vision_tower(family):
    model = tiny_model(family)
    batch = build_probe_batch(list(image_text_dataset(2, family=family)), make_processor(family))
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    result = probe_reachability(model, batch, names)
    assert result.batch_modalities == {"image"}
    vision_root = {"qwen2_5_vl": "model.visual.", "llava": "model.vision_tower.", "gemma3": "model.vision_tower."}
    vision = [n for n in names if n.startswith(vision_root[family])]
    reached = [n for n in vision if result.status(n) == "reached"]
    # Every vision linear layer whose output feeds the projected features is reached. (LLaVA takes features from
    # an inner layer, so layers after it are genuinely unreached.)
    assert reached
    if family == "qwen2_5_vl":
        assert reached == vision


def test_probe_rows_cover_every_modality():
    rows = list(mixed_dataset(8, image_every=4))
    chosen = choose_probe_rows(rows, 2)
    kinds = [bool(r["images"]) for r in chosen]
    assert sorted(kinds) == [False, True]


def test_mixed_probe_batch_on_qwen():
    model = tiny_model("qwen2_5_vl")
    rows = choose_probe_rows(list(mixed_dataset(8, family="qwen2_5_vl")), 2)
    batch = build_probe_batch(rows, make_processor("qwen2_5_vl"))
    result = probe_reachability(model, batch, matched_modules(model, _all_linear()))
    assert result.batch_modalities == {"image"}
    assert result.status("model.visual.blocks.0.attn.qkv") == "reached"


def test_image_rows_need_a_processor():
    with pytest.raises(ValueError, match="processor"):
        build_probe_batch(list(image_text_dataset(1)), make_tokenizer("qwen2_5_vl"))


def _all_linear():
    from peft import LoraConfig

    return LoraConfig(target_modules="all-linear")
