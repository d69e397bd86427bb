"""How every `mm-trainer` command reports unusable input: one line on stderr, exit code 2."""

from __future__ import annotations

import sys

EXIT_UNUSABLE = 2
"""Exit code of every command for input it cannot use (1 is `audit`'s "dead adapters found")."""

MAX_MESSAGE = 600


def one_line(text: str) -> str:
    """`text` on one line (whitespace runs collapsed), cut at [`MAX_MESSAGE`] characters."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= MAX_MESSAGE else flat[: MAX_MESSAGE - 3] + "..."


def unusable(command: str, message: str) -> int:
    """Print `mm-trainer <command>: <message>` as one line on stderr; return [`EXIT_UNUSABLE`]."""
    print(one_line(f"mm-trainer {command}: {message}"), file=sys.stderr)
    return EXIT_UNUSABLE


def describe(err: BaseException) -> str:
    """`Type: message` of an exception (the type alone when the message is empty)."""
    text = str(err)
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
