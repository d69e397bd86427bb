"""Tower release: the weights go, the modules stay (forwards that read ``.device`` / ``.config`` keep working)."""

from __future__ import annotations

import gc
import json
import weakref

import pytest
import torch
from peft import LoraConfig, PeftModel

from mm_trainer import MMSFTConfig, MMSFTTrainer
from mm_trainer.distributed.engine import Engine, detect_engine
from mm_trainer.model.release import ReleasedTowerError, release_blocker
from tests.kit import make_tokenizer, text_dataset, tiny_model, training_args
from tests.kit.models import AUDIO_CHUNK_SECONDS, AUDIO_MEL_BINS

SUFFIXES = ["q_proj", "v_proj", "down_proj"]


def _text_batch(family: str) -> dict[str, torch.Tensor]:
    tok = make_tokenizer(family)
    return dict(tok(["What is 2 + 3?", "What is 9 + 9? It is"], return_tensors="pt", padding=True))


@pytest.mark.parametrize("targets", ["all-linear", SUFFIXES], ids=["all-linear", "suffixes"])
def test_qwen2_audio_text_only_trains_with_released_tower(tmp_path, targets):
    """Qwen2-Audio's text-only forward reads ``self.audio_tower.device``: the released tower must still answer."""
    family = "qwen2_audio"
    full = tiny_model(family)
    full_class = type(full.model.audio_tower)
    full_dtype, full_device = full.model.audio_tower.dtype, full.model.audio_tower.device
    released_bytes = sum(t.numel() * t.element_size() for t in full.model.audio_tower.state_dict().values())
    trainer = MMSFTTrainer(
        model=full,
        args=training_args(tmp_path, MMSFTConfig, max_steps=2),
        train_dataset=text_dataset(8),
        processing_class=make_tokenizer(family),
        peft_config=LoraConfig(r=4, target_modules=targets),
    )
    del full
    assert [r.path for r in trainer.released_towers] == ["model.audio_tower"]
    assert trainer.released_towers[0].bytes == released_bytes
    tower = trainer.model.get_base_model().model.audio_tower
    assert type(tower) is full_class and tower.device == full_device and tower.dtype == full_dtype
    assert tower.config.d_model > 0
    assert sum(t.numel() for t in tower.parameters()) == 0 and sum(t.numel() for t in tower.buffers()) == 0
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    assert json.loads((tmp_path / "final" / "audit.json").read_text())["verdict"] == "pass"

    batch = _text_batch(family)
    trainer.model.eval()
    with torch.no_grad():
        trained = trainer.model(**batch).logits
    loaded = PeftModel.from_pretrained(tiny_model(family), tmp_path / "final")
    with torch.no_grad():
        reloaded = loaded(**batch).logits
    # Same fp32 operations on the same weights (the audio tower takes no part in a text-only forward).
    torch.testing.assert_close(reloaded, trained, atol=1e-5, rtol=0)


def test_released_tower_fed_audio_says_how_to_fix(tmp_path):
    family = "qwen2_audio"
    trainer = MMSFTTrainer(
        model=tiny_model(family),
        args=training_args(tmp_path, MMSFTConfig),
        train_dataset=text_dataset(4),
        processing_class=make_tokenizer(family),
        peft_config=LoraConfig(r=4, target_modules=SUFFIXES),
    )
    frames = AUDIO_CHUNK_SECONDS * 100
    batch = _text_batch(family)
    with pytest.raises(ReleasedTowerError, match=r"free_unreached_towers=False.*data_modalities"):
        trainer.model(
            **batch,
            input_features=torch.zeros(2, AUDIO_MEL_BINS, frames),
            feature_attention_mask=torch.ones(2, frames, dtype=torch.long),
        )
    # A submodule called directly (as some models call a tower's embeddings) refuses too, instead of a shape error.
    conv = trainer.model.get_base_model().model.audio_tower.conv1
    with pytest.raises(ReleasedTowerError, match="was released"):
        conv(torch.zeros(1, AUDIO_MEL_BINS, frames))


def test_release_leaves_no_reference_to_freed_weights(tmp_path):
    """Every old parameter and buffer of the released tower is garbage once the caller drops the model it passed."""
    family = "qwen2_5_vl"
    model = tiny_model(family)
    old = [weakref.ref(t) for t in [*model.model.visual.parameters(), *model.model.visual.buffers()]]
    no_split = set(model._no_split_modules)
    trainer = MMSFTTrainer(
        model=model,
        args=training_args(tmp_path, MMSFTConfig, max_steps=1),
        train_dataset=text_dataset(4),
        processing_class=make_tokenizer(family),
        peft_config=LoraConfig(r=4, target_modules="all-linear"),
    )
    del model
    trainer.train()
    gc.collect()
    assert old and not [r for r in old if r() is not None]
    # The module tree keeps every class `_no_split_modules` names, so FSDP's transformer auto-wrap finds them.
    base = trainer.model.get_base_model()
    present = {type(m).__name__ for m in base.modules()}
    assert no_split <= present, no_split - present
    assert set(base._no_split_modules) == no_split


def test_fsdp1_release_refused_with_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    args = training_args(tmp_path, MMSFTConfig, free_unreached_towers=True)
    assert detect_engine(args) == Engine(fsdp_version=1)
    with pytest.raises(ValueError, match=r"FSDP1.*fsdp_version: 2.*free_unreached_towers=False"):
        MMSFTTrainer(
            model=tiny_model("qwen2_5_vl"),
            args=args,
            train_dataset=text_dataset(4),
            processing_class=make_tokenizer("qwen2_5_vl"),
            peft_config=LoraConfig(r=4, target_modules=SUFFIXES),
        )


def test_release_blocker_per_engine():
    model = tiny_model("qwen2_5_vl")
    assert release_blocker(Engine(), model) is None
    assert release_blocker(Engine(fsdp_version=2), model) is None
    assert release_blocker(Engine(zero_stage=3), model) is None  # not partitioned yet: the engine partitions later
    blocker = release_blocker(Engine(fsdp_version=1), model)
    assert blocker is not None and blocker.refuse
    assert Engine(fsdp_version=2).shards_parameters and Engine(zero_stage=3).shards_parameters
    assert not Engine(zero_stage=2).shards_parameters and not Engine().shards_parameters
