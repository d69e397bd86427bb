"""Checkpoint completeness: a ``checkpoint-N`` folder counts as complete once its marker file exists.

The marker is written last (from the ``on_save`` callback, after the Trainer wrote the adapter, optimizer, RNG and
trainer state, and after mm-trainer's own files), atomically. A folder without it was cut short, e.g. by a kill during
the save, and must not be resumed from.
"""

from __future__ import annotations

from pathlib import Path

from .atomic import atomic_write_json

COMPLETE_MARKER = "mm_trainer_complete.json"
"""Name of the marker file of a complete checkpoint."""

MARKER_FORMAT = 1
"""Version of the marker's layout."""


def write_complete_marker(checkpoint: Path, global_step: int) -> None:
    """Mark ``checkpoint`` complete: record its step and the size of every file it holds, atomically.

    Args:
        checkpoint: The ``checkpoint-N`` folder, every file of which is written.
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
