"""Audit building blocks without training: fingerprints, status rules, dynamics, verdict, names, card, sections."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mm_trainer.audit.card import CARD_BEGIN, add_to_card
from mm_trainer.audit.dynamics import band, loss_summary, spikes, training_dynamics
from mm_trainer.audit.naming import group_names
from mm_trainer.audit.record import InitRecord, fingerprint
from mm_trainer.audit.report import run_sections
from mm_trainer.audit.status import ModuleAudit, classify
from mm_trainer.audit.verdict import FAIL_DEAD_SHARE, decide
from mm_trainer.model.towers import map_towers, tower_from_name
from mm_trainer.utils.jsonable import jsonable
from tests.kit import FAMILIES, tiny_model


# ------------------------------------------------------------------------------------------------------------------
# Fingerprints
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fingerprint_sees_a_single_bit(dtype):
    t = torch.randn(257, 64).to(dtype)
    before = fingerprint(t)
    flipped = t.clone()
    bits = flipped.view(torch.int16 if dtype != torch.float32 else torch.int32)
    bits[100, 3] ^= 1  # lowest mantissa bit of one element
    after = fingerprint(flipped)
    assert after.digest != before.digest
    assert fingerprint(t.clone()).digest == before.digest
    assert after.numel == before.numel == 257 * 64


def test_fingerprint_zero_and_non_finite():
    zeros = fingerprint(torch.zeros(4, 8))
    assert zeros.all_zero and zeros.norm == 0.0
    tiny = fingerprint(torch.full((4, 8), 1e-30))  # squares underflow in fp32: the norm is 0, the count is not
    assert not tiny.all_zero
    assert fingerprint(-torch.zeros(3)).all_zero
    assert not fingerprint(torch.tensor([1.0, float("nan")])).finite


def test_init_record_round_trip_and_lost():
    from mm_trainer.model.adapters import LoraAdapter

    a, b = torch.nn.Parameter(torch.randn(4, 16)), torch.nn.Parameter(torch.zeros(8, 4))
    adapter = LoraAdapter("m.q_proj", "language", torch.nn.Identity(), a, b)
    record = InitRecord([adapter])
    restored = InitRecord([])
    restored.load_state_dict(json.loads(json.dumps(record.state_dict())))
    assert restored.restored and not restored.compare([adapter])["m.q_proj"].moved
    with torch.no_grad():
        b[0, 0] = 1e-12
    move = restored.compare([adapter])["m.q_proj"]
    assert move.moved_b and not move.moved_a and not move.no_op and move.init_b.all_zero
    lost = InitRecord([adapter])
    lost.load_state_dict(None)
    assert lost.lost and lost.compare([adapter]) == {}


# ------------------------------------------------------------------------------------------------------------------
# Status rules
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fired", "steps", "moved", "status"),
    [
        (False, 0, False, "never_fired"),
        (False, 0, True, "never_fired"),
        (True, 0, False, "zero_grad"),
        (True, 0, None, "zero_grad"),
        (True, 0, True, "decay_only"),
        (True, 5, False, "zero_grad"),
        (True, 5, True, "trained"),
        (True, 5, None, "trained"),
    ],
)
def test_status_rules(fired, steps, moved, status):
    got, reason = classify(fired, steps, moved)
    assert got == status and reason


# ------------------------------------------------------------------------------------------------------------------
# Dynamics
# ------------------------------------------------------------------------------------------------------------------
def test_band_matches_numpy_percentiles():
    values = [3.0, 1.0, 4.0, 1.5, 9.0, 2.6, 5.3, float("nan")]
    b = band(values)
    finite = [v for v in values if math.isfinite(v)]
    for key, q in (("p10", 10), ("median", 50), ("p90", 90)):
        assert b[key] == pytest.approx(np.percentile(finite, q))
    assert (b["min"], b["max"], b["points"]) == (1.0, 9.0, 7)
    assert band([float("inf")]) is None


def test_spikes_need_history_and_factor():
    early = [(1, 0.01), (2, 0.1), (3, 1.0)]  # LoRA grads grow from B = 0: no spike without history
    assert spikes(early, 5.0, "grad_norm") == []
    flat = [(i, 1.0) for i in range(1, 8)]
    found = spikes([*flat, (8, 5.0), (9, 4.9)], 5.0, "grad_norm")
    assert [(s["step"], s["ratio"]) for s in found] == [(8, 5.0)]


def test_loss_trend_only_with_enough_points():
    assert loss_summary([(i, 5.0 - 0.1 * i) for i in range(1, 8)])["decreasing"] is None
    down = loss_summary([(i, 5.0 - 0.1 * i) for i in range(1, 9)])
    assert down["decreasing"] is True and down["min_step"] == 8
    assert down["first_quarter_mean"] == pytest.approx((4.9 + 4.8) / 2)
    up = loss_summary([(i, 1.0 + 0.1 * i) for i in range(1, 13)])
    assert up["decreasing"] is False
    bad = loss_summary([(1, 2.0), (2, float("nan")), (3, 1.0)])
    assert bad["non_finite_steps"] == [2] and bad["min"] == 1.0


def test_training_dynamics_reads_trainer_and_telemetry_history():
    logs = [{"loss": 3.0 - 0.1 * i, "grad_norm": 1.0, "learning_rate": 1e-3, "step": i} for i in range(1, 4)]
    logs.append({"train_runtime": 1.0, "train_loss": 2.8, "step": 3})
    telemetry = [{"step": i, "grad_norm/language": 1.0, "grad_norm/vision": 0.0} for i in range(1, 4)]
    dyn = training_dynamics(logs, telemetry)
    assert dyn["loss"]["first"] == 2.9 and dyn["loss"]["points"] == 3
    assert set(dyn["grad_norm"]["per_tower"]) == {"language", "vision"}
    assert dyn["series"]["grad_norm/vision"] == [(1, 0.0), (2, 0.0), (3, 0.0)]


# ------------------------------------------------------------------------------------------------------------------
# Verdict
# ------------------------------------------------------------------------------------------------------------------
def _modules(trained: int, dead: int, status: str = "never_fired", params: int = 10) -> list[ModuleAudit]:
    out = [ModuleAudit(f"l.{i}", "language", "trained", "", params, True, 3) for i in range(trained)]
    out += [ModuleAudit(f"v.{i}", "vision", status, "", params, status != "never_fired", 0) for i in range(dead)]
    return out


def _params(modules):
    nominal = sum(m.params for m in modules)
    effective = sum(m.params for m in modules if m.status == "trained")
    return {
        "nominal_trainable": nominal,
        "effective_trainable": effective,
        "lora_nominal": nominal,
        "lora_effective": effective,
        "dead_share": (nominal - effective) / nominal,
    }


def _decide(modules, dynamics=None, sections=None, lost=False):
    return decide(modules, _params(modules), dynamics or {}, sections or {}, 10, lost)


def test_verdict_pass_warn_fail_by_dead_share():
    assert _decide(_modules(4, 0)) == ("pass", [])
    verdict, reasons = _decide(_modules(3, 1))
    assert verdict == "warn" and [r["code"] for r in reasons] == ["dead_adapters"]
    dead_half = round(FAIL_DEAD_SHARE * 10)
    verdict, reasons = _decide(_modules(10 - dead_half, dead_half))
    assert verdict == "fail" and [r["code"] for r in reasons] == ["dead_majority", "dead_adapters"]
    verdict, reasons = _decide(_modules(0, 3, "zero_grad"))
    assert verdict == "fail" and reasons[0]["code"] == "nothing_trained"
    verdict, reasons = _decide(_modules(3, 1, "decay_only"))
    assert verdict == "warn" and [r["code"] for r in reasons] == ["decay_only"]


def test_verdict_dynamics_weights_sections():
    mods = _modules(2, 0)
    assert _decide(mods, {"loss": {"non_finite_steps": [4]}})[0] == "fail"
    mods[0].finite = False
    assert [r["code"] for r in _decide(mods)[1]] == ["non_finite_weights"]
    mods = _modules(2, 0)
    dyn = {"loss": {"decreasing": False, "first_quarter_mean": 1.0, "last_quarter_mean": 1.2, "non_finite_steps": []}}
    dyn["spikes"] = [{"metric": "grad_norm/vision", "step": 9, "value": 50.0, "ratio": 10.0, "baseline": 5.0}]
    verdict, reasons = _decide(mods, dyn, lost=True)
    assert verdict == "warn"
    assert [r["code"] for r in reasons] == ["loss_not_decreasing", "grad_norm_spikes", "init_record_lost"]
    sections = {"imod": {"verdict": "fail", "reasons": ["masks overlap"]}, "quant": {"error": "KeyError: 'x'"}}
    verdict, reasons = _decide(mods, sections=sections)
    assert verdict == "fail"
    assert [(r["code"], r["message"]) for r in reasons][0] == ("section:imod", "masks overlap")
    assert reasons[1]["code"] == "section_error"


def test_sections_never_break_the_audit():
    def broken():
        raise KeyError("x")

    out = run_sections({"ok": lambda: {"seed": 3, "ratios": torch.tensor([0.2, 0.6])}, "bad": broken})
    assert out["ok"] == {"seed": 3, "ratios": [pytest.approx(0.2), pytest.approx(0.6)]}
    assert out["bad"] == {"error": "KeyError: 'x'"}


def test_jsonable_is_strict_json():
    data = jsonable(
        {"nan": float("nan"), "inf": float("-inf"), "set": {2, 1}, "t": torch.tensor(1.5), "n": np.int64(4)}
    )
    assert data == {"nan": "nan", "inf": "-inf", "set": [1, 2], "t": 1.5, "n": 4}
    json.dumps(data, allow_nan=False)


# ------------------------------------------------------------------------------------------------------------------
# Names and towers
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_tower_from_name_agrees_with_structural_map(family):
    tower_map = map_towers(tiny_model(family))
    assert {n: tower_from_name(n) for n in tower_map.linears} == {n: i.tower for n, i in tower_map.linears.items()}
    some = next(iter(tower_map.linears))
    assert tower_from_name(f"base_model.model.{some}") == tower_map.linears[some].tower


def test_group_names():
    names = ["model.visual.blocks.0.mlp.down_proj", "model.visual.blocks.11.mlp.down_proj", "model.layers.3.q_proj"]
    assert group_names(names) == [("model.visual.blocks.*.mlp.down_proj", 2), ("model.layers.*.q_proj", 1)]


def test_card_section_is_replaced_not_duplicated(tmp_path):
    audit = {
        "verdict": "warn",
        "global_step": 3,
        "reasons": [{"level": "warn", "code": "dead_adapters", "message": "2 adapter(s) learned nothing"}],
        "params": {
            "effective_trainable": 8,
            "nominal_trainable": 10,
            "effective_share": 0.8,
            "base_params": 100,
            "per_tower": {
                "language": {
                    "adapters": 1,
                    "trained": 1,
                    "dead": 0,
                    "nominal_trainable": 8,
                    "effective_trainable": 8,
                    "base_params": 90,
                    "base_params_4bit": 0,
                },
            },
        },
    }
    readme = tmp_path / "README.md"
    assert not add_to_card(readme, audit)
    readme.write_text("---\nlibrary_name: peft\n---\n# Model\n\nText.\n")
    add_to_card(readme, audit)
    audit["verdict"] = "pass"
    add_to_card(readme, audit)
    text = readme.read_text()
    assert text.count(CARD_BEGIN) == 1 and "**Verdict: pass**" in text and text.startswith("---\nlibrary_name")


def test_fired_counts_training_forwards_only():
    from peft import LoraConfig, get_peft_model

    from mm_trainer.core.telemetry import TowerTelemetry
    from mm_trainer.model.adapters import lora_adapters

    model = get_peft_model(tiny_model("causal_lm"), LoraConfig(r=4, target_modules=["q_proj"]))
    telemetry = TowerTelemetry(lora_adapters(model))
    telemetry.watch_forward()
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():  # evaluation / generation: not a training forward
        model(input_ids=ids)
    assert telemetry.fired == set()
    model(input_ids=ids)
    assert telemetry.fired == {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"}


# ------------------------------------------------------------------------------------------------------------------
# Divergence: early gradient explosion, overflow, raw (unfiltered) loss, partial init record
# ------------------------------------------------------------------------------------------------------------------
def _grad_history(values):
    return [{"step": i + 1, "loss": 6.5, "grad_norm": v} for i, v in enumerate(values)]


def test_early_divergence_is_flagged_where_the_spike_rule_is_blind():
    # The break test's lr=1e6 run: x8e4 at step 3, 6 points; the spike rule needs 5 earlier points.
    history = _grad_history([0.53, 0.94, 42405.0, 79802.0, 165292.0, 167736.0])
    dyn = training_dynamics(history)
    assert not [s for s in dyn["spikes"] if s["metric"] == "grad_norm"]
    first = dyn["early_divergence"][0]
    assert (first["step"], first["baseline"]) == (3, 0.53) and first["ratio"] == pytest.approx(42405 / 0.53)
    verdict, reasons = decide([], {}, dyn, {}, 6)
    assert verdict == "warn" and [r["code"] for r in reasons] == ["early_divergence"]
    # LoRA's normal warm-up (B = 0 at init: the norm grows several-fold) is no divergence.
    assert training_dynamics(_grad_history([0.05, 0.4, 2.0, 3.1, 2.5, 2.2]))["early_divergence"] == []


def test_overflowing_but_finite_weights_are_called_diverged_not_nan():
    big = torch.full((8, 64), 2.29e30)  # float32-finite; its float32 squared norm would be inf
    fp = fingerprint(big)
    value = float(big[0, 0])  # 2.29e30 as float32 holds it
    assert fp.finite and fp.norm == pytest.approx(value * math.sqrt(big.numel()), rel=1e-12)
    module = ModuleAudit("l.0", "language", "trained", "", 10, True, 3, norm_a=1.0, norm_b=fp.norm, finite=True)
    verdict, reasons = decide([module], {}, {}, {}, 3)
    assert verdict == "fail" and [r["code"] for r in reasons] == ["weights_overflow"]
    assert "finite but so large" in reasons[0]["message"]
    nan = ModuleAudit("l.1", "language", "trained", "", 10, True, 3, finite=False)
    assert [r["code"] for r in decide([nan], {}, {}, {}, 3)[1]] == ["non_finite_weights"]


def test_raw_loss_replaces_the_filtered_logged_loss():
    # transformers' logging_nan_inf_filter logged a finite mean for steps 2-3; the raw record says NaN.
    history = [{"step": s, "loss": v} for s, v in ((1, 6.5), (2, 6.4), (3, 6.4))]
    raw = [{"step": 1, "loss": 6.5}, {"step": 2, "loss": float("nan")}, {"step": 3, "loss": float("inf")}]
    dyn = training_dynamics(history, raw_loss=raw)
    assert dyn["loss"]["non_finite_steps"] == [2, 3]
    assert "before logging_nan_inf_filter" in dyn["aggregation"]["loss"]
    assert decide([], {}, dyn, {}, 3)[0] == "fail"


def test_partial_init_record_is_a_warning():
    modules = [ModuleAudit(f"l.{i}", "language", "trained", "", 10, True, 3) for i in range(6)]
    verdict, reasons = decide(modules, {}, {}, {}, 3, record_missing=["l.3", "l.4", "l.5"])
    assert verdict == "warn" and reasons[0]["code"] == "init_record_partial"
    assert "covers 3 of 6 adapters" in reasons[0]["message"]
