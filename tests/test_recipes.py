"""Recipes: each main() runs 2 steps on its embedded default; every YAML parses against its recipe's parser."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def load_recipe(name: str):
    """Import ``recipes/<name>.py`` as a module."""
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", RECIPES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _recipe_of(yaml_path: Path) -> str:
    """The recipe a config belongs to, from the launch command its opening comment gives."""
    match = re.search(r"accelerate launch (?:--config_file \S+ )?recipes/(\w+)\.py", yaml_path.read_text())
    assert match, f"{yaml_path} must open with a comment giving its `accelerate launch recipes/<recipe>.py` line"
    return match.group(1)


def test_qwen_text_sft_two_steps(tmp_path):
    recipe = load_recipe("qwen_text_sft")
    result = recipe.main(
        ["--output_dir", str(tmp_path), "--max_steps", "2", "--train_samples", "32", "--eval_samples", "4",
         "--logging_steps", "1", "--per_device_train_batch_size", "4", "--use_cpu", "true"]
    )  # fmt: skip
    # The score is the share of exact (case-insensitive) answers over the 4 held-out rows, recomputed here.
    answers = result["answers_after"]
    assert len(answers["predictions"]) == len(answers["references"]) == 4
    hits = sum(p.strip().lower() == r.strip().lower() for p, r in zip(answers["predictions"], answers["references"]))
    assert result["exact_match_after"] == pytest.approx(hits / 4)
    assert result["exact_match_before"] in {0.0, 0.25, 0.5, 0.75, 1.0}
    assert (tmp_path / "adapter_model.safetensors").is_file()
    assert result["train_loss_last"] > 0


@pytest.mark.parametrize("yaml_path", sorted((RECIPES / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_yaml_parses(yaml_path):
    recipe = load_recipe(_recipe_of(yaml_path))
    parsed = recipe.parser().parse_args_and_config(["--config", str(yaml_path), "--use_cpu", "true"])
    assert parsed  # dataclasses built: unknown keys or bad values would have raised


@pytest.mark.parametrize("yaml_path", sorted((RECIPES / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs_parse(yaml_path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(yaml_path))
    assert config.num_processes >= 1
    assert "accelerate launch --config_file recipes/accelerate/" in yaml_path.read_text()


def test_init_study_two_steps_per_scheme(tmp_path, capsys):
    recipe = load_recipe("init_study")
    run_dirs = recipe.main(
        ["--output_dir", str(tmp_path), "--max_steps", "2", "--train_samples", "32", "--logging_steps", "1",
         "--per_device_train_batch_size", "4", "--use_cpu", "true"]
    )  # fmt: skip
    assert [Path(d).name for d in run_dirs] == list(recipe.SCHEMES)
    for run_dir in run_dirs:
        assert (Path(run_dir) / "audit.json").is_file() and (Path(run_dir) / "adapter_model.safetensors").is_file()
    assert (tmp_path / "compare.png").is_file()
    out = capsys.readouterr().out
    assert all(scheme in out for scheme in recipe.SCHEMES)


@pytest.mark.parametrize("config", [None, "qwen_vl_imod_loftq.yaml"], ids=["imod", "imod-loftq"])
def test_qwen_vl_imod_sft_two_steps(tmp_path, config):
    recipe = load_recipe("qwen_vl_imod_sft")
    argv = ["--config", str(RECIPES / "configs" / config)] if config else []
    result = recipe.main(
        [*argv, "--output_dir", str(tmp_path), "--max_steps", "2", "--train_samples", "16", "--eval_samples", "4",
         "--logging_steps", "1", "--per_device_train_batch_size", "4", "--use_cpu", "true"]
    )  # fmt: skip
    assert (tmp_path / "adapter_model.safetensors").is_file() and (tmp_path / "audit.json").is_file()
    audit = json.loads((tmp_path / "audit.json").read_text())
    assert "imod" in audit["sections"] and audit["training"]["imod"] is True
    assert ("quantization" in audit["sections"]) == (config is not None)
    assert result["non_text_dominance_rate"]  # measured at step 1 on image-text data
