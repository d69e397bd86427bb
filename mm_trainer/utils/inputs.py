"""Start-up checks of the trainer's and CLI's inputs that must fail with mm-trainer's message before a library's."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def looks_like_local_path(name: str) -> bool:
    """Whether `name` can only be a local path, never a Hub id (`name` or `namespace/name`)."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name or name.endswith(".json")


def check_model_path(model: Any) -> None:
    """Refuse a model given as a local path that does not exist.

    transformers would report it as `Repo id must be in the form 'repo_name' or 'namespace/repo_name'`.

    Raises:
        FileNotFoundError: `model` is a string that can only be a local path, and nothing is there.
    """
    if not isinstance(model, (str, os.PathLike)):
        return
    name = os.fspath(model)
    path = Path(name).expanduser()
    if path.exists() or not (looks_like_local_path(name) or isinstance(model, os.PathLike)):
        return
    raise FileNotFoundError(
        f"{name} does not exist (neither a local directory nor a Hub id). Pass the folder of a saved model "
        "(with config.json), a Hub id such as 'Qwen/Qwen2.5-VL-3B-Instruct', or a model instance."
    )
