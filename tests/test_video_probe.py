"""Video rows in the probe: a clip built from the model config reaches the vision tower like a real video."""

from __future__ import annotations

import pytest
import torch

from mm_trainer.model.probe import probe_reachability
from mm_trainer.model.towers import map_towers
from mm_trainer.training.sft_probe_batch import build_probe_batch
from tests.kit import make_tokenizer, tiny_model


def _video_rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        user = [{"type": "video"}, {"type": "text", "text": f"What happens in clip {i}?"}]
        if i % 2:  # a text-only row next to each video row
            user = [{"type": "text", "text": f"Say {i}."}]
        answer = [{"type": "text", "text": f"Answer {i}."}]
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        rows.append({"messages": messages, "videos": [f"clip{i}.mp4"] if i % 2 == 0 else []})
    return rows


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_video_rows_reach_the_vision_tower(family):
    model = tiny_model(family)
    rows = _video_rows(2)
    batch = build_probe_batch(rows, make_tokenizer(family), model_config=model.config)
    video_id = model.config.video_token_id
    per_row = (batch["input_ids"] == video_id).sum(-1).tolist()
    grid = batch["video_grid_thw"][0]
    merge = model.config.vision_config.spatial_merge_size
    assert per_row == [int(grid.prod()) // merge**2, 0]  # placeholders on the video row only, one per merged patch
    assert batch["labels"][batch["input_ids"] == video_id].eq(-100).all()
    tmap = map_towers(model)
    vision = tmap.linear_names("vision") + tmap.linear_names("projector")
    language = tmap.linear_names("language")
    probe = probe_reachability(model, batch, vision + language)
    assert probe.batch_modalities == {"video"}
    unreached = [n for n in vision if probe.status(n) != "reached"]
    assert not unreached, unreached
    assert all(probe.status(n) == "reached" for n in language)


def test_video_rows_without_config_say_how_to_proceed():
    with pytest.raises(NotImplementedError, match="target_probe=False"):
        build_probe_batch(_video_rows(1), make_tokenizer("qwen2_5_vl"))
    config = tiny_model("causal_lm").config  # no video placeholder: refused with the reason
    with pytest.raises(NotImplementedError, match="no video placeholder"):
        build_probe_batch(_video_rows(1), make_tokenizer("causal_lm"), model_config=config)
    assert torch.is_tensor(build_probe_batch(_video_rows(2)[1:], make_tokenizer("causal_lm"))["input_ids"])
