"""Tower map rules: modality-to-text projections and resamplers are ``projector``, patch embeddings belong to their
media tower, decoder-internal blocks reached by text are ``language``.

Each rule is checked on the transformers families where it was misfiled (tiny models built from the config classes
with :func:`tests.kit.shrink.shrink_config`) and on a custom composite model that no table could list.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, PretrainedConfig, PreTrainedModel

from mm_trainer.model.towers import map_towers
from tests.kit.shrink import shrink_config


def _tiny(config_name: str) -> PreTrainedModel:
    config = shrink_config(getattr(transformers, config_name)())
    torch.manual_seed(0)
    for auto in (AutoModelForImageTextToText, AutoModelForCausalLM):
        try:
            return auto.from_config(config)
        except ValueError:  # not in this auto mapping
            continue
    raise AssertionError(f"{config_name}: no auto class builds it")


# path -> tower, for the modules the issue lists, plus a neighbour of each that must not move.
FAMILIES = {
    "Phi4MultimodalConfig": {
        "model.embed_tokens_extend.audio_embed.down_proj_for_speech": "projector",
        "model.embed_tokens_extend.audio_embed.up_proj_for_speech": "projector",
        "model.embed_tokens_extend.audio_embed.down_proj_for_vision_speech": "projector",
        "model.embed_tokens_extend.audio_embed.up_proj_for_vision_speech": "projector",
        "model.embed_tokens_extend.image_embed.img_projection_down": "projector",
        "model.embed_tokens_extend.image_embed.img_projection_up": "projector",
        "model.embed_tokens_extend.image_embed.img_processor.head.mlp.fc1": "vision",
        "model.embed_tokens_extend.audio_embed.encoder.embed.out": "audio",
        "model.layers.0.self_attn.qkv_proj": "language",
        "lm_head": "output",
    },
    "Kosmos2Config": {
        "image_to_text_projection.x_attn.q_proj": "projector",
        "image_to_text_projection.x_attn.k_proj": "projector",
        "image_to_text_projection.x_attn.v_proj": "projector",
        "image_to_text_projection.x_attn.out_proj": "projector",
        "image_to_text_projection.dense": "projector",
        "text_model.model.layers.0.self_attn.q_proj": "language",
        "vision_model.model.encoder.layers.0.self_attn.q_proj": "vision",
    },
    "Kosmos2_5Config": {
        "image_to_text_projection.x_attn.q_proj": "projector",
        "image_to_text_projection.x_attn.out_proj": "projector",
        "image_to_text_projection.dense": "projector",
        "vision_model.embeddings.patch_projection": "vision",
        "text_model.model.layers.0.self_attn.q_proj": "language",
    },
    "GitConfig": {
        "git.visual_projection.visual_projection.0": "projector",
        "git.encoder.layer.0.attention.self.query": "language",
        "git.image_encoder.vision_model.encoder.layers.0.self_attn.q_proj": "vision",
    },
    "FuyuConfig": {
        "model.vision_embed_tokens": "vision",
        "model.language_model.layers.0.self_attn.query_key_value": "language",
    },
    "DiffusionGemmaConfig": {
        "model.decoder.self_conditioning.down_proj": "language",
        "model.decoder.self_conditioning.gate_proj": "language",
        "model.decoder.layers.0.self_attn.q_proj": "language",
        "model.encoder.embed_vision.embedding_projection": "projector",
        "model.encoder.vision_tower.patch_embedder.input_proj": "vision",
    },
}


@pytest.mark.parametrize("config_name", sorted(FAMILIES))
def test_listed_modules_of_transformers_families(config_name):
    model = _tiny(config_name)
    towers = map_towers(model).towers
    missing = [p for p in FAMILIES[config_name] if p not in towers]
    assert not missing, f"paths changed in this transformers version: {missing}"
    got = {p: towers[p] for p in FAMILIES[config_name]}
    assert got == FAMILIES[config_name]


# --------------------------------------------------------------------------------------------------------------------
# Custom composite models, one per rule.
# --------------------------------------------------------------------------------------------------------------------
class LensConfig(PretrainedConfig):
    model_type = "lens"

    def __init__(self, width: int = 12, patch_size: int = 2, num_channels: int = 3, **kwargs):
        self.width, self.patch_size, self.num_channels = width, patch_size, num_channels
        super().__init__(**kwargs)


class InkConfig(PretrainedConfig):
    model_type = "ink_text"

    def __init__(self, hidden: int = 16, vocab: int = 40, **kwargs):
        self.hidden, self.vocab = hidden, vocab
        super().__init__(**kwargs)


class ScrollConfig(PretrainedConfig):
    model_type = "scroll"
    sub_configs = {"lens_config": LensConfig, "ink_config": InkConfig}

    def __init__(self, lens_config=None, ink_config=None, patch_size: int = 2, num_channels: int = 3, **kwargs):
        self.lens_config = lens_config if isinstance(lens_config, LensConfig) else LensConfig(**(lens_config or {}))
        self.ink_config = ink_config if isinstance(ink_config, InkConfig) else InkConfig(**(ink_config or {}))
        self.patch_size, self.num_channels = patch_size, num_channels
        super().__init__(**kwargs)


class Lens(nn.Module):
    """A vision encoder found by config identity."""

    def __init__(self, config: LensConfig):
        super().__init__()
        self.config = config
        self.block = nn.Linear(config.width, config.width)

    def forward(self, pixel_values):
        return self.block(pixel_values)


class InkBlock(nn.Module):
    """A text block built from the text config (carries it, like a decoder layer)."""

    def __init__(self, config: InkConfig):
        super().__init__()
        self.config = config
        self.q_proj = nn.Linear(config.hidden, config.hidden)

    def forward(self, hidden):
        return hidden + self.q_proj(hidden)


class _Base(PreTrainedModel):
    config_class = ScrollConfig

    def _init_weights(self, module):  # the default init reads config fields these toy configs do not have
        pass


class BridgeInDecoder(_Base):
    """Phi-4-multimodal's shape: ``get_decoder()`` returns a module that also holds the media embedding, whose
    encoder is a tower and whose projections (``img_projection``) map it into text space."""

    def __init__(self, config):
        super().__init__(config)
        inner = nn.Module()
        inner.layers = nn.ModuleList([InkBlock(config.ink_config)])
        inner.image_embed = nn.Module()
        inner.image_embed.encoder = Lens(config.lens_config)
        inner.image_embed.img_projection = nn.Linear(config.lens_config.width, config.ink_config.hidden)
        self.body = inner
        self.lm_head = nn.Linear(config.ink_config.hidden, config.ink_config.vocab)
        self.post_init()

    def get_decoder(self):
        return self.body

    def get_output_embeddings(self):
        return self.lm_head


class ResamplerWithTextAttention(_Base):
    """Kosmos-2's shape: a projector whose cross-attention block is built from the text config."""

    def __init__(self, config):
        super().__init__(config)
        self.eye = Lens(config.lens_config)
        self.text = nn.ModuleList([InkBlock(config.ink_config)])
        self.image_to_text_resampler = nn.Module()
        self.image_to_text_resampler.dense = nn.Linear(config.lens_config.width, config.ink_config.hidden)
        self.image_to_text_resampler.x_attn = InkBlock(config.ink_config)
        self.post_init()


