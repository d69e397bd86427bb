"""IMoD under two-process DDP on CPU: the injected gradient is all-reduced with the task gradient."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from tests.kit.launch import accelerate_launch, child_environment, run_bounded

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_two_processes_end_with_identical_adapters_equal_to_one_process(tmp_path):
    accelerate_launch(ROOT / "tests" / "scripts" / "imod_ddp.py", str(tmp_path / "ddp"))

    ranks = [torch.load(tmp_path / "ddp" / f"rank{r}.pt") for r in (0, 1)]
    records = [json.loads((tmp_path / "ddp" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert records[0]["world_size"] == 2
    adapters = [r["adapter"] for r in ranks]
    assert adapters[0].keys() == adapters[1].keys() and adapters[0]
    for key in adapters[0]:
        torch.testing.assert_close(adapters[1][key], adapters[0][key], atol=0, rtol=0, msg=key)
    # Every rank logs the same (reduced) constraint magnitudes and dominance rates.
    for key in ("imod/msd", "imod/ma", "dominance/non_text_rate"):
        assert [h[key] for h in records[0]["logs"]] == pytest.approx([h[key] for h in records[1]["logs"]])
    assert records[0]["dominance"] == records[1]["dominance"]
    assert records[0]["micro_steps_with_non_text"] + records[1]["micro_steps_with_non_text"] > 0

    # One process with the global batch (2 rows per step, the same rows in the same order): the same first-step
    # gradient (task + injected), so the injected part is averaged over ranks exactly like the task gradient.
    script = ROOT / "tests" / "scripts" / "imod_ddp.py"
    single = [sys.executable, str(script), str(tmp_path / "single"), "--batch-size", "2"]
    run_bounded(single, child_environment({"ACCELERATE_USE_CPU": "true"}))
    one = torch.load(tmp_path / "single" / "rank0.pt")["grads"]
    ddp = ranks[0]["grads"]
    assert ddp.keys() == one.keys()
    for key in one:
        scale = max(float(one[key].abs().max()), 1.0)
        torch.testing.assert_close(ddp[key], one[key], atol=1e-5 * scale, rtol=0, msg=key)
        torch.testing.assert_close(ranks[1]["grads"][key], ddp[key], atol=0, rtol=0, msg=key)
