"""Tower map: every module of every kit model lands in the right tower, also for a model no table lists."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from mm_trainer.model.layers import is_linear, linear_params
from mm_trainer.model.towers import TOWERS, LinearInfo, map_towers
from tests.kit import FAMILIES, tiny_model

# (tower root paths expected, by family). Every linear below a root belongs to that root's tower, except the
# projector children named here.
EXPECTED_ROOTS = {
    "qwen2_5_vl": {"model.visual": "vision", "model.language_model": "language"},
    "qwen3_vl": {"model.visual": "vision", "model.language_model": "language"},
    "gemma3": {
        "model.vision_tower": "vision",
        "model.language_model": "language",
        "model.multi_modal_projector": "projector",
    },
    "llava": {
        "model.vision_tower": "vision",
        "model.language_model": "language",
        "model.multi_modal_projector": "projector",
    },
    "qwen2_audio": {
        "model.audio_tower": "audio",
        "model.language_model": "language",
        "model.multi_modal_projector": "projector",
    },
    "mllama": {"model.vision_model": "vision", "model.language_model": "language"},
    "causal_lm": {"model": "language"},
}
PROJECTOR_PREFIXES = {
    "qwen2_5_vl": ("model.visual.merger",),
    "qwen3_vl": ("model.visual.merger", "model.visual.deepstack_merger_list"),
    "gemma3": ("model.multi_modal_projector",),
    "llava": ("model.multi_modal_projector",),
    "qwen2_audio": ("model.multi_modal_projector",),
    "mllama": ("model.multi_modal_projector",),
    "causal_lm": (),
}


def _expected_tower(family: str, name: str) -> str:
    if name == "lm_head":
        return "output"
    if any(name == p or name.startswith(p + ".") for p in PROJECTOR_PREFIXES[family]):
        return "projector"
    for root, tower in EXPECTED_ROOTS[family].items():
        if name.startswith(root + "."):
            return tower
    raise AssertionError(f"{family}: no expectation for {name}")


@pytest.mark.parametrize("family", FAMILIES)
def test_every_linear_in_its_tower(family):
    model = tiny_model(family)
    tmap = map_towers(model)
    linears = [n for n, m in model.named_modules() if is_linear(m)]
    assert sorted(tmap.linears) == sorted(linears)
    wrong = {n: tmap.linears[n].tower for n in linears if tmap.linears[n].tower != _expected_tower(family, n)}
    assert not wrong, wrong
    assert tmap.output_name == "lm_head"
    assert tmap.composite == (family != "causal_lm")
    for root, tower in EXPECTED_ROOTS[family].items():
        if family != "causal_lm" or root in tmap.roots:
            assert tmap.roots[root][0] == tower


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_peft_wrapped_paths_map_like_the_base(family):
    from peft import LoraConfig, get_peft_model

    model = tiny_model(family)
    base = map_towers(model)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules="all-linear"))
    tmap = map_towers(peft_model)
    # The same linear layers (paths, towers, shapes, counts) and the same output head as the unwrapped model.
    assert tmap.linears == base.linears and tmap.output_name == base.output_name
    assert set(base.towers) <= set(tmap.towers)
    assert {n: tmap.towers[n] for n in base.towers} == base.towers
    # Every adapter path, with or without PEFT's prefix, is in the tower of the layer it adapts.
    adapted = [n for n, m in peft_model.base_model.model.named_modules() if hasattr(m, "lora_A")]
    assert adapted
    for name in adapted:
        for path in (f"{name}.lora_A.default", f"base_model.model.{name}.lora_B.default"):
            assert tmap.tower_of(path) == base.tower_of(name), path


# --------------------------------------------------------------------------------------------------------------------
# A composite model no table of ours lists: a vision encoder under an unusual attribute name.
# --------------------------------------------------------------------------------------------------------------------
class EyeConfig(PretrainedConfig):
    model_type = "eye_encoder"

    def __init__(self, width: int = 16, **kwargs):
        self.width = width
        super().__init__(**kwargs)


class PenConfig(PretrainedConfig):
    model_type = "pen_decoder"

    def __init__(self, hidden: int = 24, vocab: int = 50, layers: int = 2, **kwargs):
        self.hidden, self.vocab, self.layers = hidden, vocab, layers
        super().__init__(**kwargs)


class CyclopsConfig(PretrainedConfig):
    model_type = "cyclops"
    sub_configs = {"retina_config": EyeConfig, "scribe_config": PenConfig}

    def __init__(self, retina_config=None, scribe_config=None, **kwargs):
        self.retina_config = (
            retina_config if isinstance(retina_config, EyeConfig) else EyeConfig(**(retina_config or {}))
        )
        self.scribe_config = (
            scribe_config if isinstance(scribe_config, PenConfig) else PenConfig(**(scribe_config or {}))
        )
        super().__init__(**kwargs)


class Retina(nn.Module):
    """Takes pixels; holds no config (found by its forward signature)."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.stem = nn.Linear(3 * 4 * 4, width)
        self.blocks = nn.ModuleList([nn.Linear(width, width) for _ in range(2)])
        self.q_proj = nn.Linear(width, width)  # a suffix that text targets hit by accident

    def forward(self, pixel_values):
        x = self.stem(pixel_values.flatten(1))
        for block in self.blocks:
            x = torch.relu(block(x))
        return self.q_proj(x)


