"""A batch holding a modality the plan did not see fails at its step with the modality, the rows and the fix."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig

from mm_trainer import MMSFTConfig, MMSFTTrainer
from mm_trainer.core.batch_guard import BatchModalityGuard, UnseenModalityError
from mm_trainer.model.modality import ModalityProfile, batch_modality_rows
from tests.kit import (
    make_processor,
    make_tokenizer,
    mixed_dataset,
    placeholder_ids,
    text_dataset,
    tiny_config,
    tiny_model,
    training_args,
)


def _text_token() -> int:
    """A token id that stands for no modality in the tiny Qwen2.5-VL."""
    return min(set(range(100)) - set(placeholder_ids("qwen2_5_vl").values()))


def test_rows_come_from_placeholder_tokens_and_features():
    image_id = placeholder_ids("qwen2_5_vl")["image"]
    o = _text_token()
    ids = torch.tensor([[o, o, o], [o, image_id, o], [image_id, o, o]])
    assert batch_modality_rows({"input_ids": ids}, {"image": image_id}) == {"image": [1, 2]}
    # Features without placeholder tokens: present, rows unknown; an empty tensor is no feature.
    batch = {"input_ids": ids[:1], "input_features": torch.ones(1, 4, 8), "pixel_values": torch.zeros(0, 3)}
    assert batch_modality_rows(batch, {"image": image_id}) == {"audio": None}


def test_guard_names_modality_rows_and_fix():
    config = tiny_config("qwen2_5_vl")
    image_id = config.image_token_id
    profile = ModalityProfile(frozenset({"text"}), rows_sampled=3)
    guard = BatchModalityGuard(profile, config, released=["model.visual"])
    o = _text_token()
    guard.check({"input_ids": torch.tensor([[o, o], [o, o]])}, step=1)  # text only: fine
    with pytest.raises(UnseenModalityError, match=r"Step 7: the batch holds image \(batch row\(s\) \[1\]\)") as info:
        guard.check({"input_ids": torch.tensor([[o, o], [image_id, o]]), "pixel_values": torch.ones(4, 8)}, step=7)
    message = str(info.value)
    assert "data_modalities=['image', 'text']" in message
    assert "free_unreached_towers=False" in message and "model.visual" in message
    # One process: `defer` has no all-reduce to start, the batch's own modality raises at once.
    with pytest.raises(UnseenModalityError, match="Step 8"):
        guard.check({"input_ids": torch.tensor([[image_id]])}, step=8, defer=True)
    assert not guard.pending
    # A declared profile that holds the modality lets the batch through.
    BatchModalityGuard(ModalityProfile.declare(["image"]), config).check({"input_ids": torch.tensor([[image_id]])}, 1)


def test_training_stops_at_the_step_of_an_unsampled_image_row(tmp_path):
    # The profile reads row 0 only (text): it plans a text-only run and releases the vision tower. The one batch of
    # the run holds the image rows 1 and 3: the guard stops it before the forward reaches the released tower.
    trainer = MMSFTTrainer(
        model=tiny_model("qwen2_5_vl"),
        args=training_args(tmp_path, MMSFTConfig, modality_sample_rows=1, per_device_train_batch_size=4, max_steps=1),
        train_dataset=mixed_dataset(4),
        processing_class=make_processor("qwen2_5_vl"),
        peft_config=LoraConfig(r=2, target_modules="all-linear"),
    )
    assert trainer.modality_profile.text_only and trainer.released_towers
    with pytest.raises(UnseenModalityError, match=r"Step 1: the batch holds image \(batch row\(s\) \[\d, \d\]\)"):
        trainer.train()


def test_text_batches_pass_the_guard(tmp_path):

    trainer = MMSFTTrainer(
        model=tiny_model("qwen2_5_vl"),
        args=training_args(tmp_path, MMSFTConfig, max_steps=1),
        train_dataset=text_dataset(4),
        processing_class=make_tokenizer("qwen2_5_vl"),
        peft_config=LoraConfig(r=2, target_modules="all-linear"),
    )
    assert trainer.batch_guard is not None
    trainer.train()
    assert trainer.state.global_step == 1


@pytest.mark.slow
def test_every_rank_raises_when_one_rank_sees_the_modality(tmp_path):
    from tests.kit.launch import ROOT, accelerate_launch

    accelerate_launch(ROOT / "tests" / "scripts" / "ddp_batch_guard.py", str(tmp_path), timeout=300)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert results[0]["raised"].startswith("Step 2: the batch holds image (batch row(s) [1])")
    assert results[1]["raised"].startswith("Step 2: the batch holds image (in another process's batch)")
    assert results[0]["deferred_raised"].startswith("Step 4: the batch holds image (batch row(s) [1])")
    assert results[1]["deferred_raised"].startswith("Step 4: the batch holds image (in another process's batch)")
    assert [r["pending_after_clean_check"] for r in results] == [True, True]
    assert "pending_after_check" not in results[0] and results[1]["pending_after_check"] is True
    assert [r["pending_at_end"] for r in results] == [False, False]
