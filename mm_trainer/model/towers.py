"""Tower map: assign every module of a (multimodal) model to the tower it belongs to.

A tower is one of [`TOWERS`]. The map is built from structure, not from a per-family table:

1. **Config identity.** A composite config lists its parts in `config.sub_configs` (`text_config`,
   `vision_config`, `audio_config`, ...). The submodule built from one of those sub-configs carries it as its
   `.config`; that submodule is the root of the matching tower.
2. **Forward signature.** A submodule whose `forward` takes pixel (`pixel_values`) or audio (`input_features`)
   inputs but no token ids is a vision or audio tower.
3. **The model's own accessors.** `get_decoder()` gives the language tower, `get_output_embeddings()` the output
   head.
4. **Names**, last: attribute names such as `vision_tower`, `visual`, `audio_tower`, `multi_modal_projector`.

Inside a vision or audio tower, a child named like a merger/projector (Qwen's `visual.merger`) belongs to the
`projector` tower: it maps features into the language model's space.
"""

from __future__ import annotations

import inspect
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from torch import nn

from .figures import param_count
from .layers import is_linear, is_quantized_linear, is_tuner_layer, linear_params, linear_shape
from .peft_names import strip_peft_prefix

TOWERS: tuple[str, ...] = ("language", "vision", "audio", "projector", "output", "other")
"""Every tower name a module can be assigned to."""

NON_TEXT_TOWERS: tuple[str, ...] = ("vision", "audio")

_VISION_WORDS = ("vision", "visual", "image", "vit", "siglip", "clip", "pixel", "patch")
_AUDIO_WORDS = ("audio", "speech", "whisper", "sound", "acoustic", "wav")
_LANGUAGE_WORDS = ("language_model", "text_model", "text_decoder", "llm", "decoder", "lm_model", "thinker")
_PROJECTOR_WORDS = (
    "projector",
    "projection",
    "merger",
    "connector",
    "aligner",
    "resampler",
    "mm_proj",
    "multi_modal",
    "adapter",
)
_BRIDGE_WORDS = ("embed", "proj")
"""With a modality word (`embed_vision`, `image_embed`, `visual_projection`): a modality-to-text bridge."""

_GENERATOR_WORDS = ("talker", "2wav", "vocoder", "codec")
"""Speech *output* generators of Omni models (talker, token2wav / code2wav): not input towers, mapped `other`."""

_VISION_INPUTS = ("pixel_values", "pixel_values_videos", "pixel_values_images", "images", "image", "video")
_AUDIO_INPUTS = ("input_features", "audio_values", "input_audio_features", "audio_features", "input_values")
_TOKEN_INPUTS = ("input_ids", "inputs_embeds")


@dataclass(frozen=True)
class LinearInfo:
    """One linear layer of the model."""

    name: str
    tower: str
    in_features: int
    out_features: int
    params: int
    quantized: bool = False

    def lora_params(self, rank: int) -> int:
        """Parameters a rank-`rank` LoRA adapter on this layer adds (A: r x in, B: out x r)."""
        return rank * (self.in_features + self.out_features)


