"""Checkpoint completeness, and which checkpoint a resume may start from.

A `checkpoint-N` folder is written in this order: the adapter (`save_model`), mm-trainer's files (state, 4-bit
recipe, audit; each atomic), the optimizer / scheduler / RNG files, `trainer_state.json`, then checkpoint rotation
(`save_total_limit`), then the `on_save` callback, where mm-trainer writes [`COMPLETE_MARKER`] last,
atomically, with the size of every file the folder holds. A kill at any point before `trainer_state.json` leaves a
folder without it; a marker is removed before a folder is written again (a resumed run re-saving `checkpoint-N`).

What counts as complete ([`checkpoint_problem`] returns `None`):

- With a marker: every file it lists exists with the size it lists.
- Without a marker: `trainer_state.json` exists and parses as a JSON object. This covers checkpoints written by
  plain transformers / TRL or by an mm-trainer before the marker existed, and the one window where mm-trainer's own
  checkpoint is finished but unmarked: a kill between the Trainer's rotation (which runs *before* `on_save`) and
  the marker. With `save_total_limit=1` that checkpoint is the only one left; refusing it would leave nothing to
  resume from although every file of it was written (`trainer_state.json` is the Trainer's last file).
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from .atomic import atomic_write_json

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "mm_trainer_complete.json"
"""Name of the marker file of a complete checkpoint."""

MARKER_FORMAT = 1
"""Version of the marker's layout."""

TRAINER_STATE = "trainer_state.json"
"""The file the Trainer writes last into a checkpoint."""

CHECKPOINT_PREFIX = "checkpoint"
"""transformers' `PREFIX_CHECKPOINT_DIR`: a checkpoint folder is `<output_dir>/checkpoint-<step>` (mirrored, so that
reading a folder name does not import transformers; `tests/test_upstream.py` pins that both agree)."""

_CHECKPOINT = re.compile(rf"^{re.escape(CHECKPOINT_PREFIX)}-(\d+)$")
_MAX_STATE_BYTES = 256 * 2**20  # a trainer_state.json larger than this is not read to judge completeness


class IncompleteCheckpointError(ValueError):
    """A checkpoint named for a resume was not finished (the message names the last complete one)."""


def write_complete_marker(checkpoint: Path, global_step: int) -> None:
    """Mark `checkpoint` complete: record its step and the size of every file it holds, atomically.

    Args:
        checkpoint: The `checkpoint-N` folder, every file of which is written.
        global_step: The optimizer step it was saved at.
    """
    files = {
        str(p.relative_to(checkpoint)): p.stat().st_size
        for p in sorted(checkpoint.rglob("*"))
        if p.is_file() and p.name != COMPLETE_MARKER and not p.name.startswith(".")
    }
    atomic_write_json(
        checkpoint / COMPLETE_MARKER, {"format": MARKER_FORMAT, "global_step": int(global_step), "files": files}
    )


def unmark_checkpoint(folder: Path) -> None:
    """Before `folder` is written (again): remove its marker, and the temporary files an atomic write cut short by a
    kill left there (`.<name>.<random>.tmp`). A no-op for folders not named `checkpoint-N`."""
    if not _CHECKPOINT.match(folder.name) or not folder.is_dir():
        return
    (folder / COMPLETE_MARKER).unlink(missing_ok=True)
    for leftover in folder.glob(".*.tmp"):
        leftover.unlink(missing_ok=True)


def checkpoint_dir(output_dir: str | os.PathLike, step: int) -> Path:
    """The folder the Trainer saves the checkpoint of optimizer step `step` to (`<output_dir>/checkpoint-<step>`)."""
    return Path(output_dir) / f"{CHECKPOINT_PREFIX}-{int(step)}"


def is_checkpoint_dir(path: Path) -> bool:
    """Whether `path` is named like a Trainer checkpoint folder (`checkpoint-<step>`)."""
    return checkpoint_step(path) is not None


def checkpoint_step(folder: Path) -> int | None:
    """The step `N` of a `checkpoint-N` folder, `None` for another name."""
    match = _CHECKPOINT.match(folder.name)
    return int(match.group(1)) if match else None


