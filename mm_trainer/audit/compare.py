"""Compare finished runs from their audits: loss and per-tower gradient-norm curves in one PNG, plus a table.

Each run directory must hold the `audit.json` that [`~mm_trainer.MMSFTTrainer`] writes at `save_model`.
Curves are drawn against the optimizer step, so runs of different lengths and logging intervals line up.

Table columns (fixed rules, so tables of different studies compare):

- `final_loss` / `min_loss`: the last logged training loss (NaN when the run ended diverged: the audit records
  the loss before transformers' `logging_nan_inf_filter`) and the smallest finite one.
- `grad_norm_p10` / `grad_norm_median` / `grad_norm_p90`: the band of the Trainer's total gradient norm (before
  clipping) after warm-up. Warm-up is the first `max(warmup_steps, ceil(10% of the run's last step))` steps: LoRA
  gradients start near zero (B = 0) or high (PiSSA), and the band should describe the settled run.
- `peak_grad_norm` / `peak_grad_step`: the largest logged total gradient norm over the whole run (early peaks are
  what the LoRA-init study compares).
- `spikes`: loss / gradient-norm spikes the audit found (its rule: a value >= 1.5x (loss) or 5x (gradient norm) the
  median of the preceding values).
- `effective_trainable` / `nominal_trainable` and `verdict`: from the audit.

Every gradient-norm number and curve (table, plot) is the same series: the value at each logged optimizer step, before
clipping ([`~mm_trainer.audit.dynamics.GRAD_NORM_AGGREGATION`]); the plot draws the Trainer's total norm ("all
trainable", whose peak the table reports) above the per-tower ones.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..utils.atomic import atomic_write_bytes
from .dynamics import GRAD_NORM_AGGREGATION, band

AUDIT_FILE = "audit.json"
WARMUP_SHARE = 0.10
MAX_AUDIT_BYTES = 256 * 2**20
"""An `audit.json` larger than this is refused unread (a training audit is a few hundred KB)."""


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
    """`init scheme` + `+qlora` (4-bit base without LoftQ) + `+imod`, e.g. `pissa`, `lora+qlora+imod`."""
    training = audit.get("training") or {}
    label = init_scheme(audit)
    if training.get("quantization") == "qlora":
        label += "+qlora"
    if training.get("imod"):
        label += "+imod"
    return label


def _points(raw: Any, path: Path, key: str) -> list[tuple[int, float]]:
    """`[[step, value], ...]` as numbers (`"nan"` / `"inf"` strings as floats); refuses any other shape."""
    if not isinstance(raw, list):
        raise RunDirError(f"{path}: {AUDIT_FILE} dynamics.series.{key} is a {type(raw).__name__}, not a list.")
    out = []
    for item in raw:
        ok = isinstance(item, (list, tuple)) and len(item) == 2
        step, value = item if ok else (None, None)
        if isinstance(value, str) and value in ("nan", "inf", "-inf"):
            value = float(value)
        if not (ok and _is_num(step) and _is_num(value)):
            raise RunDirError(f"{path}: {AUDIT_FILE} dynamics.series.{key} holds {str(item)[:40]}, not [step, value].")
        out.append((int(step), float(value)))
    return out


def _is_num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def load_run(path: str | Path) -> Run:
    """Read one run directory's audit.

    Raises:
        RunDirError: The directory or its `audit.json` is missing or unreadable; the message names the directory.
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
        if audit_path.stat().st_size > MAX_AUDIT_BYTES:
            raise RunDirError(f"{path}: {AUDIT_FILE} is {audit_path.stat().st_size:,} bytes, too large for an audit.")
        audit = json.loads(audit_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise RunDirError(f"{path}: {AUDIT_FILE} is unreadable ({type(err).__name__}: {err}).") from err
    if not isinstance(audit, dict):
        raise RunDirError(f"{path}: {AUDIT_FILE} holds a JSON {type(audit).__name__}, not an audit object.")
    if audit.get("kind") not in (None, "training"):
        raise RunDirError(f"{path}: {AUDIT_FILE} is not a training audit (kind={audit.get('kind')!r}).")
    for key in ("dynamics", "params", "training", "adapter_config"):
        if audit.get(key) is not None and not isinstance(audit[key], dict):
            raise RunDirError(f"{path}: {AUDIT_FILE} `{key}` is a {type(audit[key]).__name__}, not an object.")
    raw = (audit.get("dynamics") or {}).get("series") or {}
    if not isinstance(raw, dict):
        raise RunDirError(f"{path}: {AUDIT_FILE} dynamics.series is a {type(raw).__name__}, not an object.")
    series = {k: _points(v, path, k) for k, v in raw.items() if k == "loss" or k.startswith("grad_norm")}
    if not isinstance((audit.get("dynamics") or {}).get("spikes") or [], list):
        raise RunDirError(f"{path}: {AUDIT_FILE} dynamics.spikes is not a list.")
    try:
        label = run_label(audit)
    except (AttributeError, TypeError) as err:
        raise RunDirError(f"{path}: {AUDIT_FILE} has an unexpected layout ({err}).") from err
    return Run(path=path, label=label, audit=audit, series=series)


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
    """Steps excluded from the gradient-norm band: `max(warmup_steps, ceil(10% of the last logged step))`."""
    last = max((s for s, _ in run.series.get("loss", []) + run.series.get("grad_norm", [])), default=0)
    configured = int((run.audit.get("training") or {}).get("warmup_steps") or 0)
    return max(configured, math.ceil(WARMUP_SHARE * last))


def summary_row(run: Run) -> dict[str, Any]:
    """The table row of one run (see the module docstring for each column's rule)."""
    raw_loss = run.series.get("loss", [])
    loss = _finite(raw_loss)
    grad = _finite(run.series.get("grad_norm", []))
    skip = warmup_steps(run)
    settled = band(v for s, v in grad if s > skip) or band(v for _, v in grad)  # the audit's own percentiles
    params = run.audit.get("params") or {}
    peak = max(grad, key=lambda p: p[1]) if grad else None
    row: dict[str, Any] = {
        "run": run.label,
        "path": str(run.path),
        "steps": run.audit.get("global_step"),
        "final_loss": raw_loss[-1][1] if raw_loss else None,
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
        The matplotlib `Figure` (saved to `out`).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    towers = sorted({t for run in runs for t in run.towers})
    total = ["grad_norm"] if any(run.series.get("grad_norm") for run in runs) else []
    panels = ["loss", *total, *[f"grad_norm/{t}" for t in towers]]
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
            what = "all trainable (Trainer's grad_norm)" if key == "grad_norm" else f"{key.split('/', 1)[1]} tower"
            ax.set_ylabel("grad norm")
            ax.set_title(f"Gradient norm, {what}: {GRAD_NORM_AGGREGATION}", fontsize="medium")
            if plotted and min(plotted) > 0:
                ax.set_yscale("log")
            elif any(v > 0 for v in plotted):  # a zero (dead tower) cannot sit on a log axis
                ax.set_yscale("symlog", linthresh=min(v for v in plotted if v > 0))
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].legend(loc="upper right", fontsize="small")
    axes[-1].set_xlabel("optimizer step")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    atomic_write_bytes(out, buffer.getvalue())
    return fig


def compare(paths: Sequence[str | Path], out: str | Path | None = None) -> dict[str, Any]:
    """Load, summarise and (when `out` is given) plot runs.

    Returns:
        `{"runs": [row, ...], "plot": str | None}`.
    """
    if out is not None:
        folder = Path(out).parent
        if not folder.is_dir():
            raise RunDirError(f"--out {out}: the folder {folder} does not exist; create it or write elsewhere.")
        if Path(out).is_dir():
            raise RunDirError(f"--out {out} is a directory; give a file name such as {Path(out) / 'compare.png'}.")
    runs = load_runs(paths)
    if out is not None:
        draw(runs, out)
    return {"runs": [summary_row(r) for r in runs], "plot": str(out) if out is not None else None}
