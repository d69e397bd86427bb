"""`mm-trainer compare RUN_DIR [RUN_DIR ...]`: loss and per-tower gradient-norm curves of audited runs, side by side."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .errors import describe, unusable

COLUMNS = (
    ("run", "run"),
    ("steps", "steps"),
    ("final_loss", "final loss"),
    ("min_loss", "min loss"),
    ("grad_norm_median", "grad norm median"),
    ("grad_norm_p10", "p10"),
    ("grad_norm_p90", "p90"),
    ("peak_grad_norm", "peak grad norm"),
    ("peak_grad_step", "at step"),
    ("spikes", "spikes"),
    ("effective_trainable", "effective params"),
    ("verdict", "verdict"),
)


def add_parser(sub: Any) -> None:
    """Register the `compare` sub-command."""
    p = sub.add_parser(
        "compare",
        help="Compare finished runs from their audits: one PNG of loss and per-tower gradient norm, and a table.",
        description="Read audit.json of each run directory; draw loss and per-tower adapter gradient norm over "
        "optimizer steps (one line per run, labelled by init scheme / quantization / IMoD) into one PNG and print a "
        "table of final and minimum loss, gradient-norm band after warm-up, spikes, effective trainable params and "
        "verdict.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="Output directories of finished runs.")
    p.add_argument("--out", default="compare.png", help="PNG to write (default: compare.png).")
    p.add_argument("--json", action="store_true", help="Print the table as JSON.")
    p.set_defaults(func=run)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def run(args: argparse.Namespace) -> int:
    """Run `mm-trainer compare`."""
    from ..audit.compare import RunDirError, compare
    from ..utils.jsonable import jsonable

    try:
        result = compare(args.runs, args.out)
    except RunDirError as err:
        return unusable("compare", str(err))
    except Exception as err:  # noqa: BLE001 - any failure on these inputs is "unusable input"
        return unusable("compare", f"{' '.join(args.runs)}: cannot be compared ({describe(err)})")
    if args.json:
        json.dump(jsonable(result), sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    from rich.table import Table

    from ..model.plan_report import console

    table = Table(title="mm-trainer compare", title_justify="left")
    for _, header in COLUMNS:
        table.add_column(header, justify="left" if header in ("run", "verdict") else "right")
    for row in result["runs"]:
        table.add_row(*(_fmt(row[key]) for key, _ in COLUMNS))
    out = console()
    out.print(table)
    out.print(f"plot: {result['plot']}")
    return 0
