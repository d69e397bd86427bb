"""Two CPU processes under DDP: training finishes and both ranks hold identical adapter weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.kit.launch import accelerate_launch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("data", ["text", "mixed"])
def test_ddp_two_processes_identical_adapters(tmp_path, data):
    accelerate_launch(ROOT / "tests" / "scripts" / "ddp_train.py", str(tmp_path), data)
    infos = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [i["world_size"] for i in infos] == [2, 2] and [i["steps"] for i in infos] == [4, 4]
    # Text-only data: every adapter is on the language model, so DDP needs no unused-parameter search.
    assert infos[0]["ddp_find_unused_parameters"] is (data != "text")
    assert infos[0]["kept"] == infos[1]["kept"]
    assert infos[0]["fired"] == infos[1]["fired"]  # synced across ranks at each log
    if data == "text":
        assert all(name.startswith("model.language_model.") for name in infos[0]["kept"])
    a, b = (load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1))
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0)
    assert any("lora_B" in k and a[k].abs().sum() > 0 for k in a)
