"""The audit's verdict: `pass`, `warn` or `fail`, with one reason per rule that fired.

`fail` (the adapter should not be used or published as is; `push_to_hub` refuses it by default):

- `nothing_trained`: no adapter has status `trained`.
- `non_finite_loss`: a logged training loss is NaN or infinite.
- `non_finite_weights`: an adapter's A or B holds NaN or infinity.
- `weights_overflow`: an adapter's A or B is finite but so large (norm >= [`OVERFLOW_NORM`]) that float32
  arithmetic on it overflows: the run diverged.
- `dead_majority`: dead adapters (`never_fired`, `zero_grad`, `decay_only`) hold at least
  [`FAIL_DEAD_SHARE`] of the LoRA parameters.

`warn` (usable, but not what the parameter count promises, or training looked unhealthy):

- `dead_adapters`: any adapter `never_fired` or `zero_grad`.
- `decay_only`: any adapter moved by weight decay alone.
- `loss_not_decreasing`: the mean loss of the last quarter of the logged steps is not below that of the first
  quarter (only with enough points, see [`~mm_trainer.audit.dynamics`]).
- `loss_spikes` / `grad_norm_spikes`: spikes as defined in [`~mm_trainer.audit.dynamics`].
- `early_divergence`: the gradient norm grew at least 1000x within the first logged steps (see
  [`~mm_trainer.audit.dynamics`]).
- `init_record_lost`: the run resumed from a checkpoint without the init record, so movement was not checked.
- `init_record_partial`: the init record restored on resume lacks some adapters, whose movement was not checked.
- `section_error`: a feature's audit section raised.
- `section:<name>`: a feature section reports `"verdict": "warn"` or `"fail"` with its `"reasons"`; its
  level is taken over as is.

`pass`: none of the above.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from .status import ModuleAudit

FAIL_DEAD_SHARE = 0.5
"""Share of the LoRA parameters on dead adapters from which the verdict is `fail`."""

VERDICTS: tuple[str, ...] = ("pass", "warn", "fail")

OVERFLOW_NORM = math.sqrt(torch.finfo(torch.float32).max)
"""Norm from which squaring an element can overflow float32 (about 1.8e19): weights that large have diverged."""


def _reason(level: str, code: str, message: str) -> dict[str, str]:
    return {"level": level, "code": code, "message": message}


def _num(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def _towers(modules: list[ModuleAudit]) -> str:
    counts: dict[str, int] = {}
    for m in modules:
        counts[m.tower] = counts.get(m.tower, 0) + 1
    return ", ".join(f"{n} {t}" for t, n in counts.items())


def decide(
    modules: list[ModuleAudit],
    params: Mapping[str, Any],
    dynamics: Mapping[str, Any],
    sections: Mapping[str, Any],
    global_step: int,
    record_lost: bool = False,
    record_missing: list[str] | None = None,
) -> tuple[str, list[dict[str, str]]]:
    """Apply the rules of this module.

    Args:
        modules: The adapters' audits.
        params: The `params` section.
        dynamics: The `dynamics` section.
        sections: The feature sections (name -> dict).
        global_step: Optimizer steps taken.
        record_lost: Whether the init record was lost on resume.
        record_missing: Adapters the (restored) init record does not cover.

    Returns:
        The verdict and the reasons (`level`, `code`, `message`), fails first.
    """
    loss = dynamics.get("loss") or {}
    reasons = [
        *_nothing_trained(modules, global_step),
        *_non_finite_loss(loss),
        *_broken_weights(modules),
        *_dead_adapters(modules, params),
        *_loss_trend(loss),
        *_spikes(dynamics.get("spikes") or []),
        *_early_divergence(dynamics.get("early_divergence") or []),
        *_init_record(len(modules), record_lost, record_missing or []),
        *_section_reasons(sections),
    ]
    reasons.sort(key=lambda r: r["level"] != "fail")
    verdict = "fail" if any(r["level"] == "fail" for r in reasons) else "warn" if reasons else "pass"
    return verdict, reasons


def _nothing_trained(modules: list[ModuleAudit], global_step: int) -> list[dict[str, str]]:
    if not modules or any(m.status == "trained" for m in modules):
        return []
    message = f"none of the {len(modules)} adapters trained after {global_step} optimizer step(s)"
    return [_reason("fail", "nothing_trained", message)]


def _non_finite_loss(loss: Mapping[str, Any]) -> list[dict[str, str]]:
    steps = loss.get("non_finite_steps")
    return [_reason("fail", "non_finite_loss", f"non-finite training loss at step(s) {steps[:10]}")] if steps else []


def _broken_weights(modules: list[ModuleAudit]) -> list[dict[str, str]]:
    """Adapters holding NaN / infinity, and finite ones too large for float32 arithmetic."""
    reasons = []
    bad = [m.name for m in modules if not m.finite]
    if bad:
        reasons.append(
            _reason("fail", "non_finite_weights", f"{len(bad)} adapter(s) hold NaN or infinity, e.g. {bad[0]}")
        )
    huge = [m for m in modules if m.finite and max(_num(m.norm_a), _num(m.norm_b)) >= OVERFLOW_NORM]
    if huge:
        worst = max(max(_num(m.norm_a), _num(m.norm_b)) for m in huge)
        reasons.append(
            _reason(
                "fail",
                "weights_overflow",
                f"{len(huge)} adapter(s) diverged, e.g. {huge[0].name}: their weights are finite but so large (norm "
                f"up to {worst:.3g}) that float32 arithmetic on them overflows",
            )
        )
    return reasons


def _dead_adapters(modules: list[ModuleAudit], params: Mapping[str, Any]) -> list[dict[str, str]]:
    """A dead majority (fail), adapters that learned nothing and adapters moved by weight decay alone (warn)."""
    reasons = []
    trained = [m for m in modules if m.status == "trained"]
    dead = [m for m in modules if m.dead]
    dead_share = params.get("dead_share", 0.0)
    if trained and dead and dead_share >= FAIL_DEAD_SHARE:
        reasons.append(
            _reason(
                "fail",
                "dead_majority",
                f"dead adapters hold {dead_share:.1%} of the LoRA parameters (>= {FAIL_DEAD_SHARE:.0%}): "
                f"{params.get('lora_effective', 0):,} of {params.get('lora_nominal', 0):,} trained",
            )
        )
    unreached = [m for m in dead if m.status in ("never_fired", "zero_grad")]
    if unreached:
        never = sum(m.status == "never_fired" for m in unreached)
        reasons.append(
            _reason(
                "warn",
                "dead_adapters",
                f"{len(unreached)} adapter(s) learned nothing ({never} never fired, {len(unreached) - never} zero "
                f"gradient; {_towers(unreached)}); effective trainable parameters are "
                f"{params.get('effective_trainable', 0):,} of {params.get('nominal_trainable', 0):,} nominal",
            )
        )
    decayed = [m for m in dead if m.status == "decay_only"]
    if decayed:
        reasons.append(
            _reason(
                "warn",
                "decay_only",
                f"{len(decayed)} adapter(s) ({_towers(decayed)}) moved by weight decay alone: their weights changed "
                "but carry nothing from the data",
            )
        )
    return reasons


def _loss_trend(loss: Mapping[str, Any]) -> list[dict[str, str]]:
    if loss.get("decreasing") is not False:
        return []
    return [
        _reason(
            "warn",
            "loss_not_decreasing",
            f"mean loss of the last quarter of logged steps ({loss['last_quarter_mean']:.4g}) is not below "
            f"that of the first quarter ({loss['first_quarter_mean']:.4g})",
        )
    ]


def _spikes(spikes: list[Mapping[str, Any]]) -> list[dict[str, str]]:
    reasons = []
    for code, pick in (("loss_spikes", "loss"), ("grad_norm_spikes", "grad_norm")):
        mine = [s for s in spikes if s["metric"].split("/")[0] == pick]
        if mine:
            worst = max(mine, key=lambda s: s["ratio"])
            reasons.append(
                _reason(
                    "warn",
                    code,
                    f"{len(mine)} {pick} spike(s); worst {worst['metric']} at step {worst['step']}: "
                    f"{worst['value']:.4g} = {worst['ratio']:.1f}x the recent median",
                )
            )
    return reasons


def _early_divergence(diverged: list[Mapping[str, Any]]) -> list[dict[str, str]]:
    if not diverged:
        return []
    first = diverged[0]
    return [
        _reason(
            "warn",
            "early_divergence",
            f"{first['metric']} diverged early: {first['value']:.4g} at step {first['step']} = "
            f"{first['ratio']:.3g}x its first logged value ({first['baseline']:.4g})",
        )
    ]


def _init_record(adapters: int, lost: bool, missing: list[str]) -> list[dict[str, str]]:
    """Movement since init not checked: for some adapters (partial record) or for all (record lost)."""
    if lost:
        return [
            _reason(
                "warn",
                "init_record_lost",
                "resumed from a checkpoint without the audit's init record: statuses rest on gradient counts since "
                "the resume, movement since init was not checked",
            )
        ]
    if not missing:
        return []
    return [
        _reason(
            "warn",
            "init_record_partial",
            f"the audit's init record covers {adapters - len(missing)} of {adapters} adapters: movement "
            f"since init of {len(missing)} (e.g. {missing[0]}) was not checked",
        )
    ]


def _section_reasons(sections: Mapping[str, Any]) -> list[dict[str, str]]:
    """A feature section that failed to build, or that reports `warn` / `fail` with its reasons."""
    reasons = []
    for name, section in sections.items():
        if not isinstance(section, Mapping):
            continue
        if "error" in section and len(section) == 1:
            reasons.append(_reason("warn", "section_error", f"audit section {name!r} failed: {section['error']}"))
            continue
        level = section.get("verdict")
        if level in ("warn", "fail"):
            texts = section.get("reasons") or [f"section {name!r} reports {level}"]
            for text in texts if isinstance(texts, list) else [texts]:
                reasons.append(_reason(level, f"section:{name}", str(text)))
    return reasons
