"""Two CPU processes under FSDP2 and DeepSpeed ZeRO-3 against DDP: mixed image+text data (dummy media), text-only data
with the vision tower released, and ZeRO-3 loading by path (`zero3_init_flag`: probe skipped, generation gathered).

One launch per engine runs several cases (``tests/scripts/sharded_data.py``); each test compares one case with the
DDP launch. FSDP2 on CPU needs the test-only shim ``tests/shims/cpu_fsdp`` (accelerate 1.15 drops FSDP on CPU).
Telemetry and the audit are on: a sharded run must report the same fired adapters and audit statuses as DDP (the
dummy's forwards do not count as fired; ``tests/test_dummy_media.py`` checks that on one process).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.kit.launch import accelerate_launch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "sharded_data.py"
STEPS = 4
LR = 1e-2  # tests.kit.FAST_CPU_TRAINING's learning rate

pytestmark = pytest.mark.slow


def _launch(
    out: Path,
    config: str,
    cases: list[str],
    env: dict[str, str],
    shim: bool = False,
    launch_args: tuple[str, ...] = (),
) -> Path:
    accelerate_launch(
        SCRIPT,
        str(out),
        *cases,
        "--steps",
        str(STEPS),
        config=config,
        launch_args=launch_args,
        env=env,
        fsdp_shim=shim,
    )
    return out


def _deepspeed_or_skip() -> None:
    pytest.importorskip("deepspeed", reason="DeepSpeed is a dev extra (`pip install -e '.[dev]'`)")


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    return _launch(out, "ddp_cpu.yaml", ["mixed", "mixed-seq", "text-release"], {"ACCELERATE_USE_CPU": "true"})


@pytest.fixture(scope="module")
def fsdp2(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2")
    cases = ["mixed", "mixed-seq", "text-release"]
    return _launch(out, "fsdp_cpu.yaml", cases, {"ACCELERATE_USE_CPU": "true"}, shim=True)


@pytest.fixture(scope="module")
def zero3(tmp_path_factory):
    _deepspeed_or_skip()
    out = tmp_path_factory.mktemp("zero3")
    return _launch(out, "deepspeed_zero3_cpu.yaml", ["mixed-seq", "text-release"], {"DS_ACCELERATOR": "cpu"})


@pytest.fixture(scope="module")
def zero3_init(tmp_path_factory):
    _deepspeed_or_skip()
    from tests.kit import save_tiny

    out = tmp_path_factory.mktemp("zero3_init")
    save_tiny("qwen2_5_vl", out / "model")
    env = {"DS_ACCELERATOR": "cpu"}
    return _launch(out, "deepspeed_zero3_cpu.yaml", ["path-eval"], env, launch_args=("--zero3_init_flag", "true"))


def _ranks(out: Path, case: str) -> list[dict]:
    return [json.loads((out / case / f"rank{r}.json").read_text()) for r in (0, 1)]


def _assert_same_adapter(out: Path, ref: Path, case: str, atol: float, ref_case: str | None = None) -> None:
    a = load_file(ref / (ref_case or case) / "adapter.safetensors")
    b = load_file(out / case / "adapter.safetensors")
    assert a.keys() == b.keys() and a
    assert sum(1 for k in a if "lora_B" in k and a[k].any()) == sum(1 for k in a if "lora_B" in k)  # all trained
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=atol, rtol=0, msg=key)


def _assert_same_report(out: Path, ref: Path, case: str, ref_case: str | None = None) -> None:
    """Same fired adapters on every rank and the same audit (statuses, counts, verdict) as the reference run."""
    expected = _ranks(ref, ref_case or case)[0]
    infos = _ranks(out, case)
    assert [i["fired"] for i in infos] == [expected["fired"]] * 2
    assert infos[0]["audit"] == expected["audit"]


def _assert_same_losses(out: Path, ref: Path, case: str, atol: float, ref_case: str | None = None) -> None:
    expected = _ranks(ref, ref_case or case)[0]["losses"]
    for info in _ranks(out, case):
        assert len(info["losses"]) == STEPS
        torch.testing.assert_close(torch.tensor(info["losses"]), torch.tensor(expected), atol=atol, rtol=0)


# Tolerances. Two ranks: FSDP2's reduce-scatter and DDP's all-reduce both add two fp32 gradients and halve the sum,
# which is exact-order independent, and every other operation is the same: the runs agree to fp32 rounding of a few
# steps (1e-6 on weights of magnitude ~0.1). ZeRO-3 runs every linear layer through its own autograd function and
# reduces in buckets (another summation order); Adam's update lr * m / sqrt(v) is O(lr) whatever the gradient's size,
# so a rounding difference in a near-zero gradient element can move that weight by a small fraction of lr per step.
FSDP_ATOL = 1e-6
ZERO3_ATOL = 1e-2 * LR
LOSS_ATOL = 1e-5  # losses of ~6.5 in fp32


def test_fsdp2_mixed_data_matches_ddp(ddp, fsdp2):
    for case in ("mixed", "mixed-seq"):
        infos = _ranks(fsdp2, case)
        assert [i["engine"] for i in infos] == ["fsdp2", "fsdp2"] and [i["steps"] for i in infos] == [STEPS, STEPS]
        _assert_same_losses(fsdp2, ddp, case, LOSS_ATOL)
        _assert_same_adapter(fsdp2, ddp, case, FSDP_ATOL)
        _assert_same_report(fsdp2, ddp, case)
        assert infos[0]["kept"] == _ranks(ddp, case)[0]["kept"]
        assert any(".visual." in n for n in infos[0]["kept"])
        assert _ranks(ddp, case)[0]["dummy"] is None  # DDP needs no dummy
    seq = _ranks(fsdp2, "mixed-seq")
    # Rows in order, one per micro-batch: rank 0 only gets text rows, rank 1 only image rows.
    assert seq[0]["dummy"]["used"] == {"vision": STEPS} and seq[1]["dummy"]["used"] == {}


def test_zero3_mixed_data_matches_ddp(ddp, zero3):
    infos = _ranks(zero3, "mixed-seq")
    assert [i["engine"] for i in infos] == ["zero3", "zero3"] and [i["steps"] for i in infos] == [STEPS, STEPS]
    assert infos[0]["dummy"]["used"] == {"vision": STEPS} and infos[1]["dummy"]["used"] == {}
    _assert_same_losses(zero3, ddp, "mixed-seq", LOSS_ATOL)
    _assert_same_adapter(zero3, ddp, "mixed-seq", ZERO3_ATOL)
    _assert_same_report(zero3, ddp, "mixed-seq")


@pytest.mark.parametrize("engine", ["fsdp2", "zero3"])
def test_released_tower_under_sharding_matches_ddp(request, ddp, engine):
    out = request.getfixturevalue(engine)
    infos = _ranks(out, "text-release")
    assert [i["released"] for i in infos] == [["model.visual"]] * 2  # auto-wrap still finds the vision block class
    assert all(name.startswith("model.language_model.") for name in infos[0]["kept"])
    _assert_same_losses(out, ddp, "text-release", LOSS_ATOL)
    _assert_same_adapter(out, ddp, "text-release", FSDP_ATOL if engine == "fsdp2" else ZERO3_ATOL)
    _assert_same_report(out, ddp, "text-release")


def test_zero3_init_flag_by_path_skips_probe_and_generates(ddp, zero3_init):
    from mm_trainer.training.evaluation import generate_answers
    from tests.kit import auto_model_class, make_tokenizer, text_dataset

    infos = _ranks(zero3_init, "path-eval")
    assert [i["engine"] for i in infos] == ["zero3", "zero3"]
    assert [i["probe"] for i in infos] == [False, False]  # skipped with its reason, not crashed in __init__
    assert [i["released"] for i in infos] == [[], []]  # already partitioned: kept, with the reason logged
    # Same targets as the probed DDP run (text-only data: the language tower).
    assert infos[0]["kept"] == _ranks(ddp, "text-release")[0]["kept"]
    # Before training, generation ran on the gathered partitioned weights: the same greedy answers as the saved model
    # on one process. After training, through the engine's own gathering, and both ranks agree.
    model = auto_model_class("qwen2_5_vl").from_pretrained(zero3_init / "model")
    rows = [text_dataset(2)[i] for i in range(2)]
    expected = generate_answers(model, make_tokenizer("qwen2_5_vl"), rows, max_new_tokens=3)
    assert [i["answers_before"] for i in infos] == [expected, expected]
    assert infos[0]["answers_after"] == infos[1]["answers_after"] and len(infos[0]["answers_after"]) == 2
    # The model loaded by path is the DDP run's model: the same training.
    _assert_same_losses(zero3_init, ddp, "path-eval", LOSS_ATOL, ref_case="text-release")
    _assert_same_adapter(zero3_init, ddp, "path-eval", ZERO3_ATOL, ref_case="text-release")
