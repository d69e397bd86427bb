"""Render a [`~mm_trainer.model.targets.TargetPlan`] as a `rich` table (trainer start-up and `mm-trainer plan`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.table import Table

from .peft_names import peft_method
from .targets import TargetPlan


def human(n: float) -> str:
    """Compact count: 1234 -> 1.2K, 7.1e9 -> 7.1B."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return str(int(n))


def _budget(plan: TargetPlan) -> str:
    """What the parameter columns count: LoRA at the plan's rank (an estimate for other methods)."""
    method = peft_method(plan.peft_config)
    return (
        f"LoRA r={plan.rank}" if method == "LoRA" else f"{method}; parameter columns estimated as LoRA r={plan.rank}"
    )


def human_bytes(n: float) -> str:
    """Compact size: 1536 -> 1.5 KiB, 7.5e9 -> 7.0 GiB."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def plan_table(plan: TargetPlan, title: str | None = None) -> Table:
    """The per-tower table: linear layers, base params, LoRA params kept / dropped at the plan's rank, and why."""
    table = Table(title=title or f"mm-trainer target plan ({_budget(plan)})", title_justify="left")
    table.add_column("tower")
    table.add_column("linear", justify="right")
    table.add_column("base params", justify="right")
    table.add_column("reached", justify="center")
    table.add_column("matched", justify="right")
    table.add_column("kept", justify="right")
    table.add_column("LoRA kept", justify="right")
    table.add_column("dropped", justify="right")
    table.add_column("LoRA dropped", justify="right")
    table.add_column("why")
    for row in plan.tower_rows():
        table.add_row(
            row["tower"],
            str(row["linear_modules"]),
            human(row["base_params"]),
            "yes" if row["reached"] else "no",
            str(row["matched"]),
            str(row["kept"]),
            human(row["lora_params_kept"]),
            str(row["dropped"]),
            human(row["lora_params_dropped"]),
            row["why"],
        )
    return table


def plan_summary(plan: TargetPlan) -> str:
    """One line on the budget an unfiltered config would waste."""
    total = sum(d.lora_params for d in plan.decisions)
    dead = sum(d.lora_params for d in plan.decisions if d.dead)
    kept = sum(d.lora_params for d in plan.decisions if d.kept)
    unit = "LoRA params" if peft_method(plan.peft_config) == "LoRA" else "params if it were LoRA"
    return (
        f"{peft_method(plan.peft_config)} target_modules={plan.user_target_modules!r} matches {len(plan.decisions)} modules "
        f"({human(total)} {unit}); {human(dead)} ({plan.wasted_share():.1%}) would sit on modules the data never "
        f"reaches. Adapting {len(plan.kept())} modules, {human(kept)} {unit}."
    )


def console() -> Console:
    """A console wide enough for the plan table also when output goes to a file or a pipe."""
    probe = Console()
    return probe if probe.is_terminal else Console(width=160)


def print_plan(plan: TargetPlan, out: Console | None = None, title: str | None = None) -> None:
    """Print the table, the summary and the plan's warnings."""
    out = out or console()
    out.print(plan_table(plan, title))
    out.print(plan_summary(plan))
    for warning in plan.warnings:
        out.print(f"[yellow]warning:[/yellow] {warning}")


PEAK_DTYPES: dict[str, int] = {"bfloat16": 2, "float16": 2, "float32": 4}
"""Bytes per parameter of the load dtypes the peak-memory line reports."""


@dataclass(frozen=True)
class ParamMemory:
    """Parameters a run holds at its peak, with and without the unreached towers.

    Attributes:
        total_params: Every parameter of the model (tied ones once).
        released_params: Parameters of the towers a text-only run releases ([`~mm_trainer.model.release.releasable_roots`]).
        released_roots: Module paths of those towers.
    """

    total_params: int
    released_params: int
    released_roots: tuple[str, ...]

    def peak_bytes(self) -> dict[str, dict[str, int]]:
        """Per dtype: `full` (a model instance, or a load that keeps the towers) and `path_load` (a path or Hub id
        given to `MMSFTTrainer`, whose load never materializes the released towers)."""
        return {
            dtype: {"full": self.total_params * size, "path_load": (self.total_params - self.released_params) * size}
            for dtype, size in PEAK_DTYPES.items()
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "total_params": self.total_params,
            "released_params": self.released_params,
            "released_roots": list(self.released_roots),
            "peak_bytes": self.peak_bytes(),
        }


def param_memory(model: Any, plan: TargetPlan) -> ParamMemory:
    """The [`ParamMemory`] of `model` (real or on the meta device) under `plan`."""
    from .release import releasable_roots

    roots = tuple(path for path, _ in releasable_roots(plan))
    total = sum(p.numel() for p in model.parameters())
    released = sum(p.numel() for root in roots for p in model.get_submodule(root).parameters())
    return ParamMemory(total, released, roots)


def print_param_memory(memory: ParamMemory, out: Console | None = None) -> None:
    """One line with the expected peak parameter memory per dtype; when towers are released, the note (once) that a
    model instance cannot avoid holding them, and the path-based fix."""
    out = out or console()
    peak = memory.peak_bytes()
    if not memory.released_params:
        cells = ", ".join(f"{dtype} {human_bytes(v['full'])}" for dtype, v in peak.items())
        out.print(f"Peak parameter memory: {cells}.")
        return
    cells = ", ".join(
        f"{dtype} {human_bytes(v['path_load'])} (instance: {human_bytes(v['full'])})" for dtype, v in peak.items()
    )
    out.print(
        f"Peak parameter memory, model given as a path (unreached {', '.join(memory.released_roots)} never loaded, "
        f"{human(memory.released_params)} params): {cells}."
    )
    out.print(
        "note: a model instance passed to MMSFTTrainer was built in full, so its peak holds the unreached towers "
        'even though they are released; pass the model\'s path or Hub id instead (`MMSFTTrainer(model="<path>", '
        "...)`) to never load them."
    )
