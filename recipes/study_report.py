"""Statistics, markdown table and picture of a multi-seed study (recipes/imod_study.py): mean and 95% interval."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# Two-sided 95% quantiles of Student's t distribution, t(0.975, df), df = 1..30 (standard table values).
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """Mean and half-width of its 95% confidence interval (Student's t over seeds; 0 for a single value)."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("mean_ci needs at least one value.")
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, 0.0
    df = len(values) - 1
    t = _T975[df - 1] if df <= len(_T975) else 1.96
    return mean, t * statistics.stdev(values) / math.sqrt(len(values))


def fmt(values: Sequence[float], percent: bool = True) -> str:
    """``mean ± half-width`` of ``values`` (as percentages by default)."""
    mean, half = mean_ci(values)
    scale, unit = (100.0, "%") if percent else (1.0, "")
    if len(values) < 2:
        return f"{mean * scale:.1f}{unit}" if percent else f"{mean:.3f}"
    return f"{mean * scale:.1f} ± {half * scale:.1f}{unit}" if percent else f"{mean:.3f} ± {half:.3f}"


def rate_trajectory(runs: Sequence[Mapping[str, Any]]) -> tuple[list[int], list[float], list[float]]:
    """Steps measured in every run, and the mean and 95% half-width of the dominance rate at each."""
    steps = sorted(set.intersection(*(set(r["rates"]) for r in runs))) if runs else []
    means, halves = [], []
    for step in steps:
        mean, half = mean_ci([r["rates"][step] for r in runs])
        means.append(mean)
        halves.append(half)
    return steps, means, halves


def late_rate(run: Mapping[str, Any]) -> float:
    """Mean dominance rate of one run over the measured steps of its second half."""
    steps = sorted(run["rates"])
    late = [run["rates"][s] for s in steps if s > steps[-1] / 2] or [run["rates"][steps[-1]]]
    return statistics.fmean(late)


COLUMNS: tuple[tuple[str, str], ...] = (
    ("acc_decorrelated", "accuracy, shortcut decorrelated"),
    ("acc_holds", "accuracy, shortcut holds"),
    ("follows_wording", "answers the wording's colour (decorrelated set)"),
)


def markdown_table(arms: Mapping[str, Sequence[Mapping[str, Any]]], labels: Mapping[str, str]) -> str:
    """One row per arm: seeds, dominance rate at step 1 / last step / second-half mean, accuracies (mean ± 95%)."""
    head = ["arm", "seeds", "rate, step 1", "rate, last step", "rate, 2nd half"] + [c[1] for c in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm, runs in arms.items():
        first = [r["rates"][min(r["rates"])] for r in runs]
        last = [r["rates"][max(r["rates"])] for r in runs]
        cells = [labels.get(arm, arm), str(len(runs)), fmt(first), fmt(last), fmt([late_rate(r) for r in runs])]
        cells += [fmt([r[key] for r in runs]) for key, _ in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def paired_table(arms: Mapping[str, Sequence[Mapping[str, Any]]], labels: Mapping[str, str], reference: str) -> str:
    """Per arm, its difference to ``reference`` paired by seed (same seed: same data order, init, masks' seed).

    Seeds differ far more from each other than arms do, so the paired difference is the sharper comparison.
    """
    if reference not in arms:
        return ""
    by_seed = {r["seed"]: r for r in arms[reference]}
    head = ["arm − " + labels.get(reference, reference), "seeds", "rate, 2nd half", "rate, last step"]
    head += [c[1] for c in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm, runs in arms.items():
        pairs = [(r, by_seed[r["seed"]]) for r in runs if r["seed"] in by_seed]
        if arm == reference or not pairs:
            continue
        cells = [labels.get(arm, arm), str(len(pairs)), fmt([late_rate(a) - late_rate(b) for a, b in pairs])]
        cells.append(fmt([a["rates"][max(a["rates"])] - b["rates"][max(b["rates"])] for a, b in pairs]))
        cells += [fmt([a[key] - b[key] for a, b in pairs]) for key, _ in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def draw(
    arms: Mapping[str, Sequence[Mapping[str, Any]]],
    labels: Mapping[str, str],
    path: str | Path,
    title: str = "",
    references: Mapping[str, float] | None = None,
) -> Path:
    """Left: the dominance rate over steps (mean, shaded 95% interval); right: accuracy bars with 95% intervals.

    ``references`` draws horizontal lines on the accuracy panel (e.g. the vision-only probe, chance).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 4.8), dpi=90)
    FigureCanvasAgg(fig)
    ax_rate, ax_acc = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.25, 1]})
    for arm, runs in arms.items():
        steps, means, halves = rate_trajectory(runs)
        line = ax_rate.plot(steps, means, marker=".", label=f"{labels.get(arm, arm)} (n={len(runs)})")[0]
        lo = [m - h for m, h in zip(means, halves)]
        hi = [m + h for m, h in zip(means, halves)]
        ax_rate.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.15)
    ax_rate.set_xlabel("optimizer step")
    ax_rate.set_ylabel("Non-Text Dominance Rate")
    ax_rate.set_title("dominance rate (mean, 95% interval over seeds)")
    ax_rate.grid(alpha=0.3)
    ax_rate.legend(fontsize=8)

    names = list(arms)
    width = 0.8 / max(1, len(COLUMNS) - 1)
    for k, (key, label) in enumerate(COLUMNS[:2]):
        stats = [mean_ci([r[key] for r in arms[a]]) for a in names]
        xs = [i + (k - 0.5) * width for i in range(len(names))]
        ax_acc.bar(xs, [s[0] for s in stats], width, yerr=[s[1] for s in stats], capsize=3, label=label)
    for name, value in (references or {}).items():
        ax_acc.axhline(value, linestyle="--", linewidth=1, color="grey")
        ax_acc.text(len(names) - 0.5, value, f" {name}", va="bottom", ha="right", fontsize=7, color="dimgray")
    ax_acc.set_xticks(range(len(names)), [labels.get(a, a) for a in names], rotation=20, ha="right", fontsize=8)
    ax_acc.set_ylim(0, 1.05)
    ax_acc.set_ylabel("accuracy")
    ax_acc.set_title("final accuracy (mean, 95% interval over seeds)")
    ax_acc.legend(fontsize=8, loc="lower left")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path
