"""Diverged runs as the audit and ``mm-trainer compare`` see them: the unfiltered loss (transformers'
``logging_nan_inf_filter`` hides NaN steps from the logged loss) and overflowing-but-finite weights."""

from __future__ import annotations

import json
import math

import pytest
from peft import LoraConfig
from safetensors.torch import load_file

from mm_trainer import MMSFTTrainer
from mm_trainer.cli.main import main
from tests.kit import make_tokenizer, text_dataset, tiny_model, training_args


def _run(out, lr, steps=4):
    trainer = MMSFTTrainer(
        model=tiny_model("qwen2_5_vl"),
        args=training_args(out, max_steps=steps, learning_rate=lr, audit_block_failed_push=True),
        train_dataset=text_dataset(8),
        processing_class=make_tokenizer("qwen2_5_vl"),
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
    )
    trainer.train()
    trainer.save_model()
    return trainer, json.loads((out / "audit.json").read_text())


def test_nan_loss_is_seen_through_the_logging_filter(tmp_path, capsys):
    trainer, audit = _run(tmp_path / "nan", lr=1e38)
    assert trainer.args.logging_nan_inf_filter  # transformers' default: the logged loss stays finite
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert all(math.isfinite(v) for v in logged)
    raw = [v for _, v in audit["dynamics"]["series"]["loss"]]
    bad = audit["dynamics"]["loss"]["non_finite_steps"]
    assert bad and all(raw[s - 1] == "nan" or raw[s - 1] in ("inf", "-inf") for s in bad)
    # Finite steps agree with the Trainer's own logged mean to float32 rounding of a ~6.5 sum (same arithmetic).
    for (step, value), logged_value in zip(audit["dynamics"]["series"]["loss"], logged):
        if step not in bad:
            assert value == pytest.approx(logged_value, rel=1e-6)
    assert audit["verdict"] == "fail" and "non_finite_loss" in [r["code"] for r in audit["reasons"]]
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "nan"), "--out", str(tmp_path / "c.png"), "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["runs"][0]
    assert row["final_loss"] == "nan"  # not the filtered 0.0 / stale mean that looked like the best run


def test_overflowing_weights_are_reported_as_overflow(tmp_path):
    _, audit = _run(tmp_path / "big", lr=1e30, steps=3)
    weights = load_file(str(tmp_path / "big" / "adapter_model.safetensors"))
    if not all(bool(t.isfinite().all()) for t in weights.values()):
        pytest.skip("this platform's arithmetic turned the weights non-finite; the overflow case did not arise")
    codes = [r["code"] for r in audit["reasons"]]
    assert "weights_overflow" in codes and "non_finite_weights" not in codes
    assert audit["verdict"] == "fail"
    assert all(m["finite"] for m in audit["modules"])


def test_tower_and_trainer_gradient_norms_share_one_aggregation(tmp_path):
    # logging_steps=2: both are the value of the logged step (no window mean), so with only language adapters
    # trainable the tower norm is the Trainer's total norm up to float32 rounding of the two reductions.
    trainer = MMSFTTrainer(
        model=tiny_model("qwen2_5_vl"),
        args=training_args(tmp_path, max_steps=6, logging_steps=2, learning_rate=5e-3),
        train_dataset=text_dataset(12),
        processing_class=make_tokenizer("qwen2_5_vl"),
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "grad_norm/language" in h]
    assert [h["step"] for h in logs] == [2, 4, 6]
    for h in logs:
        assert h["grad_norm/language"] == pytest.approx(h["grad_norm"], rel=1e-5)
    audit = trainer.auditor.report()
    assert audit["dynamics"]["aggregation"]["grad_norm"] == "value at the logged optimizer step, before clipping"
    from mm_trainer.audit.compare import draw, load_runs

    trainer.save_model()
    fig = draw(load_runs([tmp_path]), tmp_path / "cmp.png")
    titles = [ax.get_title() for ax in fig.axes]
    assert any(
        t.startswith("Gradient norm, all trainable") and "value at the logged optimizer step" in t for t in titles
    )