@dataclass
class TowerMap:
    """Module path -> tower, for every module of one model.

    Attributes:
        towers: Every module path (as in `model.named_modules()`) mapped to its tower.
        roots: The submodule paths that root a tower, with the evidence that decided it.
        linears: Every linear layer, by path.
        output_name: Path of the output head (`lm_head`), if any.
        input_embedding_name: Path of the input token embedding, if any.
        composite: Whether the model has more than one tower (a VLM / audio LM) or is a plain LM.
        base_params: Parameters of the base model per tower, counted when the map was built (see
            [`~mm_trainer.model.figures`]: the one definition of "base params").
    """

    towers: dict[str, str]
    roots: dict[str, tuple[str, str]] = field(default_factory=dict)
    linears: dict[str, LinearInfo] = field(default_factory=dict)
    output_name: str | None = None
    input_embedding_name: str | None = None
    composite: bool = False
    base_params: dict[str, int] = field(default_factory=dict)

    def tower_of(self, name: str) -> str:
        """Tower of a module path. Paths of a PEFT-wrapped model (`base_model.model.`) are accepted too."""
        name = strip_peft_prefix(name)
        if name in self.towers:
            return self.towers[name]
        # A child the map never saw (e.g. a PEFT lora_A inside a mapped layer): walk up to a known ancestor.
        parts = name.split(".")
        while parts:
            parts.pop()
            parent = ".".join(parts)
            if parent in self.towers:
                return self.towers[parent]
        return "other"

    def linear_names(self, tower: str | None = None) -> list[str]:
        """Paths of the linear layers, optionally of one tower only, in model order."""
        return [n for n, info in self.linears.items() if tower is None or info.tower == tower]

    def present_towers(self) -> list[str]:
        """Towers that hold at least one module, in [`TOWERS`] order."""
        seen = set(self.towers.values())
        return [t for t in TOWERS if t in seen]

    def linear_counts(self) -> dict[str, int]:
        """Number of linear layers per tower."""
        return dict(Counter(info.tower for info in self.linears.values()))

    def to_dict(self) -> dict:
        """JSON-ready summary: tower roots with their evidence and linear counts."""
        return {
            "composite": self.composite,
            "roots": {path: {"tower": tower, "evidence": why} for path, (tower, why) in self.roots.items()},
            "output": self.output_name,
            "input_embedding": self.input_embedding_name,
            "linear_counts": self.linear_counts(),
            "base_params": dict(self.base_params),
        }


_OUTPUT_HEAD_NAMES = ("lm_head", "embed_out", "output_layer")


def tower_from_name(path: str) -> str:
    """Tower of a module path from its names alone, for when no model is at hand (e.g. a saved adapter's keys).

    Uses the same word lists as [`map_towers`]' last resort: the first path segment that names a vision or audio
    tower decides (`visual`, `vision_tower`, `audio_tower`), and its child named like a merger/projector
    (`visual.merger`) makes a `projector`, as in the structural map. Otherwise a segment named like a projector
    gives `projector`, an output head name (`lm_head`) gives `output`, and everything else is `language`.

    Args:
        path: A module path, as in the base model or with PEFT's `base_model.model.` prefix.
    """
    parts = strip_peft_prefix(path).split(".")
    for i, part in enumerate(parts):
        if _has_word(part, _AUDIO_WORDS):
            tower = "audio"
        elif _has_word(part, _VISION_WORDS):
            tower = "vision"
        else:
            continue
        rest = parts[i + 1 :]
        return "projector" if rest and _has_word(rest[0], _PROJECTOR_WORDS) else tower
    if any(_has_word(part, _PROJECTOR_WORDS) for part in parts):
        return "projector"
    if parts[0] in _OUTPUT_HEAD_NAMES or parts[-1] in _OUTPUT_HEAD_NAMES:
        return "output"
    return "language"


def _words(name: str) -> str:
    return name.lower()


def _has_word(name: str, words: Iterable[str]) -> bool:
    low = _words(name)
    return any(w in low for w in words)


def _modality_of_config_key(key: str, sub_config: object) -> str | None:
    """Tower named by a sub-config: from its key (`vision_config`) or, failing that, its class / model type."""
    for text in (key, type(sub_config).__name__, str(getattr(sub_config, "model_type", ""))):
        if _has_word(text, _AUDIO_WORDS):
            return "audio"
        if _has_word(text, _VISION_WORDS):
            return "vision"
        if _has_word(text, ("text", "language", "llm", "decoder")):
            return "language"
    return None


def _sub_configs(config: object, depth: int = 0) -> Iterator[tuple[str, object]]:
    """`(key, sub_config)` for every sub-config of a composite config, recursively (Omni-style nesting)."""
    if config is None or depth > 3:
        return
    keys = list(getattr(config, "sub_configs", {}) or {})
    for key in keys:
        sub = getattr(config, key, None)
        if sub is None:
            continue
        yield key, sub
        yield from _sub_configs(sub, depth + 1)


