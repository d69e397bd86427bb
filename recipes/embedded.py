"""The recipes' embedded defaults: a small Qwen2.5-VL-architecture model and data generated in code, all offline.

The model is built from the config shipped in ``recipes/assets/tiny-qwen2.5-vl`` with a seeded random init; its
tokenizer and image processor are loaded from the same folder, exactly as a real checkpoint directory would be. The
datasets are generated deterministically: arithmetic word problems with worked answers (text-only), and coloured
squares to name (image-text).
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from PIL import Image
from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer, PreTrainedModel

ASSET_DIR = Path(__file__).resolve().parent / "assets" / "tiny-qwen2.5-vl"
"""Config, tokenizer and image-processor files of the embedded model (no weights: it is initialised from a seed)."""

NAMES = ["Ava", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jia", "Kai", "Lena", "Milo", "Nia"]
ITEMS = ["apple", "book", "coin", "marble", "pencil", "shell", "stamp", "sticker", "card", "button"]
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 60),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 50, 170),
    "orange": (250, 140, 20),
}
ANSWER = re.compile(r"answer is (-?\d+)")


def is_embedded(model_name_or_path: str | None) -> bool:
    """Whether a recipe runs on the embedded default model (no ``--model_name_or_path`` given)."""
    return model_name_or_path in (None, "", "embedded", str(ASSET_DIR))


def embedded_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """The embedded Qwen2.5-VL-architecture model, built from the shipped config with a seeded init."""
    config = AutoConfig.from_pretrained(ASSET_DIR)
    torch.manual_seed(seed)
    return AutoModelForImageTextToText.from_config(config, dtype=dtype)


def embedded_tokenizer() -> Any:
    """The embedded model's tokenizer (ChatML chat template, single-digit numbers)."""
    return AutoTokenizer.from_pretrained(ASSET_DIR)


def embedded_processor() -> Any:
    """The embedded model's processor (image processor + tokenizer).

    Uses the stock ``AutoProcessor``; where torchvision is missing (no video processor can be built), a
    ``Qwen2_5_VLProcessor`` without its video processor, which runs the same image and text code.
    """
    from transformers import AutoProcessor, Qwen2_5_VLProcessor, Qwen2VLImageProcessorPil

    try:
        return AutoProcessor.from_pretrained(ASSET_DIR)
    except (AttributeError, ImportError, OSError, ValueError):
        pass

    class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
        @classmethod
        def get_attributes(cls) -> list[str]:
            return [name for name in super().get_attributes() if name != "video_processor"]

    tokenizer = embedded_tokenizer()
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(ASSET_DIR)
    return ImageOnlyQwen2_5_VLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=tokenizer.chat_template
    )


# --------------------------------------------------------------------------------------------------------------------
# Text-only: arithmetic word problems with worked answers.
# --------------------------------------------------------------------------------------------------------------------
def _problem(rng: random.Random) -> tuple[str, str, int]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    kind = rng.choice(("add", "sub", "mul"))
    if kind == "add":
        question = f"{name} has {a} {item}s and finds {b} more. How many {item}s does {name} have now?"
        work, result = f"{a} + {b} = {a + b}", a + b
    elif kind == "sub":
        a, b = max(a, b), min(a, b)
        question = f"{name} has {a} {item}s and gives away {b}. How many {item}s are left?"
        work, result = f"{a} - {b} = {a - b}", a - b
    else:
        question = f"{name} buys {a} boxes with {b} {item}s in each. How many {item}s is that?"
        work, result = f"{a} x {b} = {a * b}", a * b
    return question, f"{work}. The answer is {result}.", result


def arithmetic_dataset(n: int, seed: int = 0, split: str = "train") -> Dataset:
    """``n`` conversational rows ``{"messages": [user question, assistant worked answer], "answer": "7"}``.

    ``split="test"`` draws from a different seed stream and skips questions seen in the first 4096 train rows.
    """
    train_rng = random.Random(seed)
    seen = {_problem(train_rng)[0] for _ in range(4096)} if split == "test" else set()
    rng = random.Random(seed if split == "train" else seed + 10_000)
    rows = []
    while len(rows) < n:
        question, answer, result = _problem(rng)
        if question in seen:
            continue
        rows.append(
            {
                "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
                "answer": str(result),
            }
        )
    return Dataset.from_list(rows)


def extract_answer(text: str) -> str:
    """The number after "answer is" in a generated answer ("" when there is none)."""
    match = ANSWER.search(text)
    return match.group(1) if match else ""


# --------------------------------------------------------------------------------------------------------------------
# Image-text: name the colour of a square.
# --------------------------------------------------------------------------------------------------------------------
def square(color: str, side: int = 56, shade: float = 1.0) -> Image.Image:
    """A square of ``color`` on a grey background."""
    canvas = np.full((side, side, 3), 128.0, dtype=np.float32)
    lo, hi = side // 4, side - side // 4
    canvas[lo:hi, lo:hi] = np.array(COLORS[color], dtype=np.float32) * shade
    return Image.fromarray(canvas.clip(0, 255).round().astype(np.uint8), mode="RGB")


def color_dataset(n: int, seed: int = 0) -> Dataset:
    """``n`` TRL vision rows: an image of a coloured square, "What color is this square?", the colour as answer."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        color = rng.choice(list(COLORS))
        rows.append(
            {
                "images": [square(color, shade=rng.uniform(0.8, 1.0))],
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image"}, {"type": "text", "text": "What color is this square?"}],
                    },
                    {"role": "assistant", "content": [{"type": "text", "text": f"The square is {color}."}]},
                ],
                "answer": color,
            }
        )
    return Dataset.from_list(rows)
