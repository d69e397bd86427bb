"""Fault injection: a real training process SIGKILLed at several points of a checkpoint save, then resumed with
``resume_from_checkpoint=True``; the final adapter and the audit history equal an uninterrupted run's.

The kills are deterministic: ``tests/scripts/fault_train.py`` wraps one writer per kill point in the training child
only (see its docstring). One driver process imports the libraries once and forks each run.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mm_trainer.utils.checkpoints import COMPLETE_MARKER, checkpoint_problem
from tests.kit.launch import child_environment, run_bounded

DRIVER = Path(__file__).parent / "scripts" / "fault_train.py"
POINTS = ("before_state", "mid_state", "mid_audit", "before_optimizer", "mid_optimizer", "before_marker")
MAX_STEPS, KILL_STEP = 6, 4

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not hasattr(os, "fork"), reason="the driver forks its training processes"),
]


@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    work = tmp_path_factory.mktemp("faults")
    run_bounded([sys.executable, str(DRIVER), str(work), *POINTS], child_environment(), timeout=1200)
    results = json.loads((work / "results.json").read_text())
    assert results["baseline"]["run"]["exit_code"] == 0
    return work, results


def _series(audit: dict) -> dict:
    return {k: v for k, v in audit["dynamics"]["series"].items() if k in ("loss", "grad_norm", "grad_norm/language")}


@pytest.mark.parametrize("point", POINTS)
def test_killed_save_resumes_to_the_uninterrupted_result(faults, point):
    work, results = faults
    result = results[point]
    assert result["killed"]["signal"] == 9  # the training process really died by SIGKILL
    assert result["resumed"]["exit_code"] == 0, result["resume_log"]
    ckpt = f"checkpoint-{KILL_STEP}"
    assert COMPLETE_MARKER not in result["files_after_kill"]
    if point == "before_marker":
        # save_total_limit=1: the rotation removed checkpoint-2 before the kill; the unmarked but finished
        # checkpoint-4 (trainer_state.json written) is the one resumed from, and nothing was skipped.
        assert result["checkpoints_after_kill"] == [ckpt]
        assert "trainer_state.json" in result["files_after_kill"]
        assert "Skipping" not in result["resume_log"]
    else:
        assert result["checkpoints_after_kill"] == ["checkpoint-2", ckpt]
        assert f"Skipping unfinished checkpoint {ckpt}" in result["resume_log"]
        assert "Resuming from" in result["resume_log"] and "checkpoint-2" in result["resume_log"]

    # The final adapter equals the uninterrupted run's, bit for bit (same seed, same data order, restored RNG).
    base = load_file(str(work / "baseline" / "adapter_model.safetensors"))
    resumed = load_file(str(work / point / "adapter_model.safetensors"))
    assert base.keys() == resumed.keys()
    for key in base:
        assert torch.equal(base[key], resumed[key]), key

    # The audit history is continuous: every step once, the same values, statuses and gradient counts.
    audit = json.loads((work / point / "audit.json").read_text())
    reference = json.loads((work / "baseline" / "audit.json").read_text())
    assert [s for s, _ in audit["dynamics"]["series"]["loss"]] == list(range(1, MAX_STEPS + 1))
    assert _series(audit) == _series(reference)
    assert [(m["name"], m["status"], m["nonzero_steps"]) for m in audit["modules"]] == [
        (m["name"], m["status"], m["nonzero_steps"]) for m in reference["modules"]
    ]
    assert audit["init_record"] == {"restored_on_resume": True, "lost": False}
    assert audit["verdict"] == reference["verdict"] == "pass"

    # The re-saved checkpoint-4 and the last one are complete, and no temporary file of the cut write is left.
    for step in (KILL_STEP, MAX_STEPS):
        folder = work / point / f"checkpoint-{step}"
        if folder.is_dir():
            assert checkpoint_problem(folder) is None and (folder / COMPLETE_MARKER).is_file()
            assert not list(folder.glob(".*.tmp"))
