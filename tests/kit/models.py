"""Tiny random models for every kit family, built from config alone (no hub access)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoModelForMultimodalLM,
    Gemma3Config,
    Gemma3nConfig,
    Gemma3nForConditionalGeneration,
    Gemma3nVisionConfig,
    LlavaConfig,
    MllamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2_5_VLConfig,
    Qwen2AudioConfig,
    Qwen2Config,
    Qwen3VLConfig,
)

from .tokenizer import FAMILIES, make_tokenizer

HIDDEN = 64
"""Hidden size of every tiny language model."""

HEADS = 4
KV_HEADS = 2
HEAD_DIM = HIDDEN // HEADS
INTERMEDIATE = 128
TEXT_LAYERS = 2
VISION_HIDDEN = 32
VISION_HEADS = 2
VISION_INTERMEDIATE = 64
VISION_DEPTH = 2

QWEN_PATCH = {"qwen2_5_vl": 14, "qwen3_vl": 16}
"""Vision patch size of the Qwen families (the image processor must agree)."""

GEMMA3_IMAGE_SIZE = 56
GEMMA3_PATCH = 14
GEMMA3_TOKENS_PER_IMAGE = 4
LLAVA_IMAGE_SIZE = 28
LLAVA_PATCH = 14
MLLAMA_IMAGE_SIZE = 28
MLLAMA_PATCH = 14
MLLAMA_MAX_TILES = 1
AUDIO_CHUNK_SECONDS = 1
"""Whisper feature-extractor window of the tiny Qwen2-Audio (the encoder's max_source_positions follows from it)."""

AUDIO_MEL_BINS = 128

ARCHITECTURES: dict[str, str] = {
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
    "gemma3": "Gemma3ForConditionalGeneration",
    "llava": "LlavaForConditionalGeneration",
    "qwen2_audio": "Qwen2AudioForConditionalGeneration",
    "mllama": "MllamaForConditionalGeneration",
    "causal_lm": "Qwen2ForCausalLM",
}
"""The model class each family builds (also written to ``config.architectures``)."""


TOWER_MODULES: dict[str, dict[str, tuple[str, ...]]] = {
    "qwen2_5_vl": {
        "vision": ("model.visual",),
        "projector": ("model.visual.merger",),
        "language": ("model.language_model",),
        "output": ("lm_head",),
    },
    "qwen3_vl": {
        "vision": ("model.visual",),
        "projector": ("model.visual.merger", "model.visual.deepstack_merger_list"),
        "language": ("model.language_model",),
        "output": ("lm_head",),
    },
    "gemma3": {
        "vision": ("model.vision_tower",),
        "projector": ("model.multi_modal_projector",),
        "language": ("model.language_model",),
        "output": ("lm_head",),
    },
    "llava": {
        "vision": ("model.vision_tower",),
        "projector": ("model.multi_modal_projector",),
        "language": ("model.language_model",),
        "output": ("lm_head",),
    },
    "qwen2_audio": {
        "audio": ("model.audio_tower",),
        "projector": ("model.multi_modal_projector",),
        "language": ("model.language_model",),
        "output": ("lm_head",),
    },
    "mllama": {
        "vision": ("model.vision_model",),
        "projector": ("model.multi_modal_projector",),
        "language": ("model.language_model",),
        "output": ("lm_head",),
    },
    "causal_lm": {"language": ("model",), "output": ("lm_head",)},
}
"""Top-level tower modules of each tiny model (a projector may sit inside the vision tower, as Qwen's merger)."""

NO_GRADIENT_BY_DESIGN: dict[str, tuple[str, ...]] = {
    "llava": ("model.vision_tower.encoder.layers.1", "model.vision_tower.post_layernorm"),
}
"""Modules that never get a gradient, as in the real model: LLaVA reads CLIP's second-to-last layer
(``vision_feature_layer=-2``), so the last encoder layer and the post layernorm are unused."""


def auto_model_class(family: str) -> type:
    """The ``AutoModelFor...`` class that loads a saved model of ``family``."""
    if family == "causal_lm":
        return AutoModelForCausalLM
    if family == "qwen2_audio":
        return AutoModelForMultimodalLM
    return AutoModelForImageTextToText


_NAMED_TOKENS = (
    "image_token",
    "video_token",
    "vision_start_token",
    "vision_end_token",
    "boi_token",
    "eoi_token",
    "audio_token",
    "audio_bos_token",
    "audio_eos_token",
)


def _token_ids(family: str) -> dict[str, int]:
    """Vocab size and ids of the family's special tokens, keyed by attribute name (``"image_token"`` -> id)."""
    tok = make_tokenizer(family)
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    ids = {"vocab_size": len(tok), "bos": bos, "eos": tok.eos_token_id, "pad": tok.pad_token_id}
    for name in _NAMED_TOKENS:
        if getattr(tok, name, None) is not None:
            ids[name] = tok.convert_tokens_to_ids(getattr(tok, name))
    return ids


def _text(ids: dict[str, int], **extra: Any) -> dict[str, Any]:
    """Shared tiny decoder settings."""
    return {
        "vocab_size": ids["vocab_size"],
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": TEXT_LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "max_position_embeddings": 512,
        "bos_token_id": ids["bos"],
        "eos_token_id": ids["eos"],
        "pad_token_id": ids["pad"],
        **extra,
    }


def _mrope() -> list[int]:
    """Multimodal rope sections (temporal, height, width); they must sum to head_dim / 2."""
    half = HEAD_DIM // 2
    return [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]


def _qwen2_5_vl(ids: dict[str, int]) -> PretrainedConfig:
    """Qwen2.5-VL: windowed ViT (last block full attention) with a patch merger, mrope decoder."""
    return Qwen2_5_VLConfig(
        text_config=_text(
            ids,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": _mrope()},
        ),
        vision_config={
            "depth": VISION_DEPTH,
            "hidden_size": VISION_HIDDEN,
            "intermediate_size": VISION_INTERMEDIATE,
            "num_heads": VISION_HEADS,
            "patch_size": QWEN_PATCH["qwen2_5_vl"],
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 56,
            "out_hidden_size": HIDDEN,
            "fullatt_block_indexes": [VISION_DEPTH - 1],
        },
        image_token_id=ids["image_token"],
        video_token_id=ids["video_token"],
        vision_start_token_id=ids["vision_start_token"],
        vision_end_token_id=ids["vision_end_token"],
        tie_word_embeddings=False,
    )


def _qwen3_vl(ids: dict[str, int]) -> PretrainedConfig:
    """Qwen3-VL: ViT with learned position embeddings and one deepstack layer, interleaved-mrope decoder."""
    return Qwen3VLConfig(
        text_config=_text(
            ids,
            head_dim=HEAD_DIM,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": _mrope(),
                "mrope_interleaved": True,
            },
        ),
        vision_config={
            "depth": VISION_DEPTH,
            "hidden_size": VISION_HIDDEN,
            "intermediate_size": VISION_INTERMEDIATE,
            "num_heads": VISION_HEADS,
            "patch_size": QWEN_PATCH["qwen3_vl"],
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "out_hidden_size": HIDDEN,
            "num_position_embeddings": 64,
            "deepstack_visual_indexes": [0],
        },
        image_token_id=ids["image_token"],
        video_token_id=ids["video_token"],
        vision_start_token_id=ids["vision_start_token"],
        vision_end_token_id=ids["vision_end_token"],
        tie_word_embeddings=False,
    )