def _forward_params(module: nn.Module) -> set[str]:
    try:
        return set(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return set()


def _signature_tower(module: nn.Module) -> str | None:
    params = _forward_params(module)
    if params & set(_TOKEN_INPUTS):
        return None
    if params & set(_VISION_INPUTS):
        return "vision"
    if params & set(_AUDIO_INPUTS):
        return "audio"
    return None


def _path_of(model: nn.Module, target: nn.Module | None) -> str | None:
    if target is None:
        return None
    for name, module in model.named_modules():
        if module is target:
            return name
    return None


def _safe_call(fn_name: str, model: nn.Module) -> nn.Module | None:
    fn = getattr(model, fn_name, None)
    if fn is None:
        return None
    try:
        out = fn()
    except Exception:  # accessors of exotic models may raise NotImplementedError and the like
        return None
    return out if isinstance(out, nn.Module) else None


def _find_roots(model: nn.Module) -> dict[str, tuple[str, str]]:
    """Tower roots `path -> (tower, evidence)`, found by config identity, signature, accessors and names."""
    config = getattr(model, "config", None)
    sub_configs = list(_sub_configs(config))
    by_identity = {id(sub): (key, sub) for key, sub in sub_configs}
    roots: dict[str, tuple[str, str]] = {}

    def covered(path: str) -> bool:
        return any(path == r or path.startswith(r + ".") for r in roots)

    # 1. Config identity (exact object), then config class (a submodule may hold a copy of its sub-config).
    sub_classes = Counter(type(sub) for _, sub in sub_configs)
    for path, module in model.named_modules():
        if not path or covered(path):
            continue
        mod_cfg = getattr(module, "config", None)
        if mod_cfg is None or mod_cfg is config:
            continue
        hit = by_identity.get(id(mod_cfg))
        evidence = "config identity"
        if hit is None and sub_classes.get(type(mod_cfg)) == 1:
            hit = next((key, sub) for key, sub in sub_configs if type(sub) is type(mod_cfg))
            evidence = "config class"
        if hit is None:
            continue
        key, sub = hit
        if _has_word(key, _GENERATOR_WORDS) or _has_word(path.rsplit(".", 1)[-1], _GENERATOR_WORDS):
            roots[path] = ("other", f"{evidence}: config.{key} (speech output generator)")
            continue
        tower = _modality_of_config_key(key, sub)
        if tower is None or (getattr(sub, "sub_configs", None) and tower == "language" and "text" not in key):
            continue  # a nested composite (e.g. an Omni "thinker"): its own parts are found below
        roots[path] = (tower, f"{evidence}: config.{key}")

    # 2. Forward signature: takes pixels / audio features but no token ids.
    for path, module in model.named_modules():
        if not path or covered(path) or is_linear(module):
            continue
        if _has_word(path.rsplit(".", 1)[-1], _PROJECTOR_WORDS):
            continue  # a projector takes the features of a tower, it is not one (e.g. Qwen2-Audio's)
        tower = _signature_tower(module)
        if tower is not None and len(list(module.children())) > 0:
            roots[path] = (tower, "forward signature")

    # 3. The language tower from the model's accessor.
    if not any(t == "language" for t, _ in roots.values()):
        decoder = _safe_call("get_decoder", model)
        dec_path = _path_of(model, decoder)
        if dec_path and not covered(dec_path):
            roots[dec_path] = ("language", "get_decoder()")

    # 3b. Patch embeddings outside every tower: a linear layer named for pixels / patches / vision that reads raw
    #     patches (in_features equal to channels x patch x patch of a config with a patch size) is the vision tower
    #     (Fuyu's `vision_embed_tokens`).
    patch_widths = _patch_widths(config, sub_configs)
    # A width that is also a media tower's feature width says nothing (SigLIP: 3 x 16 x 16 = 768 = hidden_size).
    feature_widths = {
        getattr(sub, key)
        for k, sub in sub_configs
        if _modality_of_config_key(k, sub) != "language"
        for key in ("hidden_size", "width", "embed_dim", "d_model")
        if isinstance(getattr(sub, key, None), int)
    }
    for path, module in model.named_modules():
        leaf = path.rsplit(".", 1)[-1]
        if not path or covered(path) or not is_linear(module) or not _has_word(leaf, _VISION_WORDS):
            continue
        if any(_has_word(part, _PROJECTOR_WORDS) for part in path.split(".")):
            continue  # a projector (or inside one): it reads tower features, not patches
        if linear_shape(module)[0] in patch_widths - feature_widths:
            roots[path] = ("vision", f"patch embedding: in_features {linear_shape(module)[0]} = channels x patch^2")

    # 4. Names. Outside every root; and inside a language root that only an accessor found (`get_decoder()`
    #    returns the whole composite model on Phi-4-multimodal and GIT), for media / projector names only.
    containers = [p for p, (t, why) in roots.items() if t == "language" and why == "get_decoder()"]
    for path, module in model.named_modules():
        if not path or is_linear(module):
            continue
        in_container = any(path.startswith(c + ".") for c in containers)
        if covered(path) and not (in_container and not _covered_by_other_than(path, roots, containers)):
            continue
        leaf = path.rsplit(".", 1)[-1]
        if _has_word(leaf, _GENERATOR_WORDS):
            roots[path] = ("other", "name: speech output generator")
            continue
        media = "audio" if _has_word(leaf, _AUDIO_WORDS) else "vision" if _has_word(leaf, _VISION_WORDS) else None
        if _has_word(leaf, _PROJECTOR_WORDS) or (media and _has_word(leaf, _BRIDGE_WORDS)):
            # A projector, or a modality-to-text bridge (`embed_vision`, `image_embed`, `visual_projection`):
            # what maps a tower's features into the language model's space. A tower built inside it (Phi-4's
            # `image_embed.img_processor`) is a deeper root and keeps its own tower.
            roots[path] = ("projector", "name")
        elif media is not None:
            roots[path] = (media, "name")
        elif not in_container and leaf in _LANGUAGE_WORDS and not any(t == "language" for t, _ in roots.values()):
            roots[path] = ("language", "name")

    # A language-configured block inside a projector is the projector's own (Kosmos-2's resampler cross-attention
    # `image_to_text_projection.x_attn` is built from the text config but only ever reads image features).
    projectors = [p for p, (t, _) in roots.items() if t == "projector"]
    for path in [p for p, (t, _) in roots.items() if t == "language"]:
        if any(path.startswith(p + ".") for p in projectors):
            del roots[path]
    return roots


def _covered_by_other_than(path: str, roots: dict[str, tuple[str, str]], containers: list[str]) -> bool:
    return any((path == r or path.startswith(r + ".")) for r in roots if r not in containers)


def _patch_widths(config: object, sub_configs: list[tuple[str, object]]) -> set[int]:
    """`channels x patch x patch` of every config (top level or sub-config) that has a patch size."""
    widths: set[int] = set()
    for cfg in [config, *(sub for _, sub in sub_configs)]:
        patch = getattr(cfg, "patch_size", None)
        if isinstance(patch, (list, tuple)) and len(patch) == 2:
            area = int(patch[0]) * int(patch[1])
        elif isinstance(patch, int) and not isinstance(patch, bool):
            area = patch * patch
        else:
            continue
        channels = getattr(cfg, "num_channels", 3)
        if isinstance(channels, int) and area > 1:
            widths.add(channels * area)
    return widths


def map_towers(model: nn.Module) -> TowerMap:
    """Assign every module of `model` to a tower.

    Works on real, meta-device and quantized models, and on `PeftModel` wrappers (paths are reported as in the
    base model). A model with no vision/audio tower maps entirely to `language` except its output head.

    Args:
        model: A transformers `PreTrainedModel` (or any `nn.Module` built like one).

    Returns:
        The [`TowerMap`].
    """
    model = _unwrap_peft(model)
    output_path = _path_of(model, _safe_call("get_output_embeddings", model))
    input_path = _path_of(model, _safe_call("get_input_embeddings", model))
    roots = _find_roots(model)
    if output_path is None:
        output_path = _nested_output_head(model, roots)
    composite = any(t in NON_TEXT_TOWERS for t, _ in roots.values())
    if not composite:
        # A plain LM: a "vision"- or "projector"-looking name is a coincidence; only the language root counts.
        roots = {p: v for p, v in roots.items() if v[0] == "language"}

    ordered_roots = sorted(roots, key=len, reverse=True)  # deepest first
    top_config = getattr(model, "config", None)
    sub_models = [p for p, m in model.named_modules() if p and getattr(m, "config", None) not in (None, top_config)]
    towers = {
        path: _tower_for(path, ordered_roots, roots, output_path, composite, sub_models)
        for path, _ in model.named_modules()
    }
    linears: dict[str, LinearInfo] = {}
    base_params: dict[str, int] = {}
    counted: set[int] = set()  # tied parameters count once

    def count(owner: nn.Module, tower: str, recurse: bool) -> None:
        for param in owner.parameters(recurse=recurse):
            if id(param) not in counted:
                counted.add(id(param))
                base_params[tower] = base_params.get(tower, 0) + param_count(param)

    inside_tuner: str | None = None  # named_modules() is pre-order: a PEFT layer's children follow it directly
    for path, module in model.named_modules():
        if inside_tuner is not None and path.startswith(inside_tuner):
            continue  # the base layer and lora_A / lora_B inside a PEFT layer
        inside_tuner = None
        if is_tuner_layer(module):
            inside_tuner = path + "."
            module = getattr(module, "base_layer", None)
            if module is not None:
                count(module, towers[path], recurse=True)  # the base layer's weights; adapters are not base params
            if module is None or not is_linear(module):
                continue
        else:
            count(module, towers[path], recurse=False)
        if is_linear(module):
            fan_in, fan_out = linear_shape(module)
            linears[path] = LinearInfo(
                name=path,
                tower=towers[path],
                in_features=fan_in,
                out_features=fan_out,
                params=linear_params(module),
                quantized=is_quantized_linear(module),
            )
    return TowerMap(
        towers=towers,
        roots=roots,
        linears=linears,
        output_name=output_path,
        input_embedding_name=input_path,
        composite=composite,
        base_params={t: base_params[t] for t in TOWERS if t in base_params},
    )


def _nested_output_head(model: nn.Module, roots: dict[str, tuple[str, str]]) -> str | None:
    """Output head of the sub-model that holds the language tower, when the top model exposes none (the Omni
    "thinker" has its own `lm_head`; the composite's `get_output_embeddings()` returns nothing)."""
    for root in sorted((p for p, (t, _) in roots.items() if t == "language"), key=len):
        parts = root.split(".")
        while parts:
            parts.pop()
            holder = model.get_submodule(".".join(parts)) if parts else model
            path = _path_of(model, _safe_call("get_output_embeddings", holder))
            if path:
                return path
    return None


def _tower_for(
    path: str,
    ordered_roots: list[str],
    roots: dict[str, tuple[str, str]],
    output_path: str | None,
    composite: bool,
    sub_models: list[str],
) -> str:
    if output_path is not None and (path == output_path or path.startswith(output_path + ".")):
        return "output"
    for root in ordered_roots:
        if path == root or path.startswith(root + "."):
            tower = roots[root][0]
            if tower in NON_TEXT_TOWERS:
                rest = path[len(root) + 1 :].split(".") if path != root else []
                if rest and _has_word(rest[0], _PROJECTOR_WORDS):
                    return "projector"
            return tower
    if not composite:
        return "language"
    # The smallest module that holds this one and some tower root: when every root in it is a language root, this
    # is a block of the text model that the roots do not cover (DiffusionGemma's `decoder.self_conditioning`).
    holder = path
    while holder:
        holder = holder.rsplit(".", 1)[0] if "." in holder else ""
        below = [r for r in roots if holder == "" or r.startswith(holder + ".")]
        if below:
            if holder and all(roots[r][0] == "language" for r in below):
                return "language"
            break
    if not path or any(r.startswith(path + ".") for r in roots):
        if all(roots[r][0] == "language" for r in roots if r.startswith(path + ".")) and path:
            return "language"
        return "other"  # a container of towers (the composite model itself)
    if any(path == s or path.startswith(s + ".") for s in sub_models):
        return "other"  # a sub-model of its own that is no tower we know (e.g. a speech "talker")
    # Glue between towers, outside all of them: what maps one tower's features into another's space.
    return "projector"


def _unwrap_peft(model: nn.Module) -> nn.Module:
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base) and type(model).__name__.startswith("Peft"):
        return get_base()
    return model
