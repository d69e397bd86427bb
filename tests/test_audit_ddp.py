"""The audit under two-process DDP on CPU: written once (main process), with what every rank ran."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.kit.launch import accelerate_launch

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_ddp_audit_is_written_once_with_synced_activity(tmp_path):
    accelerate_launch(REPO_ROOT / "tests" / "scripts" / "ddp_audit.py", str(tmp_path))
    fired = [json.loads((tmp_path / f"fired_rank{r}.json").read_text()) for r in (0, 1)]
    assert fired[0] == fired[1]  # synced: every rank knows what any rank ran
    for folder in (tmp_path / "checkpoint-2", tmp_path / "checkpoint-4", tmp_path):
        audit = json.loads((folder / "audit.json").read_text())
        assert not (folder / "audit_error.txt").exists()
        statuses = {m["tower"]: set() for m in audit["modules"]}
        for m in audit["modules"]:
            statuses[m["tower"]].add(m["status"])
        assert statuses["language"] == {"trained"} and "trained" in statuses["vision"]
    final = json.loads((tmp_path / "audit.json").read_text())
    assert final["training"]["world_size"] == 2 and final["global_step"] == 4
    assert sorted(m["name"] for m in final["modules"] if m["fired"]) == fired[0]
