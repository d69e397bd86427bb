"""The audit under two-process DDP on CPU: written once (main process), with what every rank ran."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_audit_is_written_once_with_synced_activity(tmp_path):
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT),
        "ACCELERATE_USE_CPU": "true",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--main_process_port",
        str(_free_port()),
        str(REPO_ROOT / "tests" / "scripts" / "ddp_audit.py"),
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
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
