"""Shared set-up of the benchmarks: a Qwen2.5-VL-architecture model of a chosen size, a processor with a chosen image
size, and image-text rows with answers of a chosen length. Everything offline, from the test kit."""

from __future__ import annotations

import datasets
import torch
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

from tests.kit import make_tokenizer, tiny_config
from tests.kit.data import COLORS, IMAGE_QUESTION, make_image
from tests.kit.processors import KitQwen2_5_VLProcessor

FAMILY = "qwen2_5_vl"


def qwen2_5_vl_model(
    hidden: int = 1024,
    layers: int = 4,
    intermediate: int = 2816,
    heads: int = 16,
    kv_heads: int = 2,
    seed: int = 0,
    vision: dict | None = None,
    dtype: torch.dtype = torch.float32,
) -> Qwen2_5_VLForConditionalGeneration:
    """A randomly initialised Qwen2.5-VL with a language model of the given size.

    The vision tower is the kit's tiny one unless ``vision`` gives other vision-config values (e.g. a 7B-size tower).
    """
    config = tiny_config(FAMILY)
    for key, value in (vision or {}).items():
        setattr(config.vision_config, key, value)
    text = config.text_config
    head_dim = hidden // heads
    half = head_dim // 2
    text.hidden_size = hidden
    text.intermediate_size = intermediate
    text.num_hidden_layers = layers
    text.num_attention_heads = heads
    text.num_key_value_heads = kv_heads
    text.head_dim = head_dim
    text.layer_types = ["full_attention"] * layers
    text.max_position_embeddings = 4096
    text.rope_parameters = {
        **text.rope_parameters,
        "mrope_section": [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8],
    }
    config.vision_config.out_hidden_size = hidden
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype)


def qwen2_5_vl_processor(image_side: int = 56) -> KitQwen2_5_VLProcessor:
    """The kit's Qwen2.5-VL processor with images resized to ``image_side`` (``(side / 28)²`` tokens per image)."""
    tok = make_tokenizer(FAMILY)
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": image_side * image_side, "longest_edge": image_side * image_side},
        patch_size=14,
        temporal_patch_size=2,
        merge_size=2,
    )
    return KitQwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tok, chat_template=tok.chat_template)


def image_text_rows(n: int, image_side: int = 56, answer_words: int = 0) -> datasets.Dataset:
    """``n`` rows "[image] What color is this square?" -> colour name, plus ``answer_words`` words of filler text."""
    names = list(COLORS)
    filler = " ".join(["the square sits on a grey background"] * (answer_words // 7 + 1)).split()[:answer_words]
    rows = []
    for i in range(n):
        answer = names[i % len(names)] + ("" if not filler else ". " + " ".join(filler))
        rows.append(
            {
                "images": [make_image(i, image_side)],
                "messages": [
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": IMAGE_QUESTION}]},
                    {"role": "assistant", "content": [{"type": "text", "text": answer}]},
                ],
            }
        )
    return datasets.Dataset.from_list(rows)
