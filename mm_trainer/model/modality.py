"""Which modalities the data holds: per dataset (over a bounded sample) and per token of a collated batch."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

MODALITIES: tuple[str, ...] = ("text", "image", "video", "audio")
"""Every modality a profile can name."""

NON_TEXT_MODALITIES: tuple[str, ...] = ("image", "video", "audio")

MODALITY_TOWERS: dict[str, tuple[str, ...]] = {
    "text": ("language",),
    "image": ("vision", "projector"),
    "video": ("vision", "projector"),
    "audio": ("audio", "projector"),
}
"""Towers each modality reaches (the language model and its head see every modality)."""

_COLUMNS: dict[str, tuple[str, ...]] = {
    "image": ("image", "images"),
    "video": ("video", "videos"),
    "audio": ("audio", "audios"),
}
_PART_TYPES: dict[str, str] = {
    "image": "image",
    "image_url": "image",
    "input_image": "image",
    "video": "video",
    "video_url": "video",
    "audio": "audio",
    "input_audio": "audio",
    "audio_url": "audio",
}
_CHAT_COLUMNS = ("messages", "prompt", "completion", "conversations")

# Token classes in [`token_modality`].
PAD, TEXT, IMAGE, VIDEO, AUDIO = 0, 1, 2, 3, 4
TOKEN_CLASS: dict[str, int] = {"pad": PAD, "text": TEXT, "image": IMAGE, "video": VIDEO, "audio": AUDIO}

_PLACEHOLDER_KEYS: dict[str, tuple[str, ...]] = {
    "image": ("image_token_id", "image_token_index", "image_token"),
    "video": ("video_token_id", "video_token_index", "video_token"),
    "audio": ("audio_token_id", "audio_token_index", "audio_token"),
}
_PIXEL_KEYS: dict[str, tuple[str, ...]] = {
    "image": ("pixel_values", "pixel_values_images"),
    "video": ("pixel_values_videos",),
    "audio": ("input_features", "audio_values", "input_audio_features"),
}


@dataclass
class ModalityProfile:
    """The modalities a dataset holds, as seen on a bounded sample of its rows.

    Attributes:
        modalities: Modalities present in at least one sampled row (`"text"` is always there).
        rows_sampled: How many rows were inspected.
        rows_with: Per non-text modality, how many sampled rows hold it.
        iterable: Whether the dataset was an `IterableDataset` (sampled from its head).
        declared: Whether the modalities were declared by the user instead of sampled.
    """

    modalities: frozenset[str]
    rows_sampled: int = 0
    rows_with: dict[str, int] = field(default_factory=dict)
    iterable: bool = False
    declared: bool = False

    @property
    def text_only(self) -> bool:
        """True when no sampled row holds an image, video or audio."""
        return not (self.modalities & set(NON_TEXT_MODALITIES))

    @property
    def mixed(self) -> bool:
        """True when some sampled rows are text-only and others are not."""
        if self.text_only or self.declared:
            return False
        with_any = max(self.rows_with.values(), default=0)
        return 0 < with_any < self.rows_sampled

    def reached_towers(self) -> set[str]:
        """Towers the data reaches: the language tower always, vision/audio/projector per modality present."""
        towers: set[str] = set()
        for modality in self.modalities:
            towers.update(MODALITY_TOWERS[modality])
        return towers

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "modalities": sorted(self.modalities, key=MODALITIES.index),
            "rows_sampled": self.rows_sampled,
            "rows_with": dict(self.rows_with),
            "iterable": self.iterable,
            "declared": self.declared,
            "text_only": self.text_only,
            "mixed": self.mixed,
        }

    @classmethod
    def declare(cls, modalities: Iterable[str]) -> ModalityProfile:
        """A profile from modalities the user states (for streams too costly to sample)."""
        mods = set(modalities) | {"text"}
        unknown = mods - set(MODALITIES)
        if unknown:
            raise ValueError(f"Unknown modality {sorted(unknown)}; choose from {list(MODALITIES)}.")
        return cls(modalities=frozenset(mods), declared=True)


def row_modalities(row: Mapping[str, Any]) -> set[str]:
    """Non-text modalities one dataset row carries (media columns and chat content parts)."""
    found: set[str] = set()
    for modality, columns in _COLUMNS.items():
        for column in columns:
            if column in row and _non_empty(row[column]):
                found.add(modality)
    for column in _CHAT_COLUMNS:
        if column in row:
            found |= _content_modalities(row[column])
    return found


def _non_empty(value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, (list, tuple)):
        return any(v is not None for v in value)
    if isinstance(value, Mapping):
        return any(v is not None for v in value.values())
    return True


def _content_modalities(messages: Any) -> set[str]:
    found: set[str] = set()
    if not isinstance(messages, (list, tuple)):
        return found
    for message in messages:
        content = message.get("content") if isinstance(message, Mapping) else None
        if not isinstance(content, (list, tuple)):
            continue
        for part in content:
            if not isinstance(part, Mapping):
                continue
            kind = _PART_TYPES.get(str(part.get("type")))
            # Arrow fills absent keys of a struct with None: a "text" part may carry "image": None.
            if kind is not None:
                found.add(kind)
    return found


def profile_dataset(dataset: Any, max_rows: int = 256) -> ModalityProfile:
    """Profile a dataset's modalities over a bounded sample.

    A map-style dataset is sampled at evenly spaced rows (first and last included), an iterable one from its head.
    Media columns of `datasets` `Image`/`Audio`/`Video` features are read without decoding.

    Args:
        dataset: A `datasets.Dataset`, `datasets.IterableDataset`, or any sequence / iterable of dict rows.
        max_rows: Upper bound on the rows inspected.

    Returns:
        The [`ModalityProfile`].
    """
    if max_rows < 1:
        raise ValueError(f"`max_rows` must be >= 1, got {max_rows}.")
    rows, iterable = _sample_rows(dataset, max_rows)
    counts = dict.fromkeys(NON_TEXT_MODALITIES, 0)
    n = 0
    for row in rows:
        n += 1
        for modality in row_modalities(row):
            counts[modality] += 1
    if n == 0:
        raise ValueError("The dataset is empty: no row to profile. Pass a dataset with at least one row.")
    present = {"text"} | {m for m, c in counts.items() if c > 0}
    return ModalityProfile(
        modalities=frozenset(present),
        rows_sampled=n,
        rows_with={m: c for m, c in counts.items() if c > 0},
        iterable=iterable,
    )


def sample_rows(dataset: Any, max_rows: int) -> list[dict[str, Any]]:
    """Up to `max_rows` rows of `dataset` as dicts (decoded), spread over a map-style dataset."""
    if hasattr(dataset, "select") and hasattr(dataset, "__len__"):
        return [dict(dataset[i]) for i in _spread(len(dataset), max_rows)]
    return [dict(r) for r in itertools.islice(iter(dataset), max_rows)]


def _spread(length: int, k: int) -> list[int]:
    if length <= k:
        return list(range(length))
    if k == 1:
        return [0]
    return sorted({round(i * (length - 1) / (k - 1)) for i in range(k)})


def _sample_rows(dataset: Any, max_rows: int) -> tuple[Iterable[Mapping[str, Any]], bool]:
    try:
        from datasets import Dataset, IterableDataset
    except ImportError:  # pragma: no cover - datasets comes with trl
        Dataset = IterableDataset = ()  # type: ignore[assignment]
    if isinstance(dataset, Dataset):
        undecoded = _without_media_decoding(dataset)
        return (undecoded[i] for i in _spread(len(undecoded), max_rows)), False
    if isinstance(dataset, IterableDataset):
        return itertools.islice(iter(_without_media_decoding(dataset)), max_rows), True
    if isinstance(dataset, Sequence):
        return (dataset[i] for i in _spread(len(dataset), max_rows)), False
    return itertools.islice(iter(dataset), max_rows), True


def _without_media_decoding(dataset: Any) -> Any:
    """The same dataset with media features left undecoded (no PIL / audio decoding while profiling)."""
    features = getattr(dataset, "features", None)
    if not features:
        return dataset
    for name, feature in features.items():
        if hasattr(feature, "decode") and getattr(feature, "decode", False):
            try:
                dataset = dataset.cast_column(name, type(feature)(decode=False))
            except Exception:  # a feature that cannot be re-cast keeps decoding; profiling still works
                continue
    return dataset


def placeholder_ids(config: Any) -> dict[str, int]:
    """Placeholder token ids of each non-text modality, read from a model config (`image_token_id` and kin).

    Looks at the top-level config and its text sub-config. Only integer ids are returned.
    """
    found: dict[str, int] = {}
    configs = [config]
    get_text = getattr(config, "get_text_config", None)
    if callable(get_text):
        text_cfg = get_text()
        if text_cfg is not config:
            configs.append(text_cfg)
    for modality, keys in _PLACEHOLDER_KEYS.items():
        for cfg in configs:
            for key in keys:
                value = getattr(cfg, key, None)
                if isinstance(value, int) and not isinstance(value, bool) and modality not in found:
                    found[modality] = value
    return found


def batch_modalities(batch: Mapping[str, Any]) -> set[str]:
    """Non-text modalities whose features a collated batch carries (`pixel_values`, `input_features`, ...)."""
    return {m for m, keys in _PIXEL_KEYS.items() if any(batch.get(k) is not None for k in keys)}


def token_modality(
    batch: Mapping[str, Any],
    config: Any = None,
    placeholders: Mapping[str, int] | None = None,
) -> torch.Tensor:
    """Per-token modality class of a collated batch.

    Args:
        batch: A batch with `input_ids` and, optionally, `attention_mask` and media features.
        config: The model config, read for placeholder ids (`image_token_id`, `audio_token_index`, ...).
        placeholders: Explicit `{modality: token_id}`, overriding the config.

    Returns:
        A `long` tensor shaped like `input_ids`: [`PAD`] for padding, [`TEXT`], [`IMAGE`],
        [`VIDEO`] or [`AUDIO`].

    Raises:
        ValueError: The batch carries media features but neither `placeholders` nor the config says which token
            id stands for them.
    """
    input_ids = batch["input_ids"]
    ids = dict(placeholder_ids(config)) if config is not None else {}
    if placeholders:
        ids.update(placeholders)
    present = batch_modalities(batch)
    missing = sorted(m for m in present if m not in ids)
    if missing:
        raise ValueError(
            f"The batch carries {', '.join(missing)} features but the model config names no placeholder token for "
            f"them (looked for {[k for m in missing for k in _PLACEHOLDER_KEYS[m]]}). Set the id on the config "
            "(e.g. `model.config.image_token_id = tokenizer.convert_tokens_to_ids('<image>')`) or pass "
            "`placeholders={'image': <id>}`."
        )
    classes = torch.full_like(input_ids, TEXT, dtype=torch.long)
    for modality, token_id in ids.items():
        classes[input_ids == token_id] = TOKEN_CLASS[modality]
    attention_mask = batch.get("attention_mask")
    if attention_mask is not None and attention_mask.shape == input_ids.shape:
        classes[attention_mask == 0] = PAD
    return classes


_TEXT_SOURCES = ("messages", "prompt", "completion", "input_ids", "conversations")
"""Columns from which TRL's `SFTTrainer` builds the text (besides `dataset_text_field`)."""