def _gemma3(ids: dict[str, int]) -> PretrainedConfig:
    """Gemma3: SigLIP tower, pooled to 4 soft tokens per image; one sliding, one full attention layer."""
    return Gemma3Config(
        text_config=_text(
            ids,
            head_dim=HEAD_DIM,
            query_pre_attn_scalar=HEAD_DIM,
            sliding_window=64,
            layer_types=["sliding_attention", "full_attention"],
        ),
        vision_config={
            "hidden_size": VISION_HIDDEN,
            "intermediate_size": VISION_INTERMEDIATE,
            "num_hidden_layers": VISION_DEPTH,
            "num_attention_heads": VISION_HEADS,
            "image_size": GEMMA3_IMAGE_SIZE,
            "patch_size": GEMMA3_PATCH,
            "vision_use_head": False,
        },
        mm_tokens_per_image=GEMMA3_TOKENS_PER_IMAGE,
        boi_token_index=ids["boi_token"],
        eoi_token_index=ids["eoi_token"],
        image_token_index=ids["image_token"],
    )


def _llava(ids: dict[str, int]) -> PretrainedConfig:
    """LLaVA: CLIP tower read at its second-to-last layer, MLP projector, Llama decoder."""
    return LlavaConfig(
        text_config={"model_type": "llama", **_text(ids, head_dim=HEAD_DIM)},
        vision_config={
            "model_type": "clip_vision_model",
            "hidden_size": VISION_HIDDEN,
            "intermediate_size": VISION_INTERMEDIATE,
            "num_hidden_layers": VISION_DEPTH,
            "num_attention_heads": VISION_HEADS,
            "image_size": LLAVA_IMAGE_SIZE,
            "patch_size": LLAVA_PATCH,
            "projection_dim": VISION_HIDDEN,
        },
        image_token_index=ids["image_token"],
        image_seq_length=(LLAVA_IMAGE_SIZE // LLAVA_PATCH) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        tie_word_embeddings=False,
    )


def _qwen2_audio(ids: dict[str, int]) -> PretrainedConfig:
    """Qwen2-Audio: Whisper-style encoder over a 1 s window, linear projector, Qwen2 decoder."""
    return Qwen2AudioConfig(
        audio_config={
            "num_mel_bins": AUDIO_MEL_BINS,
            "encoder_layers": VISION_DEPTH,
            "encoder_attention_heads": VISION_HEADS,
            "encoder_ffn_dim": VISION_INTERMEDIATE,
            "d_model": VISION_HIDDEN,
            # 100 mel frames per second, halved by the encoder's strided conv
            "max_source_positions": AUDIO_CHUNK_SECONDS * 50,
        },
        text_config={"model_type": "qwen2", **_text(ids)},
        audio_token_index=ids["audio_token"],
    )


def _mllama(ids: dict[str, int]) -> PretrainedConfig:
    """Mllama: tiled ViT with one global layer; decoder with a cross-attention layer at index 1 of 3."""
    layers = [0]
    return MllamaConfig(
        vision_config={
            "hidden_size": VISION_HIDDEN,
            "intermediate_size": VISION_INTERMEDIATE,
            "num_hidden_layers": VISION_DEPTH,
            "num_global_layers": 1,
            "attention_heads": VISION_HEADS,
            "image_size": MLLAMA_IMAGE_SIZE,
            "patch_size": MLLAMA_PATCH,
            "max_num_tiles": MLLAMA_MAX_TILES,
            "supported_aspect_ratios": [[1, 1]],
            "intermediate_layers_indices": layers,
            "vision_output_dim": VISION_HIDDEN * (len(layers) + 1),
        },
        text_config=_text(ids, num_hidden_layers=3, cross_attention_layers=[1]),
        image_token_index=ids["image_token"],
    )


def _causal_lm(ids: dict[str, int]) -> PretrainedConfig:
    """Plain Qwen2 causal LM."""
    return Qwen2Config(**_text(ids), tie_word_embeddings=False)


_BUILDERS = {
    "qwen2_5_vl": _qwen2_5_vl,
    "qwen3_vl": _qwen3_vl,
    "gemma3": _gemma3,
    "llava": _llava,
    "qwen2_audio": _qwen2_audio,
    "mllama": _mllama,
    "causal_lm": _causal_lm,
}


def tiny_config(family: str) -> PretrainedConfig:
    """A tiny config for ``family`` whose special token ids and vocab match :func:`make_tokenizer`."""
    if family not in FAMILIES:
        raise ValueError(f"Unknown family {family!r}; expected one of {FAMILIES}")
    config = _BUILDERS[family](_token_ids(family))
    config.architectures = [ARCHITECTURES[family]]
    return config


ZERO_INIT_CONNECTIONS: dict[str, dict[str, float | None]] = {
    "gemma3": {"mm_input_projection_weight": None},
    "mllama": {"cross_attn_attn_gate": 0.5, "cross_attn_mlp_gate": 0.5, "gate": 0.5},
}
"""Parameters (by attribute name) that transformers initialises to zero and that block every gradient to a tower
until trained: Gemma3's image projection (image embeddings are all zero) and Mllama's tanh cross-attention / tile
position gates. Value: the constant to fill in, or ``None`` for ``normal(0, 0.02)``."""


def _open_connections(model: PreTrainedModel, family: str) -> None:
    """Give zero-initialised tower connections pretrained-like non-zero values (see :data:`ZERO_INIT_CONNECTIONS`)."""
    fills = ZERO_INIT_CONNECTIONS.get(family, {})
    with torch.no_grad():
        for name, param in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf not in fills:
                continue
            value = fills[leaf]
            if value is None:
                param.normal_(mean=0.0, std=0.02)
            else:
                param.fill_(value)


def tiny_model(family: str, seed: int = 0, open_connections: bool = True) -> PreTrainedModel:
    """A tiny randomly initialised model of ``family`` in float32, in eval mode; the same seed gives the same weights.

    With ``open_connections`` (default), the zero-initialised parameters in :data:`ZERO_INIT_CONNECTIONS` get
    non-zero values, as in a pretrained checkpoint, so gradients reach every tower from the first step.
    """
    config = tiny_config(family)
    torch.manual_seed(seed)
    model = auto_model_class(family).from_config(config, dtype=torch.float32)
    if open_connections:
        _open_connections(model, family)
    return model.eval()


# --------------------------------------------------------------------------------------------------------------------
# Gemma 3n (text, audio and a stand-in vision tower)
# --------------------------------------------------------------------------------------------------------------------

GEMMA3N_LAYERS = 4
GEMMA3N_KV_SHARED_LAYERS = 2
"""The last two of the four decoder layers reuse the keys/values of earlier layers (their k/v projections never run)."""

GEMMA3N_MM_VOCAB = 8
"""Hard-token vocabulary of each of Gemma 3n's vision and audio embedders."""


class Gemma3nVisionStandIn(PreTrainedModel):
    """A pure-torch stand-in for Gemma 3n's MobileNetV5 vision tower, which transformers builds through timm.

    timm depends on torchvision, which is not installable beside the CPU torch wheel of these machines. Registered for
    ``Gemma3nVisionConfig`` by :func:`tiny_gemma3n` (``AutoModel.register``), it returns what ``Gemma3nModel`` reads
    from the tower: ``last_hidden_state`` of shape ``(batch, hidden_size, h, w)``. Text-only data never calls it.
    """

    config_class = Gemma3nVisionConfig
    main_input_name = "pixel_values"

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        patch = 14
        self.patch_embed = torch.nn.Conv2d(3, config.hidden_size, kernel_size=patch, stride=patch)
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(config.hidden_size, 2 * config.hidden_size),
            torch.nn.GELU(),
            torch.nn.Linear(2 * config.hidden_size, config.hidden_size),
        )
        self.post_init()

    def forward(self, pixel_values: torch.Tensor, do_pooling: bool = False, **kwargs: Any) -> Any:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        features = self.patch_embed(pixel_values).flatten(2).transpose(1, 2)  # (batch, patches, hidden)
        features = features + self.mlp(features)
        side = int(features.shape[1] ** 0.5)
        hidden = features.transpose(1, 2).reshape(features.shape[0], -1, side, side)
        return BaseModelOutputWithPooling(last_hidden_state=hidden)


