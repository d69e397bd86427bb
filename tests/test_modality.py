"""Modality profile of datasets (bounded sample, not row 0 only) and per-token modality of collated batches."""

from __future__ import annotations

import datasets
import pytest
import torch

from mm_trainer.model.modality import (
    AUDIO,
    IMAGE,
    PAD,
    TEXT,
    VIDEO,
    ModalityProfile,
    placeholder_ids,
    profile_dataset,
    row_modalities,
    token_modality,
)
from tests.kit import (
    as_iterable,
    audio_text_dataset,
    image_text_dataset,
    make_image,
    mixed_dataset,
    text_dataset,
    tiny_config,
)
from tests.kit import placeholder_ids as kit_placeholders


@pytest.mark.parametrize("fmt", ["messages", "text", "prompt_completion", "prompt_completion_text"])
def test_text_formats_are_text_only(fmt):
    profile = profile_dataset(text_dataset(8, fmt=fmt))
    assert profile.text_only and profile.modalities == {"text"}
    assert profile.rows_sampled == 8
    assert profile.reached_towers() == {"language"}


def test_image_text_and_audio():
    assert profile_dataset(image_text_dataset(4)).modalities == {"text", "image"}
    audio = profile_dataset(audio_text_dataset(4))
    assert audio.modalities == {"text", "audio"} and audio.rows_with == {"audio": 4}
    assert audio.reached_towers() == {"language", "audio", "projector"}


def test_mixed_dataset_seen_beyond_row_zero():
    ds = mixed_dataset(16, image_every=4)
    assert row_modalities(ds[0]) == set()  # what TRL looks at
    profile = profile_dataset(ds)
    assert profile.modalities == {"text", "image"}
    assert profile.rows_with["image"] == 4 and profile.mixed


def test_bounded_sample_spreads_over_the_dataset():
    rows = [{"messages": [{"role": "user", "content": "hi"}], "images": []} for _ in range(1000)]
    rows[-1]["images"] = [make_image(0, 8)]
    ds = datasets.Dataset.from_list(rows)
    profile = profile_dataset(ds, max_rows=10)
    assert profile.rows_sampled == 10
    assert "image" in profile.modalities  # the last row is always sampled


def test_iterable_dataset_sampled_from_its_head():
    ds = as_iterable(mixed_dataset(12))
    profile = profile_dataset(ds, max_rows=5)
    assert profile.iterable and profile.rows_sampled == 5
    assert profile.modalities == {"text", "image"}


def test_chat_content_parts_and_columns():
    assert row_modalities({"messages": [{"role": "user", "content": [{"type": "video"}]}]}) == {"video"}
    assert row_modalities({"prompt": [{"role": "user", "content": [{"type": "input_audio"}]}]}) == {"audio"}
    assert row_modalities({"image": None, "text": "x"}) == set()
    assert row_modalities({"videos": ["v.mp4"], "audios": [None]}) == {"video"}


def test_declared_profile_and_validation():
    assert ModalityProfile.declare(["image"]).modalities == {"text", "image"}
    with pytest.raises(ValueError, match="Unknown modality"):
        ModalityProfile.declare(["smell"])
    with pytest.raises(ValueError, match="empty"):
        profile_dataset(datasets.Dataset.from_list([]))


@pytest.mark.parametrize("family", ["qwen2_5_vl", "gemma3", "llava", "qwen2_audio", "mllama"])
def test_placeholder_ids_from_config(family):
    assert placeholder_ids(tiny_config(family)) == kit_placeholders(family)


def test_token_modality_per_position():
    config = tiny_config("qwen2_5_vl")
    ids = kit_placeholders("qwen2_5_vl")
    input_ids = torch.tensor([[40, ids["image"], ids["image"], 41, ids["video"], 0], [40, 41, 42, 43, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]])
    batch = {"input_ids": input_ids, "attention_mask": mask, "pixel_values": torch.zeros(2, 3)}
    classes = token_modality(batch, config)
    assert classes.tolist() == [[TEXT, IMAGE, IMAGE, TEXT, VIDEO, PAD], [TEXT, TEXT, TEXT, TEXT, PAD, PAD]]
    audio = token_modality({"input_ids": torch.tensor([[1, 9]])}, placeholders={"audio": 9})
    assert audio.tolist() == [[TEXT, AUDIO]]


def test_token_modality_needs_placeholder_for_media():
    config = tiny_config("causal_lm")  # no image token id
    batch = {"input_ids": torch.tensor([[1, 2]]), "pixel_values": torch.zeros(1, 3)}
    with pytest.raises(ValueError, match="image_token_id"):
        token_modality(batch, config)
    assert token_modality({"input_ids": torch.tensor([[1, 2]])}, config).tolist() == [[TEXT, TEXT]]