def check_dataset_columns(dataset: Any, text_field: str | None, formatting_func: Any = None) -> None:
    """Refuse, with the fix, a dataset from which `SFTTrainer` can build no text (it would fail deep inside
    `datasets` with a bare `KeyError`).

    Args:
        dataset: The training dataset (`Dataset` / `IterableDataset`; other kinds are not checked).
        text_field: `dataset_text_field` (default `"text"`).
        formatting_func: When given, it builds the text from any columns: nothing is checked.

    Raises:
        ValueError: No column the text could come from.
    """
    if formatting_func is not None:
        return
    columns = getattr(dataset, "column_names", None)
    if isinstance(columns, dict):  # a DatasetDict: not a training split
        return
    if not isinstance(columns, (list, tuple)):
        try:
            columns = list(next(iter(dataset)).keys())
        except Exception:  # noqa: BLE001 - an unreadable stream is reported by the Trainer itself
            return
    usable = {*_TEXT_SOURCES, text_field or "text"}
    if not columns or usable & set(columns):
        return
    raise ValueError(
        f"The training dataset has no column the text can come from: its columns are {sorted(columns)[:20]}, "
        f"expected 'messages', 'prompt'+'completion', 'input_ids' or '{text_field or 'text'}'. Rename the column "
        f"holding the text, set `dataset_text_field` in the config to its name, or pass a `formatting_func`."
    )


