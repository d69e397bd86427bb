"""``mm-trainer plan``: from config.json alone, on a tiny saved config and on the 72B-class default config."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from transformers import Qwen2_5_VLConfig

from mm_trainer.cli.main import main
from mm_trainer.cli.plan import parse_target_modules
from tests.kit import tiny_config


@pytest.fixture(scope="module")
def q72(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen72b")
    Qwen2_5_VLConfig().save_pretrained(path)
    return path


def test_plan_table_on_72b_default_config(q72):
    # A real subprocess: the console script as a user runs it (interpreter start included).
    out = subprocess.run(
        [sys.executable, "-m", "mm_trainer.cli.main", "plan", str(q72), "--rank", "16"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "language" in out and "vision" in out and "projector" in out
    assert "9.7%" in out  # all-linear on text-only data: 9.7% of the r=16 budget would sit on the vision side
    assert "Adapting 560 modules" in out


def test_plan_json_on_tiny_saved_config(tmp_path, capsys):
    tiny_config("qwen2_5_vl").save_pretrained(tmp_path)
    assert main(["plan", str(tmp_path), "--target-modules", "q_proj,v_proj,down_proj", "--rank", "4", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    rows = {r["tower"]: r for r in plan["towers"]}
    assert rows["vision"]["kept"] == 0 and rows["vision"]["dropped"] == 2
    assert rows["language"]["kept"] == rows["language"]["matched"] == 6
    assert all(name.startswith("model.language_model.") for name in plan["kept"])
    assert plan["model_class"] == "Qwen2_5_VLForConditionalGeneration"


def test_plan_with_image_modality_keeps_vision(tmp_path, capsys):
    tiny_config("llava").save_pretrained(tmp_path)
    assert main(["plan", str(tmp_path / "config.json"), "--modality", "text,image", "--json"]) == 0
    rows = {r["tower"]: r for r in json.loads(capsys.readouterr().out)["towers"]}
    assert rows["vision"]["kept"] == rows["vision"]["linear_modules"] > 0
    assert rows["projector"]["kept"] == 2


def test_plan_bad_input(tmp_path, capsys):
    assert main(["plan", str(tmp_path / "missing")]) == 2
    assert "mm-trainer plan:" in capsys.readouterr().err
    tiny_config("qwen2_5_vl").save_pretrained(tmp_path)
    assert main(["plan", str(tmp_path), "--modality", "smell"]) == 2
    assert "Unknown modality" in capsys.readouterr().err


def test_parse_target_modules():
    assert parse_target_modules("all-linear") == "all-linear"
    assert parse_target_modules("q_proj, v_proj") == ["q_proj", "v_proj"]
    assert parse_target_modules(r".*\.q_proj") == r".*\.q_proj"


@pytest.mark.parametrize("family", ["qwen2_5_vl", "causal_lm"])
def test_meta_model_is_the_class_the_trainer_loads(tmp_path, family):
    """``plan`` and the 4-bit skip list are computed on the meta model: it must be the class TRL's load builds."""
    from transformers import AutoConfig
    from trl.trainer.utils import create_model_from_path

    from mm_trainer.model.model_class import meta_model
    from tests.kit import save_tiny

    path = save_tiny(family, tmp_path / family)
    meta = meta_model(AutoConfig.from_pretrained(path))
    loaded = create_model_from_path(str(path))
    assert type(meta) is type(loaded)
    assert [n for n, _ in meta.named_modules()] == [n for n, _ in loaded.named_modules()]
    assert {p.device.type for p in meta.parameters()} == {"meta"}


def test_meta_model_without_architectures_uses_the_auto_mappings():
    from mm_trainer.model.model_class import model_class_for

    config = tiny_config("qwen2_5_vl")
    config.architectures = None
    assert model_class_for(config).__name__ == "Qwen2_5_VLForConditionalGeneration"
    text = tiny_config("causal_lm")
    text.architectures = None
    assert model_class_for(text).__name__ == "Qwen2ForCausalLM"
