"""`mm-trainer audit PATH`: which adapters of a saved PEFT LoRA adapter are dead, per tower (no base model needed).

Exit codes: 0 clean, 1 dead (or incomplete) adapters or NaN / infinite weights found, 2 unusable input (the message
says why, in one line).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .errors import EXIT_UNUSABLE, describe, unusable

EXIT_CLEAN, EXIT_DEAD = 0, 1
__all__ = ["EXIT_CLEAN", "EXIT_DEAD", "EXIT_UNUSABLE", "add_parser", "run"]


def add_parser(sub: Any) -> None:
    """Register the `audit` sub-command."""
    p = sub.add_parser(
        "audit",
        help="Find the dead adapters of a saved PEFT LoRA adapter, per tower; nominal vs effective parameters.",
        description="Read adapter_config.json and the adapter weights (no base model) and report, per tower, the "
        "adapters that changed nothing (B @ A exactly zero) and the effective trainable parameters. When the folder "
        "holds the audit.json mm-trainer wrote during training, its per-module statuses are used (exact also for "
        "PiSSA / OLoRA / LoftQ inits). Exit code: 0 clean, 1 dead or incomplete adapters or NaN / infinite weights "
        "found, 2 unusable input.",
    )
    p.add_argument("path", metavar="PATH", help="An adapter folder (or a file in it), e.g. a trainer output_dir.")
    p.add_argument("--json", action="store_true", help="Print the audit as JSON.")
    p.set_defaults(func=run)


def _print_text(report: dict[str, Any]) -> None:
    from rich.markup import escape
    from rich.table import Table

    from ..model.plan_report import console, human

    out = console()
    cfg = report["adapter_config"]
    out.print(
        escape(
            f"{report['path']}: LoRA r={cfg.get('r')}, alpha={cfg.get('lora_alpha')}, "
            f"init_lora_weights={cfg.get('init_lora_weights')!r}, {len(report['modules'])} adapted modules"
        )
    )
    training = report["training_verdict"]
    if training:
        out.print(escape(f"training audit (audit.json, step {training['step']}): verdict {training['verdict']}"))
        for reason in training["reasons"]:
            out.print(escape(f"  {reason['level']}: {reason['message']}"))
    table = Table(title="adapters per tower", title_justify="left")
    for col in ("tower", "modules", "dead", "unverified", "nominal params", "effective params"):
        table.add_column(col, justify="left" if col == "tower" else "right")
    for tower, row in report["towers"].items():
        table.add_row(
            tower,
            str(row["modules"]),
            str(row["dead"]),
            str(row["unverified"]),
            human(row["nominal"]),
            human(row["effective"]),
        )
    out.print(table)
    p = report["params"]
    share = p["effective"] / p["nominal"] if p["nominal"] else 0.0
    out.print(f"effective trainable params: {p['effective']:,} of {p['nominal']:,} nominal ({share:.1%})")
    if report["dead"]:
        out.print(f"[red]dead adapters: {len(report['dead'])}[/red]")
        for tower, groups in report["dead_groups"].items():
            for pattern, count in groups:
                out.print(escape(f"  {tower}: {pattern} x{count}"))
        for name in report["dead"]:
            out.print(escape(f"    {name}"))
    else:
        out.print("[green]no dead adapters[/green]")
    if report["missing"]:
        out.print(escape(f"incomplete adapters (lora_A or lora_B missing, counted dead): {len(report['missing'])}"))
        for name in report["missing"][:20]:
            out.print(escape(f"    {name}"))
    if report["non_finite"]:
        out.print(f"[red]adapters holding NaN or infinity: {len(report['non_finite'])}[/red]")
        for name in report["non_finite"][:20]:
            out.print(escape(f"    {name}"))
    if report["training_audit_note"]:
        out.print(escape(f"note: {report['training_audit_note']}"))
    if report["unverified"]:
        out.print(
            escape(
                f"note: {len(report['unverified'])} adapter(s) cannot be verified from the weights alone "
                f"(init_lora_weights={cfg.get('init_lora_weights')!r} starts with B @ A != 0 and the folder has no "
                "mm-trainer audit.json)"
            )
        )


def run(args: argparse.Namespace) -> int:
    """Run `mm-trainer audit`."""
    from ..audit.offline import AdapterDirError, audit_adapter_dir

    try:
        report = audit_adapter_dir(args.path)
    except AdapterDirError as err:
        return unusable("audit", str(err))
    except Exception as err:  # noqa: BLE001 - any other failure on this input is "unusable input", never exit 1
        return unusable("audit", f"{args.path}: cannot be audited ({describe(err)})")
    if args.json:
        json.dump(report, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        _print_text(report)
    return EXIT_CLEAN if report["clean"] else EXIT_DEAD