def batch_modality_rows(batch: Mapping[str, Any], placeholders: Mapping[str, int]) -> dict[str, list[int] | None]:
    """Non-text modalities a collated batch carries, each with the batch rows that hold it where that is known.

    A modality counts as present when its features are in the batch (`pixel_values`, `input_features`, ...; an
    empty tensor does not count) or its placeholder token occurs in `input_ids`. Rows come from the placeholder
    tokens; a modality seen only through its features maps to `None` (rows unknown: features are often flattened
    across the batch).

    Args:
        batch: A collated batch.
        placeholders: `{modality: token_id}`, e.g. from [`placeholder_ids`].
    """
    found: dict[str, list[int] | None] = {}
    for modality, keys in _PIXEL_KEYS.items():
        for key in keys:
            value = batch.get(key)
            if value is not None and not (torch.is_tensor(value) and value.numel() == 0):
                found[modality] = None
    input_ids = batch.get("input_ids")
    if torch.is_tensor(input_ids) and input_ids.dim() >= 1:
        ids = input_ids if input_ids.dim() == 2 else input_ids.reshape(1, -1)
        for modality, token_id in placeholders.items():
            rows = torch.nonzero((ids == token_id).any(dim=-1)).flatten().tolist()
            if rows:
                found[modality] = rows
    return found
