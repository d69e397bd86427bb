"""Compare finished runs from their audits: loss and per-tower gradient-norm curves in one PNG, plus a table.

Each run directory must hold the ``audit.json`` that :class:`~mm_trainer.MMSFTTrainer` writes at ``save_model``.
Curves are drawn against the optimizer step, so runs of different lengths and logging intervals line up.

Table columns (fixed rules, so tables of different studies compare):

- ``final_loss`` / ``min_loss``: the last and the smallest logged training loss.
- ``grad_norm_p10`` / ``grad_norm_median`` / ``grad_norm_p90``: the band of the Trainer's total gradient norm (before
  clipping) after warm-up. Warm-up is the first ``max(warmup_steps, ceil(10% of the run's last step))`` steps: LoRA
  gradients start near zero (B = 0) or high (PiSSA), and the band should describe the settled run.
- ``peak_grad_norm`` / ``peak_grad_step``: the largest logged total gradient norm over the whole run (early peaks are
  what the LoRA-init study compares).
- ``spikes``: loss / gradient-norm spikes the audit found (its rule: a value >= 1.5x (loss) or 5x (gradient norm) the
  median of the preceding values).
- ``effective_trainable`` / ``nominal_trainable`` and ``verdict``: from the audit.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .audit.dynamics import band

AUDIT_FILE = "audit.json"
WARMUP_SHARE = 0.10


class RunDirError(ValueError):
    """A run directory that cannot be compared (no audit, unreadable audit)."""


@dataclass
class Run:
    """One audited run: its label, curves and summary numbers."""

    path: Path
    label: str
    audit: dict[str, Any]
    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    @property
    def towers(self) -> list[str]:
        """Towers with a gradient-norm curve."""
        return sorted(k.split("/", 1)[1] for k in self.series if k.startswith("grad_norm/"))


def init_scheme(audit: dict[str, Any]) -> str:
    """The LoRA init scheme of a run, from its adapter config and quantization settings."""
    config = audit.get("adapter_config") or {}
    training = audit.get("training") or {}
    init = config.get("init_lora_weights", True)
    if training.get("quantization") == "loftq" or init == "loftq":
        return "loftq"
    if init in (True, "true", "True", "gaussian", None):
        return "lora"
    if isinstance(init, str) and init.startswith("pissa"):
        return "pissa"
    return str(init)


def run_label(audit: dict[str, Any]) -> str:
    """``init scheme`` + ``+qlora`` (4-bit base without LoftQ) + ``+imod``, e.g. ``pissa``, ``lora+qlora+imod``."""
    training = audit.get("training") or {}
    label = init_scheme(audit)
    if training.get("quantization") == "qlora":
        label += "+qlora"
    if training.get("imod"):
        label += "+imod"
    return label


def _points(raw: Any) -> list[tuple[int, float]]:
    out = []
    for item in raw or []:
        step, value = item
        value = float(value) if not isinstance(value, str) else float("nan")
        out.append((int(step), value))
    return out


def load_run(path: str | Path) -> Run:
    """Read one run directory's audit.

    Raises:
        RunDirError: The directory or its ``audit.json`` is missing or unreadable; the message names the directory.
    """
    path = Path(path)
    if not path.is_dir():
        raise RunDirError(f"{path}: not a directory. Pass the output_dir of a finished MMSFTTrainer run.")
    audit_path = path / AUDIT_FILE
    if not audit_path.is_file():
        raise RunDirError(
            f"{path}: no {AUDIT_FILE} in this run directory. Compare runs trained with MMSFTTrainer (audit=True) "
            "after `trainer.save_model()`, or run `mm-trainer audit` on adapters trained elsewhere."
        )
    try:
        audit = json.loads(audit_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise RunDirError(f"{path}: {AUDIT_FILE} is unreadable ({err}).") from err
    if audit.get("kind") not in (None, "training"):
        raise RunDirError(f"{path}: {AUDIT_FILE} is not a training audit (kind={audit.get('kind')!r}).")
    raw = ((audit.get("dynamics") or {}).get("series")) or {}
    series = {k: _points(v) for k, v in raw.items() if k == "loss" or k.startswith("grad_norm")}
    return Run(path=path, label=run_label(audit), audit=audit, series=series)


def load_runs(paths: Sequence[str | Path]) -> list[Run]:
    """Read several runs; labels that collide get the directory name appended."""
    runs = [load_run(p) for p in paths]
    counts: dict[str, int] = {}
    for run in runs:
        counts[run.label] = counts.get(run.label, 0) + 1
    for run in runs:
        if counts[run.label] > 1:
            run.label = f"{run.label} ({run.path.name})"
    return runs


def _finite(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    return [(s, v) for s, v in points if math.isfinite(v)]


def warmup_steps(run: Run) -> int:
    """Steps excluded from the gradient-norm band: ``max(warmup_steps, ceil(10% of the last logged step))``."""
    last = max((s for s, _ in run.series.get("loss", []) + run.series.get("grad_norm", [])), default=0)
    configured = int((run.audit.get("training") or {}).get("warmup_steps") or 0)
    return max(configured, math.ceil(WARMUP_SHARE * last))


def summary_row(run: Run) -> dict[str, Any]:
    """The table row of one run (see the module docstring for each column's rule)."""
    loss = _finite(run.series.get("loss", []))
    grad = _finite(run.series.get("grad_norm", []))
    skip = warmup_steps(run)
    settled = band(v for s, v in grad if s > skip) or band(v for _, v in grad)  # the audit's own percentiles
    params = run.audit.get("params") or {}
    peak = max(grad, key=lambda p: p[1]) if grad else None
    row: dict[str, Any] = {
        "run": run.label,
        "path": str(run.path),
        "steps": run.audit.get("global_step"),
        "final_loss": loss[-1][1] if loss else None,
        "min_loss": min(v for _, v in loss) if loss else None,
        "warmup_steps": skip,
        "grad_norm_p10": settled["p10"] if settled else None,
        "grad_norm_median": settled["median"] if settled else None,
        "grad_norm_p90": settled["p90"] if settled else None,
        "peak_grad_norm": peak[1] if peak else None,
        "peak_grad_step": peak[0] if peak else None,
        "spikes": len((run.audit.get("dynamics") or {}).get("spikes") or []),
        "effective_trainable": params.get("effective_trainable"),
        "nominal_trainable": params.get("nominal_trainable"),
        "verdict": run.audit.get("verdict"),
    }
    return row


def draw(runs: Sequence[Run], out: str | Path) -> Any:
    """One PNG: the loss and, per tower, the adapters' gradient norm over optimizer steps, a line per run.

    Returns:
        The matplotlib ``Figure`` (saved to ``out``).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    towers = sorted({t for run in runs for t in run.towers})
    panels = ["loss", *[f"grad_norm/{t}" for t in towers]]
    fig = Figure(figsize=(7.5, 2.8 * len(panels)), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for ax, key in zip(axes, panels):
        plotted: list[float] = []
        for run, color in zip(runs, colors):
            points = _finite(run.series.get(key, []))
            if not points:
                continue
            steps, values = zip(*points)
            ax.plot(steps, values, label=run.label, color=color, marker="." if len(steps) < 40 else None)
            plotted.extend(values)
        if key == "loss":
            ax.set_ylabel("training loss")
            ax.set_title("Loss")
        else:
            tower = key.split("/", 1)[1]
            ax.set_ylabel("grad norm")
            ax.set_title(f"Adapter gradient norm: {tower} tower (before clipping)")
            if plotted and min(plotted) > 0:
                ax.set_yscale("log")
            elif any(v > 0 for v in plotted):  # a zero (dead tower) cannot sit on a log axis
                ax.set_yscale("symlog", linthresh=min(v for v in plotted if v > 0))
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].legend(loc="upper right", fontsize="small")
    axes[-1].set_xlabel("optimizer step")
    fig.savefig(out)
    return fig


def compare(paths: Sequence[str | Path], out: str | Path | None = None) -> dict[str, Any]:
    """Load, summarise and (when ``out`` is given) plot runs.

    Returns:
        ``{"runs": [row, ...], "plot": str | None}``.
    """
    runs = load_runs(paths)
    if out is not None:
        draw(runs, out)
    return {"runs": [summary_row(r) for r in runs], "plot": str(out) if out is not None else None}
