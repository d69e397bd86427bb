"""The save path: atomic writes, checkpoint completeness markers, the card written after the audit of the same save,
and adapters re-bound to the prepared model's parameters."""

from __future__ import annotations

import json
import math
import os

import pytest
from peft import LoraConfig

from mm_trainer import MMSFTTrainer
from mm_trainer.audit.card import CARD_BEGIN, CARD_END
from mm_trainer.utils.atomic import atomic_write_json, atomic_write_text
from mm_trainer.utils.checkpoints import COMPLETE_MARKER
from tests.kit import make_tokenizer, text_dataset, tiny_model, training_args


def test_atomic_write_replaces_whole_files_and_keeps_the_old_one_on_failure(tmp_path):
    path = tmp_path / "state.json"
    atomic_write_json(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}
    atomic_write_text(path, '{"a": 2}')
    assert json.loads(path.read_text()) == {"a": 2}
    with pytest.raises(ValueError):  # strict JSON: NaN is refused before anything touches the file
        atomic_write_json(path, {"a": math.nan})
    assert json.loads(path.read_text()) == {"a": 2}
    assert sorted(os.listdir(tmp_path)) == ["state.json"]  # no temporary file left behind


def _trainer(out, **kw):
    return MMSFTTrainer(
        model=tiny_model("qwen2_5_vl"),
        args=training_args(out, **kw),
        train_dataset=text_dataset(12),
        processing_class=make_tokenizer("qwen2_5_vl"),
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
    )


def test_checkpoints_are_marked_complete_last_and_the_card_follows_the_latest_audit(tmp_path):
    trainer = _trainer(tmp_path, max_steps=4, save_strategy="steps", save_steps=2)
    trainer.train()
    for step in (2, 4):
        ckpt = tmp_path / f"checkpoint-{step}"
        marker = json.loads((ckpt / COMPLETE_MARKER).read_text())
        assert marker["global_step"] == step
        # Everything the Trainer and mm-trainer write is there before the marker, with the sizes it lists.
        for name in ("adapter_model.safetensors", "trainer_state.json", "mm_trainer_state.json", "audit.json"):
            assert marker["files"][name] == (ckpt / name).stat().st_size, name
        assert json.loads((ckpt / "audit.json").read_text())["global_step"] == step
    # TRL writes output_dir/README.md before each checkpoint's save; its audit section is the checkpoint's own.
    card = (tmp_path / "README.md").read_text()
    section = card[card.index(CARD_BEGIN) : card.index(CARD_END)]
    assert "(optimizer step 4)" in section


def test_adapters_are_bound_to_the_prepared_models_parameters(tmp_path):
    trainer = _trainer(tmp_path, max_steps=1)
    trainer.train()
    live = {id(p) for p in trainer.model.parameters()}
    assert trainer.adapters and all(id(a.lora_A) in live and id(a.lora_B) in live for a in trainer.adapters)
    assert trainer.telemetry.adapters == trainer.adapters


def test_every_file_mm_trainer_writes_at_a_save_is_atomic(tmp_path, monkeypatch):
    import tempfile
    from types import SimpleNamespace

    import mm_trainer.utils.atomic as atomic

    written: list[str] = []

    def mkstemp(prefix, suffix, dir):  # every atomic write starts with its temporary file ".<name>.<random>.tmp"
        written.append(prefix[1:-1])
        return tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=dir)

    monkeypatch.setattr(atomic, "tempfile", SimpleNamespace(mkstemp=mkstemp))
    trainer = MMSFTTrainer(
        model=tiny_model("qwen2_5_vl"),
        args=training_args(tmp_path, max_steps=2, serving_clean_save=True, target_towers=["language", "vision"]),
        train_dataset=text_dataset(8),
        processing_class=make_tokenizer("qwen2_5_vl"),
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "down_proj"]),  # vision down_proj never fires
    )
    trainer.train()
    trainer.save_model()
    audit = json.loads((tmp_path / "audit.json").read_text())
    assert audit["serving_clean"]["stripped"]  # the serving-clean rewrite ran
    mm_files = {"mm_trainer_state.json", "audit.json", "AUDIT.md", "audit_loss.png", "audit_grad_norm.png"}
    rewritten = {"adapter_model.safetensors", "adapter_config.json", "README.md"}  # serving-clean, model card
    assert mm_files | rewritten <= set(written)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_audit_failure_warning_does_not_point_to_an_unwritten_error_file(tmp_path, monkeypatch):
    import mm_trainer.audit.auditor as auditor_module

    def broken(*args, **kwargs):
        raise RuntimeError("audit broke")

    def read_only(path, text):
        raise PermissionError(13, "Permission denied", str(path))

    trainer = _trainer(tmp_path, max_steps=1)
    trainer.train()
    monkeypatch.setattr(auditor_module, "write_audit_files", broken)
    monkeypatch.setattr(auditor_module, "atomic_write_text", read_only)
    with pytest.warns(RuntimeWarning) as caught:
        trainer.save_model()
    message = " ".join(str(w.message) for w in caught)
    assert "audit broke" in message and "could not be written either" in message
    assert str(tmp_path / "audit_error.txt") not in message
    assert (tmp_path / "adapter_model.safetensors").is_file()  # the adapter is saved all the same