class Scribe(nn.Module):
    def __init__(self, config: PenConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab, config.hidden)
        self.layers = nn.ModuleList(
            nn.ModuleDict(
                {"q_proj": nn.Linear(config.hidden, config.hidden), "v_proj": nn.Linear(config.hidden, config.hidden)}
            )
            for _ in range(config.layers)
        )

    def forward(self, inputs_embeds):
        h = inputs_embeds
        for layer in self.layers:
            h = h + layer["v_proj"](torch.tanh(layer["q_proj"](h)))
        return h


class CyclopsForCausalLM(PreTrainedModel):
    config_class = CyclopsConfig

    def __init__(self, config: CyclopsConfig):
        super().__init__(config)
        self.optic_nerve_bundle = Retina(config.retina_config.width, config.scribe_config.hidden)
        self.bridge = nn.Linear(config.retina_config.width, config.scribe_config.hidden)
        self.scribe = Scribe(config.scribe_config)
        self.head = nn.Linear(config.scribe_config.hidden, config.scribe_config.vocab, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.scribe.embed

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids, pixel_values=None, labels=None, attention_mask=None, **kwargs):
        h = self.scribe.embed(input_ids)
        if pixel_values is not None:
            vis = self.bridge(self.optic_nerve_bundle(pixel_values))
            h = torch.cat([vis[:, None, :], h[:, 1:]], dim=1)
        logits = self.head(self.scribe(h))
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        from transformers.modeling_outputs import CausalLMOutput

        return CausalLMOutput(loss=loss, logits=logits)


def test_unknown_composite_model_maps_by_structure():
    model = CyclopsForCausalLM(CyclopsConfig())
    tmap = map_towers(model)
    assert tmap.composite
    assert tmap.roots["optic_nerve_bundle"][0] == "vision"
    assert tmap.roots["scribe"] == ("language", "config identity: config.scribe_config")
    towers = {n: i.tower for n, i in tmap.linears.items()}
    assert towers == {
        "optic_nerve_bundle.stem": "vision",
        "optic_nerve_bundle.blocks.0": "vision",
        "optic_nerve_bundle.blocks.1": "vision",
        "optic_nerve_bundle.q_proj": "vision",
        "bridge": "projector",
        "scribe.layers.0.q_proj": "language",
        "scribe.layers.0.v_proj": "language",
        "scribe.layers.1.q_proj": "language",
        "scribe.layers.1.v_proj": "language",
        "head": "output",
    }


def test_bitsandbytes_layers_are_linear_with_unpacked_param_count():
    bnb = pytest.importorskip("bitsandbytes")
    four = bnb.nn.Linear4bit(64, 32, bias=True, quant_type="nf4", compute_dtype=torch.float32).to("cpu")
    eight = bnb.nn.Linear8bitLt(64, 32, bias=False, has_fp16_weights=False)
    assert four.weight.numel() != 64 * 32  # packed storage
    assert is_linear(four) and is_linear(eight)
    assert linear_params(four) == 64 * 32 + 32
    assert linear_params(eight) == 64 * 32

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = four

    info = map_towers(Tiny()).linears["proj"]
    assert info == LinearInfo("proj", "language", 64, 32, 64 * 32 + 32, quantized=True)


def test_meta_device_model_maps_without_weights():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration._from_config(Qwen2_5_VLConfig())
    tmap = map_towers(model)
    counts = tmap.linear_counts()
    assert counts == {"vision": 160, "projector": 2, "language": 560, "output": 1}
    assert set(tmap.present_towers()) <= set(TOWERS)
