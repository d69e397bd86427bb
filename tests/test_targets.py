"""Target resolution: the user's LoraConfig in, the exact modules of the towers the data reaches out."""

from __future__ import annotations

import re

import pytest
from peft import LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists

from mm_trainer.modality import ModalityProfile
from mm_trainer.probe import build_probe_batch, probe_reachability
from mm_trainer.targets import matched_modules, resolve_targets, target_matches
from mm_trainer.towers import map_towers
from tests.kit import FAMILIES, VLM_FAMILIES, make_tokenizer, text_dataset, tiny_model

TEXT = ModalityProfile(frozenset({"text"}))
IMAGE = ModalityProfile(frozenset({"text", "image"}))
SPECS = [["q_proj", "v_proj", "down_proj"], "all-linear"]


def _language_matches(model, spec) -> set[str]:
    """Independent reference: PEFT's own matcher over the language tower's linear layers."""
    tmap = map_towers(model)
    config = LoraConfig(r=4, target_modules=spec)
    if spec == "all-linear":
        return {n for n, i in tmap.linears.items() if i.tower == "language"}
    return {n for n in tmap.linear_names("language") if check_target_module_exists(config, n)}


@pytest.mark.parametrize("spec", SPECS, ids=["suffixes", "all-linear"])
@pytest.mark.parametrize("family", FAMILIES)
def test_text_only_data_keeps_exactly_the_language_matches(family, spec):
    model = tiny_model(family)
    plan = resolve_targets(model, LoraConfig(r=4, target_modules=spec), TEXT)
    kept = set(plan.kept())
    assert kept == _language_matches(model, spec)
    assert {plan.tower_map.tower_of(n) for n in kept} == {"language"}
    assert plan.peft_config.target_modules == kept
    assert "lm_head" not in kept


@pytest.mark.parametrize("family", FAMILIES)
def test_probe_on_text_batch_confirms_language_targets(family):
    model = tiny_model(family)
    rows = list(text_dataset(2))
    batch = build_probe_batch(rows, make_tokenizer(family))
    config = LoraConfig(r=4, target_modules="all-linear")
    probe = probe_reachability(model, batch, matched_modules(model, config))
    plan = resolve_targets(model, config, TEXT, probe=probe)
    reference = _language_matches(model, "all-linear")
    dropped_language = reference - set(plan.kept())
    if family == "mllama":
        # Cross-attention decoder layers (attention and MLP) are skipped entirely when there is no image.
        cross = [f"model.language_model.layers.{i}." for i in model.config.text_config.cross_attention_layers]
        expected = {n for n in reference if n.startswith(tuple(cross))}
        assert dropped_language == expected and any(".cross_attn." in n for n in expected)
        assert all(probe.status(n) == "never_fired" for n in dropped_language)
    else:
        assert not dropped_language
    assert set(plan.kept()) <= reference


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_image_data_keeps_vision_under_auto_and_drops_it_when_told(family):
    model = tiny_model(family)
    config = LoraConfig(r=4, target_modules="all-linear")
    auto = resolve_targets(model, config, IMAGE)
    towers = {auto.tower_map.tower_of(n) for n in auto.kept()}
    assert "vision" in towers and "language" in towers
    vision = {n for n in auto.tower_map.linear_names("vision")}
    assert vision <= set(auto.kept())
    language_only = resolve_targets(model, config, IMAGE, target_towers=["language"])
    assert {language_only.tower_map.tower_of(n) for n in language_only.kept()} == {"language"}
    assert all("target_towers" in d.reason for d in language_only.decisions if d.tower == "vision")


def test_dead_targets_error_names_the_modules():
    model = tiny_model("qwen2_5_vl")
    with pytest.raises(ValueError, match=r"model\.visual\.blocks\.0\.mlp\.down_proj") as err:
        resolve_targets(model, LoraConfig(r=4, target_modules=SPECS[0]), TEXT, dead_targets="error")
    assert "dead_targets" in str(err.value)


def test_dead_targets_warn_keeps_and_warns():
    model = tiny_model("qwen2_5_vl")
    with pytest.warns(UserWarning, match="does not reach"):
        plan = resolve_targets(model, LoraConfig(r=4, target_modules=SPECS[0]), TEXT, dead_targets="warn")
    assert {"model.visual.blocks.0.mlp.down_proj", "model.visual.blocks.1.mlp.down_proj"} <= set(plan.kept())
    assert set(plan.dead_kept()) == {"model.visual.blocks.0.mlp.down_proj", "model.visual.blocks.1.mlp.down_proj"}


def test_forced_tower_on_text_data_is_kept_with_a_warning():
    model = tiny_model("qwen2_5_vl")
    with pytest.warns(UserWarning, match="target_towers forces"):
        plan = resolve_targets(
            model, LoraConfig(r=4, target_modules="all-linear"), TEXT, target_towers=["language", "vision"]
        )
    assert set(plan.tower_map.linear_names("vision")) <= set(plan.kept())
    assert plan.wasted_share() > 0


def test_bad_input_errors():
    model = tiny_model("qwen2_5_vl")
    with pytest.raises(ValueError, match="Unknown tower name"):
        resolve_targets(model, LoraConfig(r=4, target_modules="all-linear"), TEXT, target_towers=["eyes"])
    with pytest.raises(ValueError, match="matches no module"):
        resolve_targets(model, LoraConfig(r=4, target_modules=["nonexistent_proj"]), TEXT)
    with pytest.raises(ValueError, match=r"only matches modules in tower\(s\) \['vision'\]"):
        resolve_targets(model, LoraConfig(r=4, target_modules=["qkv"]), TEXT)
    with pytest.raises(ValueError, match="dead_targets"):
        resolve_targets(model, LoraConfig(r=4, target_modules="all-linear"), TEXT, dead_targets="ignore")


def test_output_head_only_when_named():
    model = tiny_model("causal_lm")
    plan = resolve_targets(model, LoraConfig(r=4, target_modules=["q_proj", "lm_head"]), TEXT)
    assert "lm_head" in plan.kept()
    plan = resolve_targets(model, LoraConfig(r=4, target_modules=r".*"), TEXT)
    assert "lm_head" not in plan.kept()


SPEC_CASES = [
    {"target_modules": ["q_proj", "v_proj"]},
    {"target_modules": ["self_attn.q_proj", "mlp.down_proj"]},
    {"target_modules": r".*language_model.*\.(q_proj|o_proj)"},
    {"target_modules": ["q_proj", "down_proj"], "exclude_modules": ["layers.1.self_attn.q_proj"]},
    {"target_modules": ["q_proj", "qkv"], "exclude_modules": r".*visual.*"},
    {"target_modules": ["q_proj", "k_proj"], "layers_to_transform": [1]},
    {"target_modules": ["q_proj", "k_proj"], "layers_to_transform": [0], "layers_pattern": "blocks"},
    {"target_modules": ["up_proj"], "modules_to_save": ["mlp"]},
]


@pytest.mark.parametrize("case", SPEC_CASES, ids=lambda c: re.sub(r"\W+", "_", str(c))[:60])
@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_matching_equals_peft(family, case):
    model = tiny_model(family)
    config = LoraConfig(r=4, **case)
    names = [n for n, _ in model.named_modules() if n]
    ours = [n for n in names if target_matches(config, n)]
    peft = [n for n in names if check_target_module_exists(config, n)]
    assert ours == peft
