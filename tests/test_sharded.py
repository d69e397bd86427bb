"""FSDP2 and DeepSpeed ZeRO-2/3 on two CPU processes (gloo) against DDP on the same jobs.

One launch per engine runs every case of ``tests/scripts/sharded_train.py`` (text-only data; image data; image data
with IMoD). For each case the test checks that training finished under the engine it asked for, that both ranks
logged the same telemetry, that the saved adapter loads onto a freshly built base and gives DDP's logits, and that
the audit equals DDP's: verdict, per-adapter statuses, nominal / effective counts, non-zero-gradient steps, telemetry
and dominance rate.

Tolerances: all runs are fp32 from the same seed and init; the engines only sum the same gradients in another order
(all-reduce vs reduce-scatter, pre- vs post-division by the world size), a relative difference of a few fp32 ulps per
step. Adam turns that into a weight difference far below ``lr * 1e-3`` per step, which bounds the weight check;
logits are bounded by the same relative error through a two-layer model with ``|logits| < 10``.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tests.kit.launch import LAUNCH_TIMEOUT, accelerate_launch

ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / "tests" / "scripts" / "sharded_train.py"
CASES = ("text", "image", "image-imod")
STEPS = 4
LR = 1e-2  # tests.kit.FAST_CPU_TRAINING
WEIGHT_ATOL = STEPS * LR * 1e-3
LOGIT_ATOL = 1e-4

ENGINE_CONFIGS = {  # engine -> (accelerate config, environment, whether the CPU FSDP shim goes on the path)
    "ddp": ("ddp_cpu.yaml", {"ACCELERATE_USE_CPU": "true"}, False),
    # accelerate 1.15 drops FSDP on CPU: the test-only shim (tests/shims/cpu_fsdp) switches it back.
    "fsdp2": ("fsdp_cpu.yaml", {"ACCELERATE_USE_CPU": "true"}, True),
    "zero2": ("deepspeed_zero2_cpu.yaml", {"DS_ACCELERATOR": "cpu"}, False),
    "zero3": ("deepspeed_zero3_cpu.yaml", {"DS_ACCELERATOR": "cpu"}, False),
}
needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed (pip install -e '.[dev]')"
)


def launch_engine(
    engine: str,
    out: Path,
    *cases: str,
    steps: int = STEPS,
    extra: tuple[str, ...] = (),
    timeout: float = LAUNCH_TIMEOUT,
) -> str:
    """Run ``tests/scripts/sharded_train.py`` on two CPU processes under ``engine``; returns the combined output."""
    config, env, fsdp_shim = ENGINE_CONFIGS[engine]
    result = accelerate_launch(
        DRIVER, str(out), *cases, "--steps", str(steps), *extra,
        config=config, env=env, fsdp_shim=fsdp_shim, timeout=timeout,
    )  # fmt: skip
    return result.stdout + result.stderr


def rank_infos(out: Path, case: str) -> list[dict[str, Any]]:
    return [json.loads((out / case / f"rank{r}.json").read_text()) for r in (0, 1)]


def audit_essentials(audit: dict[str, Any]) -> dict[str, Any]:
    """What must not depend on the engine: verdict, reasons, statuses, counts, non-zero steps, what fired."""
    params = audit["params"]
    return {
        "verdict": audit["verdict"],
        "reasons": [(r["level"], r.get("code")) for r in audit["reasons"]],
        "status_counts": audit["status_counts"],
        "modules": {
            m["name"]: (m["status"], m["params"], m["fired"], m["nonzero_steps"], m["moved_a"], m["moved_b"])
            for m in audit["modules"]
        },
        "params": {
            k: params[k]
            for k in ("nominal_trainable", "effective_trainable", "lora_nominal", "lora_effective", "base_params")
        },
        "per_tower": params["per_tower"],
        "other_trainable": params["other_trainable"],
        "global_step": audit["global_step"],
    }


def logits_with_adapter(adapter_dir: Path) -> torch.Tensor:
    """Logits of a fresh tiny base with the saved adapter, on a fixed token sequence."""
    from peft import PeftModel

    from tests.kit import tiny_model

    base = tiny_model("qwen2_5_vl")
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    ids = (torch.arange(24) * 7 % 200 + 3)[None]
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    launch_engine("ddp", out, *CASES, "unseen")
    return out


def check_against_ddp(engine: str, out: Path, ddp: Path, cases: tuple[str, ...] = CASES) -> None:
    for case in cases:
        infos, ref = rank_infos(out, case), rank_infos(ddp, case)
        assert [i["engine"] for i in infos] == [engine, engine], case
        assert [i["world_size"] for i in infos] == [2, 2] and [i["steps"] for i in infos] == [STEPS, STEPS]
        # Every rank agrees on the telemetry (sharded norms are summed over the ranks at every log).
        assert infos[0]["telemetry"] == infos[1]["telemetry"], case
        # Telemetry equals DDP's: the same non-zero steps, norms within fp32 summation order.
        tel, tel_ref = infos[0]["telemetry"], ref[0]["telemetry"]
        assert tel["nonzero_steps"] == tel_ref["nonzero_steps"] and tel["fired"] == tel_ref["fired"], case
        assert len(tel["history"]) == len(tel_ref["history"]) == STEPS
        for row, row_ref in zip(tel["history"], tel_ref["history"]):
            assert row.keys() == row_ref.keys()
            for key in row:
                assert row[key] == pytest.approx(row_ref[key], rel=1e-5, abs=1e-9), (case, key)
        assert infos[0]["losses"] == pytest.approx(ref[0]["losses"], rel=1e-5), case
        if "dominance" in ref[0]:
            rates = [h["non_text_rate"] for h in infos[0]["dominance"]]
            rates_ref = [h["non_text_rate"] for h in ref[0]["dominance"]]
            # A rate counts elements whose two Fisher sums compare one way: a near-tie may flip with the order of a
            # sum; allow one element in a hundred thousand of difference, no more.
            assert rates == pytest.approx(rates_ref, abs=1e-5), case
            assert rates[-1] > 0, case
        # The audit equals DDP's.
        audit = json.loads((out / case / "final" / "audit.json").read_text())
        audit_ref = json.loads((ddp / case / "final" / "audit.json").read_text())
        assert audit_essentials(audit) == audit_essentials(audit_ref), case
        assert audit["verdict"] == "pass", case
        # The adapter: the same keys and weights as DDP's, and the same logits on a fresh base.
        weights = load_file(out / case / "final" / "adapter_model.safetensors")
        weights_ref = load_file(ddp / case / "final" / "adapter_model.safetensors")
        assert weights.keys() == weights_ref.keys() and weights
        for key in weights:
            torch.testing.assert_close(weights[key], weights_ref[key], atol=WEIGHT_ATOL, rtol=0)
        torch.testing.assert_close(
            logits_with_adapter(out / case / "final"),
            logits_with_adapter(ddp / case / "final"),
            atol=LOGIT_ATOL,
            rtol=0,
        )


def check_unseen_stops_every_rank(out: Path, deferred: bool) -> None:
    """Only rank 1's batches hold the image the plan did not see: both ranks stop at the same step, rank 1 naming its
    rows, rank 0 the other process. ``deferred``: the check's all-reduce ran during the forward (ZeRO-0/1/2)."""
    infos = rank_infos(out, "unseen")
    assert [i["text_only_plan"] for i in infos] == [True, True]
    assert [i["deferred_check"] for i in infos] == [deferred, deferred]
    raised = [i["raised"] for i in infos]
    assert all(raised), raised
    steps = [message.partition(":")[0] for message in raised]
    assert steps[0] == steps[1] and steps[0].startswith("Step "), raised
    assert "the batch holds image (in another process's batch)" in raised[0]
    assert "the batch holds image (batch row(s) [" in raised[1]


@pytest.mark.slow
def test_ddp_audit_passes(ddp_runs):
    for case in CASES:
        infos = rank_infos(ddp_runs, case)
        assert [i["engine"] for i in infos] == ["ddp", "ddp"]
        assert infos[0]["telemetry"] == infos[1]["telemetry"]
        assert json.loads((ddp_runs / case / "final" / "audit.json").read_text())["verdict"] == "pass"
    check_unseen_stops_every_rank(ddp_runs, deferred=False)  # DDP's forward broadcasts buffers: the check blocks


@pytest.mark.slow
@pytest.mark.parametrize(
    "engine", ["fsdp2", pytest.param("zero2", marks=needs_deepspeed), pytest.param("zero3", marks=needs_deepspeed)]
)
def test_sharded_engine_equals_ddp(engine, ddp_runs, tmp_path):
    launch_engine(engine, tmp_path, *CASES, "unseen")
    check_against_ddp(engine, tmp_path, ddp_runs)
    check_unseen_stops_every_rank(tmp_path, deferred=engine == "zero2")