def checkpoint_problem(folder: Path) -> str | None:
    """Why `folder` is not a complete checkpoint (see the module docstring), or `None` when it is."""
    if not folder.is_dir():
        return "it is not a directory"
    marker = folder / COMPLETE_MARKER
    if marker.is_file():
        try:
            content = json.loads(marker.read_text(encoding="utf-8"))
            files = content["files"]
            if not isinstance(files, dict):
                raise TypeError("files is not an object")
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as err:
            return f"its {COMPLETE_MARKER} is unreadable ({type(err).__name__})"
        for name, size in files.items():
            path = folder / name
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != size:
                return f"{name} has {path.stat().st_size} bytes, not the {size} it had when the checkpoint was saved"
        return None
    state = folder / TRAINER_STATE
    if not state.is_file():
        return f"no {TRAINER_STATE} (the Trainer writes it last): the save was cut short"
    try:
        if state.stat().st_size > _MAX_STATE_BYTES:
            return None
        if not isinstance(json.loads(state.read_text(encoding="utf-8")), dict):
            return f"its {TRAINER_STATE} is not a JSON object"
    except (OSError, ValueError, RecursionError) as err:
        return f"its {TRAINER_STATE} is unreadable ({type(err).__name__}): the save was cut short"
    return None


def list_checkpoints(output_dir: Path) -> list[Path]:
    """The `checkpoint-N` folders of `output_dir`, oldest step first."""
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if checkpoint_step(p) is not None and p.is_dir()]
    return sorted(found, key=lambda p: checkpoint_step(p) or 0)


def newest_complete_checkpoint(output_dir: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest complete checkpoint of `output_dir` and the newer unfinished ones skipped (with why).

    Returns:
        `(checkpoint or None, [(skipped folder, problem), ...])`, skipped newest first.
    """
    skipped: list[tuple[Path, str]] = []
    for folder in reversed(list_checkpoints(output_dir)):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder, skipped
        skipped.append((folder, problem))
    return None, skipped


def resolve_resume_checkpoint(resume_from_checkpoint: Any, output_dir: str | os.PathLike) -> Path | None:
    """The checkpoint to resume from for `Trainer.train(resume_from_checkpoint=...)`.

    `True` takes the newest complete checkpoint of `output_dir` (logging the unfinished ones it skips); a path is
    checked and refused when unfinished; anything else (`None`, `False`) is `None`.

    Raises:
        ValueError: `True` and no complete checkpoint in `output_dir`.
        IncompleteCheckpointError: A named checkpoint that is not complete (the message names the last complete one).
    """
    output_dir = Path(output_dir)
    if resume_from_checkpoint is True:
        checkpoint, skipped = newest_complete_checkpoint(output_dir)
        for folder, problem in skipped:
            logger.warning("Skipping unfinished checkpoint %s for the resume: %s.", folder.name, problem)
        if checkpoint is None:
            detail = f" ({len(skipped)} unfinished: {', '.join(p.name for p, _ in skipped)})" if skipped else ""
            raise ValueError(
                f"No complete checkpoint in output_dir ({output_dir}) to resume from{detail}. Start a fresh run "
                "(resume_from_checkpoint=None), or pass the path of a checkpoint."
            )
        if skipped:
            logger.warning("Resuming from %s, the newest complete checkpoint.", checkpoint)
        return checkpoint
    if not isinstance(resume_from_checkpoint, (str, os.PathLike)):
        return None
    checkpoint = Path(resume_from_checkpoint)
    if not checkpoint.exists():
        return checkpoint  # the Trainer reports a missing path with its own message
    problem = checkpoint_problem(checkpoint)
    if problem is None:
        return checkpoint
    complete, _ = newest_complete_checkpoint(checkpoint.parent)
    fix = (
        f"resume from {complete} (the newest complete checkpoint), or with resume_from_checkpoint=True"
        if complete is not None
        else "no complete checkpoint is left beside it: start a fresh run"
    )
    raise IncompleteCheckpointError(f"Cannot resume from {checkpoint}: it is unfinished ({problem}); {fix}.")
