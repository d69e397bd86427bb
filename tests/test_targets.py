"""Target resolution: the user's LoraConfig in, the exact modules of the towers the data reaches out."""

from __future__ import annotations

import copy
import re
import warnings

import pytest
from peft import LoraConfig, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from peft.utils.error import NoMatchingPeftModuleError

from mm_trainer.model.matching import matched_modules
from mm_trainer.model.modality import ModalityProfile
from mm_trainer.model.probe import probe_reachability
from mm_trainer.model.targets import resolve_targets
from mm_trainer.training.sft_probe_batch import build_probe_batch
from tests.kit import FAMILIES, VLM_FAMILIES, make_tokenizer, text_dataset, tiny_model

TEXT = ModalityProfile(frozenset({"text"}))
IMAGE = ModalityProfile(frozenset({"text", "image"}))
SPECS = [["q_proj", "v_proj", "down_proj"], "all-linear"]


def peft_adapts(model, config) -> set[str]:
    """Independent reference: the module paths PEFT itself wraps when it builds the PeftModel (on a copy)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wrapped = get_peft_model(copy.deepcopy(model), copy.deepcopy(config))
    except NoMatchingPeftModuleError:
        return set()
    base = wrapped.base_model.model
    return {name for name, module in base.named_modules() if isinstance(module, BaseTunerLayer)}


def language_paths(family: str, names) -> set[str]:
    """The language model's paths by their prefix in transformers' module tree (not by the tower map under test)."""
    prefix = "model.layers." if family == "causal_lm" else "model.language_model."
    return {n for n in names if n.startswith(prefix)}


def _language_matches(model, spec, family) -> set[str]:
    return language_paths(family, peft_adapts(model, LoraConfig(r=4, target_modules=spec)))


@pytest.mark.parametrize("spec", SPECS, ids=["suffixes", "all-linear"])
@pytest.mark.parametrize("family", FAMILIES)
def test_text_only_data_keeps_exactly_the_language_matches(family, spec):
    model = tiny_model(family)
    plan = resolve_targets(model, LoraConfig(r=4, target_modules=spec), TEXT)
    kept = set(plan.kept())
    assert kept == _language_matches(model, spec, family)
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
    reference = _language_matches(model, "all-linear", family)
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


LAYERS_0 = "model.language_model.layers.0."
SPEC_CASES = [
    {"target_modules": ["q_proj", "v_proj"]},
    {"target_modules": ["self_attn.q_proj", "mlp.down_proj"]},
    {"target_modules": r".*language_model.*\.(q_proj|o_proj)"},
    {"target_modules": r".*\.(qkv|fc1|q_proj)"},
    {"target_modules": ["q_proj", "k_proj"], "layers_to_transform": [1]},
    {"target_modules": ["q_proj", "k_proj"], "layers_to_transform": 0},
    {"target_modules": ["q_proj", "qkv", "k_proj"], "layers_to_transform": [0], "layers_pattern": "blocks"},
    {"target_modules": ["q_proj", "k_proj"], "layers_to_transform": [1], "layers_pattern": ["blocks", "layers"]},
    # An exact path is adapted whatever layers_to_transform says; only `.suffix` matches are filtered.
    {"target_modules": [LAYERS_0 + "mlp.up_proj", "k_proj"], "layers_to_transform": [1]},
    {"target_modules": ["q_proj", "down_proj"], "exclude_modules": ["layers.1.self_attn.q_proj"]},
    {"target_modules": ["q_proj", "qkv"], "exclude_modules": r".*visual.*"},
    {"target_modules": ["up_proj", "q_proj"], "modules_to_save": ["mlp"]},
    {"target_modules": ["up_proj"], "modules_to_save": ["mlp"]},
    {"target_modules": "all-linear"},
    {"target_modules": "all-linear", "exclude_modules": r".*(visual|vision_tower|vision_model).*"},
    {"target_modules": "all-linear", "exclude_modules": ["o_proj", "lm_head"]},
    {"target_modules": "all-linear", "modules_to_save": ["multi_modal_projector"]},
    {"target_modules": None},
]
TABLE_FAMILIES = ["qwen2_5_vl", "llava", "mllama", "causal_lm"]
_BASES: dict[str, object] = {}


def _base(family: str):
    if family not in _BASES:
        _BASES[family] = tiny_model(family)
    return _BASES[family]


def _case_id(case) -> str:
    return re.sub(r"\W+", "_", str(case))[:70]


@pytest.mark.parametrize("case", SPEC_CASES, ids=_case_id)
@pytest.mark.parametrize("family", TABLE_FAMILIES)
def test_matching_equals_what_peft_adapts(family, case):
    model = _base(family)
    config = LoraConfig(r=4, **case)
    try:
        expected = peft_adapts(model, config)
    except ValueError:
        # PEFT knows no default targets for this multimodal type; mm-trainer takes those of its text model.
        assert case["target_modules"] is None
        defaults = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model.config.get_text_config().model_type)
        if defaults is None:
            with pytest.raises(ValueError, match="Set `target_modules`"):
                matched_modules(model, config)
            return
        expected = peft_adapts(model, LoraConfig(r=4, target_modules=defaults))
    assert set(matched_modules(model, config)) == expected


@pytest.mark.parametrize("case", SPEC_CASES, ids=_case_id)
@pytest.mark.parametrize("family", ["qwen2_5_vl", "causal_lm"])
def test_resolved_config_adapts_the_language_part_of_what_peft_adapts(family, case):
    """The tower filter on top of PEFT's matcher: text data keeps PEFT's language matches, and PEFT, given the
    resolved config, adapts exactly the kept modules."""
    model = _base(family)
    config = LoraConfig(r=4, **case)
    try:
        expected = language_paths(family, set(matched_modules(model, config)))  # equal to PEFT's (test above)
    except ValueError:
        expected = set()
    if not expected:
        with pytest.raises(ValueError, match="target_modules"):
            resolve_targets(model, config, TEXT)
        return
    plan = resolve_targets(model, config, TEXT)
    assert set(plan.kept()) == expected
    assert peft_adapts(model, plan.peft_config) == expected
