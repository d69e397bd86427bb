"""Small deterministic datasets in the formats TRL and mm_trainer read: text, image-text, mixed and audio-text."""

from __future__ import annotations

from typing import Any

import datasets
import numpy as np
from PIL import Image

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 60),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 50, 170),
    "orange": (250, 140, 20),
    "white": (250, 250, 250),
    "black": (10, 10, 10),
}
"""Colour names (the answers) and their RGB values."""

IMAGE_SIDE: dict[str, int] = {"qwen2_5_vl": 56, "qwen3_vl": 64, "gemma3": 56, "llava": 28, "mllama": 28}
"""Native square image side per family (what its tiny processor resizes to anyway); 56 for any other."""

SAMPLING_RATE = 16000
IMAGE_QUESTION = "What color is this square?"
AUDIO_QUESTION = "What sound is this?"


def _qa(i: int) -> tuple[str, str]:
    """The ``i``-th arithmetic question and its answer."""
    a, b = (3 * i + 1) % 10, (7 * i + 2) % 10
    return f"What is {a} + {b}?", str(a + b)


def _color(i: int) -> str:
    """The colour name of row ``i``."""
    return list(COLORS)[i % len(COLORS)]


def make_image(i: int, side: int = 56) -> Image.Image:
    """The ``i``-th image: a square of colour ``_color(i)`` (a gradient on odd rows) on a grey background."""
    rgb = np.array(COLORS[_color(i)], dtype=np.float32)
    canvas = np.full((side, side, 3), 128.0, dtype=np.float32)
    lo, hi = side // 4, side - side // 4
    patch = np.broadcast_to(rgb, (hi - lo, hi - lo, 3)).copy()
    if i % 2:
        patch *= np.linspace(0.6, 1.0, hi - lo, dtype=np.float32)[None, :, None]
    canvas[lo:hi, lo:hi] = patch
    return Image.fromarray(canvas.round().astype(np.uint8), mode="RGB")


def _text_messages(i: int, structured: bool = False) -> list[dict[str, Any]]:
    """Row ``i``'s arithmetic chat; ``structured`` gives list-of-parts content instead of strings."""
    question, answer = _qa(i)
    if structured:
        return [
            {"role": "user", "content": [{"type": "text", "text": question}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ]
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def _image_messages(i: int) -> list[dict[str, Any]]:
    """Row ``i``'s ``[image, question] -> colour`` chat."""
    return [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": IMAGE_QUESTION}]},
        {"role": "assistant", "content": [{"type": "text", "text": _color(i)}]},
    ]


def text_dataset(n: int = 16, fmt: str = "messages") -> datasets.Dataset:
    """Arithmetic Q/A rows.

    ``fmt``: ``"messages"`` (conversational, string content), ``"text"`` (``{"text": ...}``), ``"prompt_completion"``
    (conversational ``prompt`` / ``completion`` message lists) or ``"prompt_completion_text"`` (plain strings).
    """
    rows: list[dict[str, Any]] = []
    for i in range(n):
        question, answer = _qa(i)
        if fmt == "messages":
            rows.append({"messages": _text_messages(i)})
        elif fmt == "text":
            rows.append({"text": f"Question: {question} Answer: {answer}"})
        elif fmt == "prompt_completion":
            rows.append(
                {
                    "prompt": [{"role": "user", "content": question}],
                    "completion": [{"role": "assistant", "content": answer}],
                }
            )
        elif fmt == "prompt_completion_text":
            rows.append({"prompt": f"Question: {question} Answer:", "completion": f" {answer}"})
        else:
            raise ValueError(f"Unknown fmt {fmt!r}")
    return datasets.Dataset.from_list(rows)


def image_text_dataset(n: int = 16, family: str | None = None) -> datasets.Dataset:
    """TRL vision rows: one image per row (``images``), a user turn ``[image, question]`` and the colour as answer.

    ``family`` only picks the image side (:data:`IMAGE_SIDE`); the processors resize any size.
    """
    side = IMAGE_SIDE.get(family or "", 56)
    rows = [{"images": [make_image(i, side)], "messages": _image_messages(i)} for i in range(n)]
    return datasets.Dataset.from_list(rows)


def mixed_dataset(n: int = 16, family: str | None = None, image_every: int = 2) -> datasets.Dataset:
    """Rows with and without an image; row ``i`` has one iff ``i % image_every == image_every - 1``.

    Row 0 is always text-only (``"images": []``), so a reader that only looks at the first row sees no image.
    Text-only rows use structured content (a list of text parts) so every row shares one Arrow schema.
    """
    side = IMAGE_SIDE.get(family or "", 56)
    rows = []
    for i in range(n):
        if i % image_every == image_every - 1:
            rows.append({"images": [make_image(i, side)], "messages": _image_messages(i)})
        else:
            rows.append({"images": [], "messages": _text_messages(i, structured=True)})
    return datasets.Dataset.from_list(rows, features=_mixed_features())


def _mixed_features() -> datasets.Features:
    """One schema for image and text-only rows (an empty ``images`` list can't infer its type)."""
    part = {"type": datasets.Value("string"), "text": datasets.Value("string")}
    message = {"role": datasets.Value("string"), "content": datasets.List(part)}
    return datasets.Features({"images": datasets.List(datasets.Image()), "messages": datasets.List(message)})


def sine_wave(i: int, seconds: float = 0.5, sampling_rate: int = SAMPLING_RATE) -> np.ndarray:
    """A float32 sine tone; its frequency depends on ``i``."""
    t = np.arange(int(seconds * sampling_rate), dtype=np.float32) / sampling_rate
    return (0.3 * np.sin(2 * np.pi * (220.0 * (1 + i % 4)) * t)).astype(np.float32)


def audio_text_dataset(n: int = 8, seconds: float = 0.5) -> datasets.Dataset:
    """Rows with an ``audio`` column (``{"array": float32 ndarray, "sampling_rate": 16000}``) and chat messages.

    The audio column is numpy-formatted, so ``ds[i]["audio"]["array"]`` is an ``np.ndarray``; the other columns are
    plain Python objects. (No audio decoding backend is installed, so the ``datasets.Audio`` feature isn't used.)
    """
    rows = []
    for i in range(n):
        high = i % 4 >= 2
        rows.append(
            {
                "audio": {"array": sine_wave(i, seconds), "sampling_rate": SAMPLING_RATE},
                "messages": [
                    {"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": AUDIO_QUESTION}]},
                    {
                        "role": "assistant",
                        "content": [{"type": "text", "text": "a high tone" if high else "a low tone"}],
                    },
                ],
            }
        )
    ds = datasets.Dataset.from_list(rows)
    return ds.with_format("numpy", columns=["audio"], output_all_columns=True)


def _audio_to_numpy(row: dict[str, Any]) -> dict[str, Any]:
    """Turn a row's audio array back into float32 numpy (iterable datasets yield lists)."""
    audio = row["audio"]
    return {"audio": {**audio, "array": np.asarray(audio["array"], dtype=np.float32)}}


def as_iterable(ds: datasets.Dataset) -> datasets.IterableDataset:
    """``ds.to_iterable_dataset()``; a numpy-formatted audio column stays numpy (datasets can't carry that format)."""
    if ds.format["type"] is None:
        return ds.to_iterable_dataset()
    iterable = ds.with_format(None).to_iterable_dataset()
    if "audio" in ds.column_names:
        iterable = iterable.map(_audio_to_numpy)
    return iterable