class GlueNamedLikeMedia(_Base):
    """GIT's shape: the whole model is its own decoder, with a ``visual_projection`` beside the image encoder."""

    def __init__(self, config):
        super().__init__(config)
        body = nn.Module()
        body.image_encoder = Lens(config.lens_config)
        body.visual_projection = nn.Sequential(nn.Linear(config.lens_config.width, config.ink_config.hidden))
        body.layers = nn.ModuleList([InkBlock(config.ink_config)])
        self.body = body
        self.post_init()

    def get_decoder(self):
        return self.body


class RawPatchEmbedding(_Base):
    """Fuyu's shape: no vision encoder at all, a linear layer reads raw patches (3 x 2 x 2 = 12 values)."""

    def __init__(self, config):
        super().__init__(config)
        self.patch_to_text = nn.Linear(config.num_channels * config.patch_size**2, config.ink_config.hidden)
        self.text = nn.ModuleList([InkBlock(config.ink_config)])
        self.post_init()


class TextBlockBesideTextLayers(_Base):
    """DiffusionGemma's shape: a decoder container whose layers carry the text config and whose extra block
    (``self_conditioning``) carries none; next to it, a vision encoder."""

    def __init__(self, config):
        super().__init__(config)
        self.eye = Lens(config.lens_config)
        decoder = nn.Module()
        decoder.layers = nn.ModuleList([InkBlock(config.ink_config) for _ in range(2)])
        decoder.self_conditioning = nn.Sequential(nn.Linear(config.ink_config.hidden, config.ink_config.hidden))
        self.decoder = decoder
        self.image_glue = nn.Linear(config.lens_config.width, config.ink_config.hidden)
        self.post_init()