def tiny_gemma3n_config() -> PretrainedConfig:
    """A tiny ``Gemma3nConfig`` with every Gemma 3n text-tower feature (AltUp, LAuReL, per-layer inputs, KV sharing,
    activation sparsity) on the ``causal_lm`` kit tokenizer; hard vision/audio token ids sit just past its vocabulary,
    as in the real model."""
    ids = _token_ids("causal_lm")
    text_vocab = ids["vocab_size"]
    vision_offset, audio_offset = text_vocab, text_vocab + GEMMA3N_MM_VOCAB
    config = Gemma3nConfig(
        text_config={
            **_text(ids, num_hidden_layers=GEMMA3N_LAYERS, head_dim=HEAD_DIM),
            "vocab_size": audio_offset + GEMMA3N_MM_VOCAB,
            "vocab_size_per_layer_input": text_vocab,
            "hidden_size_per_layer_input": 16,
            "laurel_rank": 8,
            "altup_num_inputs": 4,
            "num_kv_shared_layers": GEMMA3N_KV_SHARED_LAYERS,
            "sliding_window": 64,
            "layer_types": ["sliding_attention", "full_attention"] * (GEMMA3N_LAYERS // 2),
            "activation_sparsity_pattern": [0.95, 0.0] + [0.0] * (GEMMA3N_LAYERS - 2),
        },
        vision_config={
            "hidden_size": VISION_HIDDEN,
            "vocab_size": GEMMA3N_MM_VOCAB,
            "vocab_offset": vision_offset,
            "architecture": "tiny-stand-in",
            "model_args": {},
        },
        audio_config={
            "vocab_size": GEMMA3N_MM_VOCAB,
            "vocab_offset": audio_offset,
            "input_feat_size": 16,
            "hidden_size": VISION_HIDDEN,
            "conf_num_attention_heads": VISION_HEADS,
            "conf_num_hidden_layers": 1,
            "sscp_conv_channel_size": [8, 4],
            "conf_attention_chunk_size": 4,
            "conf_attention_context_left": 5,
        },
        vision_soft_tokens_per_image=4,
        audio_soft_tokens_per_image=4,
        boi_token_id=vision_offset,
        image_token_id=vision_offset + 1,
        eoi_token_id=vision_offset + 2,
        boa_token_id=audio_offset,
        audio_token_id=audio_offset + 1,
        eoa_token_id=audio_offset + 2,
        tie_word_embeddings=True,
    )
    config.architectures = ["Gemma3nForConditionalGeneration"]
    return config


def tiny_gemma3n(seed: int = 0) -> PreTrainedModel:
    """A tiny randomly initialised ``Gemma3nForConditionalGeneration`` (float32, eval mode), transformers' own text and
    audio towers and :class:`Gemma3nVisionStandIn` for the timm vision tower. Use with ``make_tokenizer("causal_lm")``.

    Its weights are transformers' initialisation, including the zero ``altup.correct_output_scale`` that makes the
    input of every layer's ``per_layer_input_gate`` (and so of ``per_layer_projection``) exactly zero until trained.
    """
    from transformers import AutoModel

    AutoModel.register(Gemma3nVisionConfig, Gemma3nVisionStandIn, exist_ok=True)
    config = tiny_gemma3n_config()
    torch.manual_seed(seed)
    model = Gemma3nForConditionalGeneration._from_config(config, dtype=torch.float32)
    return model.eval()
