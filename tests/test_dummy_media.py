"""Dummy media (sharded engines): the vision tower runs on text-only micro-batches and changes nothing.

These run on one process, with the dummy switched on explicitly (it is otherwise only on under FSDP / ZeRO-3); the
2-process FSDP2 / ZeRO-3 runs are in ``tests/test_sharded_mixed.py``.
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model_state_dict

from mm_trainer import MMSFTConfig, MMSFTTrainer
from mm_trainer.core.dummy_media import DummyMedia, DummyMediaError
from tests.kit import make_processor, mixed_dataset, tiny_model, training_args

FAMILY = "qwen2_5_vl"
TARGETS = ["q_proj", "v_proj", "down_proj"]


class DummyOnTrainer(MMSFTTrainer):
    """MMSFTTrainer with the dummy media on, as under a sharding engine (``DummyMedia.for_run`` switches it on
    only there)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        base = self.model.get_base_model()
        self.mm.dummy_media = DummyMedia(
            base, {"vision": ["model.visual"]}, "model.language_model", self.processing_class, self.telemetry
        )


def _trainer(tmp_path, cls=MMSFTTrainer, **overrides):
    args = training_args(tmp_path, MMSFTConfig, per_device_train_batch_size=1, max_length=None, **overrides)
    return cls(
        model=tiny_model(FAMILY),
        args=args,
        train_dataset=mixed_dataset(8, family=FAMILY),
        processing_class=make_processor(FAMILY),
        peft_config=LoraConfig(r=4, target_modules=TARGETS),
    )


def _forward_backward(trainer, batch, dummy: bool):
    trainer.model.zero_grad(set_to_none=True)
    visual = trainer.model.get_base_model().model.visual
    calls = []
    handle = visual.register_forward_hook(lambda m, a, o: calls.append(1))
    if dummy:
        trainer.dummy_media.begin_micro_step(batch)
    loss = trainer.model(**batch).loss
    loss.backward()
    handle.remove()
    grads = {n: p.grad for n, p in trainer.model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, len(calls)


def test_dummy_runs_the_tower_and_changes_nothing(tmp_path):
    trainer = _trainer(tmp_path, DummyOnTrainer)
    batch = next(b for b in trainer.get_train_dataloader() if b.get("pixel_values") is None)
    trainer.telemetry.fired.clear()
    trainer.telemetry.watch_forward()
    loss_plain, grads_plain, calls_plain = _forward_backward(trainer, batch, dummy=False)
    fired_plain = set(trainer.telemetry.fired)
    loss_dummy, grads_dummy, calls_dummy = _forward_backward(trainer, batch, dummy=True)

    assert (calls_plain, calls_dummy) == (0, 1)  # the tower ran once, on the dummy only
    assert torch.equal(loss_dummy, loss_plain)  # bit for bit: x + 0 == x
    vision = [n for n in grads_plain if ".visual." in n]
    assert vision and all(grads_plain[n] is None for n in vision)
    for name, grad in grads_dummy.items():
        if name in vision:
            assert grad is not None and not grad.any(), name  # the backward ran through the tower, with exact zeros
        else:
            assert torch.equal(grad, grads_plain[name]), name
    # Adapters only the dummy ran have not fired on data.
    assert trainer.telemetry.fired == fired_plain and not any(".visual." in n for n in fired_plain)
    assert trainer.dummy_media.stats.used == {"vision": 1}

    # No micro-batch of the step held an image: the tower's zero gradients go back to None (AdamW skips them).
    assert trainer.dummy_media.end_step() == ["vision"]
    assert all(p.grad is None for n, p in trainer.model.named_parameters() if ".visual." in n)
    assert all(
        p.grad is not None for n, p in trainer.model.named_parameters() if p.requires_grad and ".visual." not in n
    )


def test_training_with_dummy_equals_training_without(tmp_path):
    """Mixed data, one row per micro-batch, with gradient accumulation: same losses, adapter and audit statuses."""
    runs = {}
    for name, cls in (("plain", MMSFTTrainer), ("dummy", DummyOnTrainer)):
        trainer = _trainer(tmp_path / name, cls, max_steps=4, gradient_accumulation_steps=2, weight_decay=0.1)
        trainer.train()
        trainer.save_model(str(tmp_path / name / "final"))
        audit = json.loads((tmp_path / name / "final" / "audit.json").read_text())
        runs[name] = {
            "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
            "adapter": {k: v.detach().clone() for k, v in get_peft_model_state_dict(trainer.model).items()},
            "statuses": {m["name"]: m["status"] for m in audit["modules"]},
            "fired": set(trainer.telemetry.fired),
        }
        if name == "plain":
            assert trainer.dummy_media is None  # one process: no sharding engine, no dummy
        if name == "dummy":
            stats = trainer.dummy_media.stats
            assert stats.used["vision"] > 0 and stats.idle_steps.get("vision", 0) > 0  # both paths exercised
    assert runs["dummy"]["losses"] == runs["plain"]["losses"]
    assert runs["dummy"]["adapter"].keys() == runs["plain"]["adapter"].keys()
    for key, value in runs["plain"]["adapter"].items():
        assert torch.equal(runs["dummy"]["adapter"][key], value), key
    assert runs["dummy"]["statuses"] == runs["plain"]["statuses"]
    assert runs["dummy"]["fired"] == runs["plain"]["fired"]


def test_dummy_only_tower_is_not_trained(tmp_path):
    """A tower that only ever saw dummies is audited as never fired, exactly as without the dummy."""
    rows = mixed_dataset(8, family=FAMILY)
    text_rows = rows.select([i for i in range(len(rows)) if not rows[i]["images"]])
    args = training_args(
        tmp_path,
        MMSFTConfig,
        per_device_train_batch_size=1,
        max_length=None,
        max_steps=2,
        data_modalities=["text", "image"],
        target_probe=False,
    )
    trainer = DummyOnTrainer(
        model=tiny_model(FAMILY),
        args=args,
        train_dataset=text_rows,
        processing_class=make_processor(FAMILY),
        peft_config=LoraConfig(r=4, target_modules=TARGETS),
    )
    assert any(".visual." in n for n in trainer.target_plan.kept())
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    audit = json.loads((tmp_path / "final" / "audit.json").read_text())
    statuses = {m["name"]: m["status"] for m in audit["modules"]}
    assert trainer.dummy_media.stats.used["vision"] == 2
    assert {s for n, s in statuses.items() if ".visual." in n} == {"never_fired"}
    assert {s for n, s in statuses.items() if ".visual." not in n} == {"trained"}


def test_tower_without_feature_method_is_refused():
    """Qwen2-Audio has no `get_audio_features`: a sharded run on mixed audio data cannot get a dummy; say so."""
    model = tiny_model("qwen2_audio")
    with pytest.raises(DummyMediaError, match="get_audio_features"):
        DummyMedia(model, {"audio": ["model.audio_tower"]}, "model.language_model", make_processor("qwen2_audio"))
