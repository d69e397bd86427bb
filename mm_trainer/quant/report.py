"""What a 4-bit base holds, in words and numbers: the start-up report and the audit's `quantization` section."""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from .layers import dtype_name
from .loftq import LoftQResult

if TYPE_CHECKING:
    from .preparation import QuantizedBase

logger = logging.getLogger(__name__)


def loftq_totals(loftq: dict[str, LoftQResult]) -> dict[str, float]:
    """Summed errors over the LoftQ modules."""
    qlora = sum(r.qlora_error for r in loftq.values())
    total = sum(r.loftq_error for r in loftq.values())
    return {"qlora_error": qlora, "loftq_error": total, "ratio": total / qlora if qlora > 0 else 0.0}


def audit_section(self: QuantizedBase) -> dict[str, Any]:
    """The audit's `quantization` section (JSON-ready)."""
    section: dict[str, Any] = {
        "mode": self.mode,
        "method": self.method,
        **self.spec.to_dict(),
        "adapter_dtype": dtype_name(self.adapter_dtype),
        "init": self.init,
        "skip_towers": self.skip_towers,
        "skip_modules": self.skip_modules,
        "quantized_modules": len(self.quantized),
        "towers": self.tower_rows,
        "bytes": {
            **self.linear_bytes,
            "ratio": self.linear_bytes["resident_4bit"] / self.linear_bytes["bf16_equivalent"]
            if self.linear_bytes.get("bf16_equivalent")
            else None,
        },
        "kbit_preparation": self.kbit_preparation,
    }
    if self.loftq_iter:
        section["loftq"] = {
            "iter": self.loftq_iter,
            "modules": [r.to_dict() for r in self.loftq.values()],
            "total": loftq_totals(self.loftq),
        }
    return section


def print_report(self: QuantizedBase) -> None:
    """The start-up report: what went 4-bit, memory, and LoftQ's errors (per module in the log)."""
    from rich.table import Table

    from ..model.plan_report import console, human

    out = console()
    b = self.linear_bytes
    ratio = b["resident_4bit"] / b["bf16_equivalent"] if b.get("bf16_equivalent") else float("nan")
    q_params = sum(r["quantized_params"] for r in self.tower_rows)
    out.print(
        f"4-bit base ({self.spec.quant_type}, double quant={self.spec.double_quant}, compute "
        f"{dtype_name(self.spec.compute_dtype)}): {len(self.quantized)} linear layers, {human(q_params)} params, "
        f"{b['resident_4bit'] / 2**20:.1f} MiB ({ratio:.2f}x of bf16); full precision: "
        f"{', '.join(self.skip_modules) or 'nothing'}"
    )
    if not self.loftq:
        return
    for result in self.loftq.values():
        logger.info(
            "LoftQ %s: ||W-Q||_F=%.6g (QLoRA)  ||W-Q-sBA||_F=%.6g (LoftQ)  ratio=%.4f",
            result.name,
            result.qlora_error,
            result.loftq_error,
            result.ratio,
        )
    table = Table(
        title=f"LoftQ (iter={self.loftq_iter}): Frobenius error of the 4-bit base + initial adapter",
        title_justify="left",
    )
    for column in ("module", "r", "||W-Q|| (QLoRA)", "||W-Q-sBA|| (LoftQ)", "ratio"):
        table.add_column(column, justify="left" if column == "module" else "right")
    rows = list(self.loftq.values())
    if len(rows) > 48:  # group by layer kind (q_proj, ...) to keep the console readable; the audit has all
        grouped: dict[str, list[LoftQResult]] = defaultdict(list)
        for r in rows:
            grouped["*." + r.name.rsplit(".", 1)[-1]].append(r)
        for kind, group in grouped.items():
            q, lq = sum(r.qlora_error for r in group), sum(r.loftq_error for r in group)
            table.add_row(f"{kind} ({len(group)})", str(group[0].rank), f"{q:.4g}", f"{lq:.4g}", f"{lq / q:.4f}")
    else:
        for r in rows:
            table.add_row(r.name, str(r.rank), f"{r.qlora_error:.4g}", f"{r.loftq_error:.4g}", f"{r.ratio:.4f}")
    totals = loftq_totals(self.loftq)
    table.add_row(
        f"sum ({len(rows)} modules)",
        "",
        f"{totals['qlora_error']:.4g}",
        f"{totals['loftq_error']:.4g}",
        f"{totals['ratio']:.4f}",
    )
    out.print(table)
