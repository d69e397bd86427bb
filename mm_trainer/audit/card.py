"""The audit section of the model card (the `README.md` TRL and PEFT write next to the adapter)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..utils.atomic import atomic_write_text
from .markdown import TOWER_HEADER, md_table, reason_lines, tower_rows

CARD_BEGIN = "<!-- mm-trainer audit: begin -->"
CARD_END = "<!-- mm-trainer audit: end -->"
"""Markers around the section, so that a later save replaces it instead of adding a second one."""


def card_section(audit: Mapping[str, Any], audit_file: str = "AUDIT.md") -> str:
    """The section: verdict, reasons, the per-tower parameter table and a pointer to the full audit."""
    p = audit["params"]
    lines = [
        CARD_BEGIN,
        "## mm-trainer audit",
        "",
        f"**Verdict: {audit['verdict']}** (optimizer step {audit['global_step']}). Effective trainable parameters: "
        f"{p['effective_trainable']:,} of {p['nominal_trainable']:,} nominal ({p['effective_share']:.1%}).",
        "",
        *reason_lines(audit),
        "",
        *md_table(TOWER_HEADER, tower_rows(audit)),
        "",
        f"Full report: [{audit_file}]({audit_file}) and `audit.json` (per-module status, training dynamics, "
        "resolved targets and why, data modalities, versions).",
        CARD_END,
    ]
    return "\n".join(lines)


def card_error_section(error_file: str) -> str:
    """The section that stands in for the audit when it could not be built at a save."""
    return "\n".join(
        [
            CARD_BEGIN,
            "## mm-trainer audit",
            "",
            f"The audit could not be built at this save; the adapter is complete. See `{error_file}`.",
            CARD_END,
        ]
    )


def add_to_card(readme: Path, audit: Mapping[str, Any] | None, section: str | None = None) -> bool:
    """Put the audit section (or `section`) into `readme`, replacing an earlier one.

    Returns:
        `False` when there is no such file (nothing is written).
    """
    if not readme.is_file():
        return False
    text = readme.read_text(encoding="utf-8")
    section = section if section is not None else card_section(audit)
    start, end = text.find(CARD_BEGIN), text.find(CARD_END)
    if start != -1 and end > start:
        text = text[:start] + section + text[end + len(CARD_END) :]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    atomic_write_text(readme, text)
    return True