CUSTOM = {
    BridgeInDecoder: {
        "body.image_embed.encoder.block": "vision",
        "body.image_embed.img_projection": "projector",
        "body.layers.0.q_proj": "language",
        "lm_head": "output",
    },
    ResamplerWithTextAttention: {
        "image_to_text_resampler.x_attn.q_proj": "projector",
        "image_to_text_resampler.dense": "projector",
        "text.0.q_proj": "language",
        "eye.block": "vision",
    },
    GlueNamedLikeMedia: {
        "body.visual_projection.0": "projector",
        "body.layers.0.q_proj": "language",
        "body.image_encoder.block": "vision",
    },
    RawPatchEmbedding: {"patch_to_text": "vision", "text.0.q_proj": "language"},
    TextBlockBesideTextLayers: {
        "decoder.self_conditioning.0": "language",
        "decoder.layers.1.q_proj": "language",
        "eye.block": "vision",
        "image_glue": "projector",  # glue between towers outside both stays a projector
    },
}


@pytest.mark.parametrize("model_cls", list(CUSTOM), ids=lambda c: c.__name__)
def test_rule_on_a_custom_composite_model(model_cls):
    # Lens width 10: the raw patch width (3 x 2 x 2 = 12) is no tower's feature width.
    towers = map_towers(model_cls(ScrollConfig(lens_config={"width": 10}))).towers
    assert {p: towers[p] for p in CUSTOM[model_cls]} == CUSTOM[model_cls]


def test_patch_width_alone_does_not_move_a_linear():
    # A text linear whose input width happens to be channels x patch^2 stays in the text model; a media-named glue
    # linear whose input width is both the patch width and a tower's feature width stays a projector.
    towers = map_towers(RawPatchEmbedding(ScrollConfig(ink_config={"hidden": 12}))).towers
    assert towers["text.0.q_proj"] == "language"
    towers = map_towers(TextBlockBesideTextLayers(ScrollConfig(lens_config={"width": 12}))).towers
    assert towers["image_glue"] == "projector"


def test_omni_thinker_and_talker():
    # Qwen2.5-Omni: the thinker's encoders and decoder are towers, its own lm_head is the output head (the composite
    # exposes none), and the speech generators (talker, token2wav) are `other`.
    config = shrink_config(transformers.Qwen2_5OmniConfig())
    with torch.device("meta"):
        model = transformers.Qwen2_5OmniForConditionalGeneration._from_config(config)
    tmap = map_towers(model)
    assert tmap.output_name == "thinker.lm_head"
    assert tmap.towers["thinker.lm_head"] == "output"
    linears = tmap.linears
    by_prefix = {
        "thinker.model.audio_tower.layers.": "audio",
        "thinker.model.visual.blocks.": "vision",
        "thinker.model.language_model.layers.": "language",
        "talker.": "other",
        "token2wav.": "other",
    }
    for prefix, tower in by_prefix.items():
        towers = {info.tower for name, info in linears.items() if name.startswith(prefix)}
        assert towers == {tower}, (prefix, towers)
