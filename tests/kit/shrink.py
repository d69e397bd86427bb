"""Tiny configs for any transformers architecture, by shrinking the sizes of its default config class.

transformers' own model testers are not installed with the wheel, so the zoo and the tower-rule tests build a model
from ``ConfigClass()`` with every size field (layers, widths, heads, experts) cut down, recursively through the
sub-configs. Token ids and vocabularies are kept (placeholder ids must stay inside the vocabulary); per-layer lists
(``layer_types``) are cut to the new depth; Qwen-style multimodal rope sections are rescaled to the new head size.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

LAYERS = 2
HIDDEN = 32
INTERMEDIATE = 64
HEADS = 4
KV_HEADS = 2
HEAD_DIM = HIDDEN // HEADS
EXPERTS = 4
EXPERTS_PER_TOKEN = 2

_LAYER_KEYS = (
    "num_hidden_layers",
    "num_layers",
    "layers",
    "encoder_layers",
    "decoder_layers",
    "depth",
    "num_blocks",
    "n_layer",
    "n_layers",
    "num_encoder_layers",
    "num_decoder_layers",
    "text_layers",
    "vision_layers",
)
_HIDDEN_KEYS = ("hidden_size", "embed_dim", "d_model", "n_embd", "hidden_dim", "dim", "width")
_INTERMEDIATE_KEYS = (
    "intermediate_size",
    "ffn_dim",
    "encoder_ffn_dim",
    "decoder_ffn_dim",
    "mlp_dim",
    "n_inner",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
)
_HEAD_KEYS = (
    "num_attention_heads",
    "attention_heads",
    "encoder_attention_heads",
    "decoder_attention_heads",
    "num_heads",
    "n_head",
    "n_heads",
)
_KV_KEYS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads")
_EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
_EXPERT_TOPK_KEYS = ("num_experts_per_tok", "num_experts_per_token", "top_k", "moe_topk", "top_k_experts")
_WIDTH_WORDS = ("hidden_size", "channels", "out_channel", "proj_dim", "projection_dim")


def _get(config: PretrainedConfig, key: str) -> Any:
    try:
        return getattr(config, key, None)
    except Exception:  # per-layer attributes of heterogeneous configs refuse a global read
        return None


def _cap(config: PretrainedConfig, key: str, value: int) -> None:
    current = _get(config, key)
    if isinstance(current, int) and not isinstance(current, bool) and current > value:
        setattr(config, key, value)


def shrink_config(
    config: PretrainedConfig, overrides: dict[str, Any] | None = None, _depth: int = 0
) -> PretrainedConfig:
    """Shrink ``config`` in place (and its sub-configs, recursively) to a CPU-sized model; returns it.

    Args:
        config: A config instance (usually ``ConfigClass()`` with its defaults).
        overrides: ``{attribute: value}`` set on the top-level config afterwards (``"sub.attr"`` for a sub-config).
    """
    for key in _LAYER_KEYS:
        _cap(config, key, LAYERS)
    for key in _HIDDEN_KEYS:
        _cap(config, key, HIDDEN)
    for key in _INTERMEDIATE_KEYS:
        _cap(config, key, INTERMEDIATE)
    for key in _HEAD_KEYS:
        _cap(config, key, HEADS)
    for key in _KV_KEYS:
        _cap(config, key, KV_HEADS)
    if "moe_intermediate_size" in vars(config) and any(
        k in vars(config) and vars(config)[k] is None for k in _EXPERT_KEYS
    ):
        # MoE fields left unset by a default config whose layers are built with experts anyway: fill them in.
        config.moe_intermediate_size = INTERMEDIATE
        for key in _EXPERT_KEYS + _EXPERT_TOPK_KEYS:
            if key in vars(config) and vars(config)[key] is None:
                setattr(config, key, EXPERTS if key in _EXPERT_KEYS else EXPERTS_PER_TOKEN)
    for key in _EXPERT_KEYS:
        _cap(config, key, EXPERTS)
    for key in _EXPERT_TOPK_KEYS:
        _cap(config, key, EXPERTS_PER_TOKEN)
    if isinstance(_get(config, "head_dim"), int):
        config.head_dim = HEAD_DIM
    for key, value in list(vars(config).items()):
        sized = isinstance(value, int) and not isinstance(value, bool) and key not in _HIDDEN_KEYS
        if sized and any(w in key for w in _WIDTH_WORDS) and key != "num_channels" and "token" not in key:
            _cap(config, key, HIDDEN)
    _cut_per_layer_lists(config)
    _rescale_rope_sections(config)
    for key in list(getattr(config, "sub_configs", {}) or {}):
        sub = getattr(config, key, None)
        if isinstance(sub, PretrainedConfig) and _depth < 4:
            shrink_config(sub, _depth=_depth + 1)
    for key, value in (overrides or {}).items():
        target = config
        *path, leaf = key.split(".")
        for part in path:
            target = getattr(target, part)
        setattr(target, leaf, value)
    return config


def _layer_count(config: PretrainedConfig) -> int | None:
    for key in _LAYER_KEYS:
        value = _get(config, key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _cut_per_layer_lists(config: PretrainedConfig) -> None:
    n = _layer_count(config)
    if n is None:
        return
    for key in ("layer_types", "mlp_layer_types", "block_types", "layers_block_type"):
        value = _get(config, key)
        if isinstance(value, list) and len(value) > n:
            setattr(config, key, value[:n])
    for key in ("cross_attention_layers", "full_attn_idxs", "deepstack_visual_indexes", "intermediate_layers_indices"):
        value = _get(config, key)
        if isinstance(value, list) and value:
            kept = [i for i in value if isinstance(i, int) and i < n]
            setattr(config, key, kept or [n - 1])


def _rescale_rope_sections(config: PretrainedConfig) -> None:
    """Multimodal rope sections (``mrope_section``) must sum to half the head size."""
    head_dim = _get(config, "head_dim")
    hidden, heads = _get(config, "hidden_size"), _get(config, "num_attention_heads")
    if not isinstance(head_dim, int) and isinstance(hidden, int) and isinstance(heads, int) and heads:
        head_dim = hidden // heads
    if not isinstance(head_dim, int):
        return
    for attr in ("rope_parameters", "rope_scaling"):
        params = _get(config, attr)
        if not isinstance(params, dict):
            continue
        if (
            "mrope_section" in getattr(type(config), "ignore_keys_at_rope_validation", ())
            and "mrope_section" not in params
        ):
            params["mrope_section"] = [0, 0, 0]  # the model's default ([16, 24, 24]) fits only the full head size
        for key in ("mrope_section", "mrope_sections"):
            section = params.get(key)
            if isinstance(section, list) and section:
                half = head_dim // 2
                k = len(section)
                new = [half // k] * k
                new[0] += half - sum(new)
                params[key] = new
