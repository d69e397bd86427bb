"""Entry point of the `mm-trainer` console script."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from . import audit as audit_cmd
from . import compare as compare_cmd
from . import plan as plan_cmd
from .errors import describe, unusable


def build_parser() -> argparse.ArgumentParser:
    """The `mm-trainer` argument parser with one sub-parser per command."""
    parser = argparse.ArgumentParser(
        prog="mm-trainer",
        description="Multimodal LoRA fine-tuning tools: plan targets, audit adapters, compare runs.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    plan_cmd.add_parser(sub)
    audit_cmd.add_parser(sub)
    compare_cmd.add_parser(sub)
    return parser


_QUIET_LIBRARIES = ("bitsandbytes", "kernels")
"""Libraries whose import-time notices are not the command's output: bitsandbytes (imported by PEFT) tries to fetch
an optional CPU kernel from the Hub when the CPU has AVX512-BF16, and it and `kernels` log two warnings about it
when the Hub is offline. A command's stderr carries only its own message (one line for unusable input)."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run `mm-trainer` and return its exit code."""
    for name in _QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.ERROR)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except Exception as err:  # noqa: BLE001 - the last guard: a crash is "unusable input" (2), never "dead" (1)
        return unusable(args.command, f"failed on this input ({describe(err)})")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
