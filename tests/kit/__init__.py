"""Offline test kit: tiny tokenizers, models, processors and datasets for every supported model family.

Everything is built locally from config (no Hugging Face Hub access). Typical use::

    from tests.kit import image_text_dataset, make_processor, tiny_model

    model = tiny_model("qwen2_5_vl")
    processor = make_processor("qwen2_5_vl")
    dataset = image_text_dataset(4, family="qwen2_5_vl")
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402

from .data import (  # noqa: E402
    as_iterable,
    audio_text_dataset,
    image_text_dataset,
    make_image,
    mixed_dataset,
    sine_wave,
    text_dataset,
)
from .models import (  # noqa: E402
    ARCHITECTURES,
    NO_GRADIENT_BY_DESIGN,
    TOWER_MODULES,
    ZERO_INIT_CONNECTIONS,
    auto_model_class,
    tiny_config,
    tiny_model,
)
from .processors import PROCESSOR_FAMILIES, make_processor  # noqa: E402
from .tokenizer import AUDIO_FAMILIES, FAMILIES, VLM_FAMILIES, make_tokenizer  # noqa: E402
from .training import FAST_CPU_TRAINING, end_process_group, training_args  # noqa: E402

_PLACEHOLDER_ATTRS: dict[str, tuple[str, ...]] = {
    "image": ("image_token_id", "image_token_index"),
    "video": ("video_token_id", "video_token_index"),
    "audio": ("audio_token_id", "audio_token_index"),
}


def placeholder_ids(family: str) -> dict[str, int]:
    """Modality -> placeholder token id, as set in ``tiny_config(family)`` (empty for ``causal_lm``)."""
    config = tiny_config(family)
    ids: dict[str, int] = {}
    for modality, attrs in _PLACEHOLDER_ATTRS.items():
        for attr in attrs:
            value = getattr(config, attr, None)
            if isinstance(value, int):
                ids[modality] = value
                break
    return ids


def save_tiny(family: str, path: str | os.PathLike[str], seed: int = 0) -> Path:
    """Save ``tiny_model(family, seed)`` (safetensors) and its processor, or tokenizer for ``causal_lm``, to ``path``.

    Reload with ``auto_model_class(family).from_pretrained(path)`` and ``AutoProcessor.from_pretrained(path)``
    (``AutoTokenizer`` for ``causal_lm``).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tiny_model(family, seed).save_pretrained(path)
    if family in PROCESSOR_FAMILIES:
        make_processor(family).save_pretrained(path)
    else:
        make_tokenizer(family).save_pretrained(path)
    return path


__all__ = [
    "ARCHITECTURES",
    "FAST_CPU_TRAINING",
    "AUDIO_FAMILIES",
    "FAMILIES",
    "NO_GRADIENT_BY_DESIGN",
    "PROCESSOR_FAMILIES",
    "TOWER_MODULES",
    "VLM_FAMILIES",
    "ZERO_INIT_CONNECTIONS",
    "as_iterable",
    "audio_text_dataset",
    "auto_model_class",
    "end_process_group",
    "image_text_dataset",
    "make_image",
    "make_processor",
    "make_tokenizer",
    "mixed_dataset",
    "placeholder_ids",
    "save_tiny",
    "sine_wave",
    "text_dataset",
    "tiny_config",
    "tiny_model",
    "training_args",
]
