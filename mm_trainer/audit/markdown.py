"""Render an audit dict as `AUDIT.md`: what a person reads before using or publishing an adapter."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from ..model.plan_report import human
from .dynamics import MIN_POINTS_FOR_TREND
from .naming import group_names
from .status import DEAD_STATUSES, STATUSES
from .verdict import FAIL_DEAD_SHARE

_BADGE = {"pass": "PASS", "warn": "WARN", "fail": "FAIL", "unknown": "UNKNOWN"}


def _num(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def md_table(header: list[str], rows: list[list[Any]], align: str | None = None) -> list[str]:
    align = align or "l" + "r" * (len(header) - 1)
    marks = {"l": "---", "r": "---:", "c": ":---:"}
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(marks[a] for a in align) + "|"]
    lines += ["| " + " | ".join(_num(c) if not isinstance(c, str) else c for c in row) + " |" for row in rows]
    return lines


def reason_lines(audit: Mapping[str, Any]) -> list[str]:
    """One bullet per reason, or a line saying that no rule fired."""
    reasons = audit.get("reasons") or []
    if not reasons:
        return ["No rule fired: every adapter trained and the dynamics look healthy."]
    return [f"- **{r['level']}** `{r['code']}`: {r['message']}" for r in reasons]


def tower_rows(audit: Mapping[str, Any]) -> list[list[Any]]:
    """Per tower: adapters, trained, dead, nominal and effective trainable parameters, base parameters."""
    rows = []
    for tower, r in audit["params"]["per_tower"].items():
        base = human(r["base_params"])
        if r.get("base_params_4bit"):
            base += f" ({human(r['base_params_4bit'])} 4-bit)"
        rows.append(
            [
                tower,
                r["adapters"],
                r["trained"],
                r["dead"],
                r["nominal_trainable"],
                r["effective_trainable"],
                base,
            ]
        )
    p = audit["params"]
    rows.append(
        [
            "**total**",
            sum(r["adapters"] for r in p["per_tower"].values()),
            sum(r["trained"] for r in p["per_tower"].values()),
            sum(r["dead"] for r in p["per_tower"].values()),
            p["nominal_trainable"],
            p["effective_trainable"],
            human(p["base_params"]),
        ]
    )
    return rows


TOWER_HEADER = ["tower", "adapters", "trained", "dead", "nominal trainable", "effective trainable", "base params"]


def dead_lines(modules: list[Mapping[str, Any]]) -> list[str]:
    """Dead adapters grouped by tower, status and name pattern, with the reason."""
    lines = []
    for status in DEAD_STATUSES:
        mine = [m for m in modules if m["status"] == status]
        towers = list(dict.fromkeys(m["tower"] for m in mine))
        for tower in towers:
            in_tower = [m for m in mine if m["tower"] == tower]
            for pattern, count in group_names(m["name"] for m in in_tower):
                lines.append(f"- {tower} · `{status}` · `{pattern}` ×{count}")
            lines.append(f"  - why: {in_tower[0]['reason']}")
    return lines


def _dynamics_lines(dyn: Mapping[str, Any], plots: list[str]) -> list[str]:
    lines: list[str] = []
    rows = []
    for key, label in (("loss", "train loss"), ("eval_loss", "eval loss")):
        s = dyn.get(key)
        if s:
            trend = {True: "decreasing", False: "not decreasing", None: f"n/a (< {MIN_POINTS_FOR_TREND} points)"}
            rows.append(
                [
                    label,
                    s["points"],
                    s["first"],
                    s["last"],
                    f"{_num(s.get('min'))} (step {s.get('min_step', '-')})",
                    trend[s["decreasing"]],
                ]
            )
    if rows:
        lines += md_table(["series", "points", "first", "last", "min", "trend"], rows, "lrrrrl")
    else:
        lines.append("No training loss was logged (set `logging_steps` to log it).")
    bands = []
    grad = dyn.get("grad_norm") or {}
    if grad.get("total"):
        bands.append(["grad_norm (all trainable, before clipping)", *_band(grad["total"])])
    for tower, b in (grad.get("per_tower") or {}).items():
        if b:
            bands.append([f"grad_norm/{tower} (adapters)", *_band(b)])
    aggregation = dyn.get("aggregation") or {}
    if aggregation and rows:
        lines += ["", f"Loss: {aggregation.get('loss')}."]
    if bands:
        lines += ["", f"Gradient-norm band ({aggregation.get('grad_norm', 'before clipping')}):", ""]
        lines += md_table(["series", "min", "p10", "median", "p90", "max", "points"], bands)
    spikes = dyn.get("spikes") or []
    lines.append("")
    if spikes:
        lines.append(f"Spikes ({len(spikes)}):")
        lines += [
            f"- step {s['step']}: {s['metric']} = {_num(s['value'])} ({s['ratio']:.1f}x the recent median "
            f"{_num(s['baseline'])})"
            for s in spikes[:20]
        ]
    else:
        lines.append("No spikes.")
    for d in (dyn.get("early_divergence") or [])[:10]:
        lines.append(
            f"- early divergence at step {d['step']}: {d['metric']} = {_num(d['value'])} ({_num(d['ratio'])}x its "
            f"first logged value {_num(d['baseline'])})"
        )
    for plot in plots:
        title = "Loss" if "loss" in plot else "Gradient norm per tower"
        lines += ["", f"![{title}]({plot})"]
    return lines


def _band(b: Mapping[str, Any]) -> list[Any]:
    return [b["min"], b["p10"], b["median"], b["p90"], b["max"], b["points"]]


def _targets_lines(targets: Mapping[str, Any] | None) -> list[str]:
    if not targets:
        return ["No target plan (the model was already a PEFT model, or the PEFT method takes no target_modules)."]
    lines = [
        f"Asked: `target_modules={targets['user_target_modules']!r}`, `target_towers={targets['target_towers']!r}`. "
        f"Resolved to {len(targets['kept'])} module(s), dropped {len(targets['dropped'])}; an unfiltered config "
        f"would have put {targets['wasted_share_unfiltered']:.1%} of its LoRA budget on modules the data never "
        "reaches.",
        "",
    ]
    rows = [
        [r["tower"], "yes" if r["reached"] else "no", r["matched"], r["kept"], r["dropped"], r["why"] or "-"]
        for r in targets["towers"]
    ]
    lines += md_table(["tower", "reached", "matched", "kept", "dropped", "why"], rows, "lcrrrl")
    for w in targets.get("warnings") or []:
        lines += ["", f"> warning: {w}"]
    return lines


def _kv_lines(data: Mapping[str, Any]) -> list[str]:
    scalars = [
        [f"`{k}`", f"`{json.dumps(v)}`" if isinstance(v, list) else _num(v)]
        for k, v in data.items()
        if not isinstance(v, Mapping)
    ]
    nested = {k: v for k, v in data.items() if isinstance(v, Mapping)}
    lines = md_table(["field", "value"], scalars, "ll") if scalars else []
    if nested:
        lines += ["", "```json", json.dumps(nested, indent=1)[:20000], "```"]
    return lines


def render_markdown(audit: Mapping[str, Any]) -> str:
    """`AUDIT.md` for an audit built by [`~mm_trainer.audit.report.build_audit`]."""
    verdict = audit["verdict"]
    lines = [
        "# mm-trainer audit",
        "",
        f"**Verdict: {_BADGE[verdict]}** · optimizer step {audit['global_step']} · {audit['created']}",
        "",
        *reason_lines(audit),
        "",
        "## Parameters",
        "",
        *md_table(TOWER_HEADER, tower_rows(audit)),
        "",
    ]
    p = audit["params"]
    lines.append(
        f"Effective trainable parameters: **{p['effective_trainable']:,}** of {p['nominal_trainable']:,} nominal "
        f"({p['effective_share']:.1%}). LoRA: {p['lora_effective']:,} of {p['lora_nominal']:,}."
    )
    if p["other_trainable"]:
        lines += ["", "Other trainable parameters:", ""]
        lines += md_table(
            ["name", "tower", "params", "moved"],
            [[f"`{o['name']}`", o["tower"], o["params"], o["moved"]] for o in p["other_trainable"]],
        )
    modules = audit["modules"]
    counts = audit["status_counts"]
    lines += ["", "## Adapter status", ""]
    lines += md_table(
        ["status", "adapters", "params"],
        [[f"`{s}`", counts[s], sum(m["params"] for m in modules if m["status"] == s)] for s in STATUSES],
    )
    dead = dead_lines(modules)
    lines += ["", *(["Adapters that learned nothing:", "", *dead] if dead else ["Every adapter trained."])]
    lines += [
        "",
        "## Training dynamics",
        "",
        *_dynamics_lines(audit["dynamics"], audit.get("files", {}).get("plots", [])),
    ]
    lines += ["", "## Targets", "", *_targets_lines(audit.get("targets"))]
    modality = audit.get("modality") or {}
    lines += ["", "## Data", ""]
    lines.append(
        f"Modalities: {', '.join(modality.get('modalities', []))}; "
        + (
            "declared by the user."
            if modality.get("declared")
            else f"{modality.get('rows_sampled', 0)} rows sampled, rows with media: {modality.get('rows_with', {})}."
        )
    )
    if audit.get("released_towers"):
        released = ", ".join(f"`{r['path']}` ({human(r['params'])})" for r in audit["released_towers"])
        lines += ["", f"Released towers (never reached by the data, weights freed): {released}."]
    if audit.get("adapter_config"):
        lines += ["", "## Adapter config", "", *_kv_lines(audit["adapter_config"])]
    lines += ["", "## Training", "", *_kv_lines(audit["training"])]
    for name, section in (audit.get("sections") or {}).items():
        lines += ["", f"## {name}", "", *_kv_lines(section if isinstance(section, Mapping) else {"value": section})]
    if audit.get("serving_clean"):
        lines += ["", "## Serving-clean save", "", *_kv_lines(audit["serving_clean"])]
    lines += [
        "",
        "## Versions",
        "",
        *md_table(["package", "version"], [[k, str(v)] for k, v in audit["versions"].items()], "ll"),
    ]
    lines += [
        "",
        "## How to read this",
        "",
        "- `trained`: got non-zero gradients and moved. `decay_only`: moved by weight decay alone (no non-zero "
        "gradient ever). `zero_grad`: ran, but its gradient was absent or zero (or it never moved). `never_fired`: "
        "its module never ran a training forward pass.",
        "- Movement is checked bit for bit against a fingerprint of A and B taken right after PEFT's init, so "
        "PiSSA / OLoRA / LoftQ starts (B != 0) are judged right.",
        f"- `fail`: nothing trained, a non-finite loss or weight, or dead adapters holding >= {FAIL_DEAD_SHARE:.0%} "
        "of the LoRA parameters. `warn`: any dead adapter, decay-only adapters, a loss that does not decrease, "
        "spikes.",
        "",
    ]
    return "\n".join(lines)
