"""Two CPU processes under DDP: training finishes and both ranks hold identical adapter weights."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_processes(script: Path, *script_args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``accelerate launch --multi_gpu --num_processes 2`` on CPU, with this checkout first on the path."""
    env = {
        **os.environ,
        "ACCELERATE_USE_CPU": "true",
        "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()), str(script), *script_args,
    ]  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


@pytest.mark.slow
@pytest.mark.parametrize("data", ["text", "mixed"])
def test_ddp_two_processes_identical_adapters(tmp_path, data):
    launch_two_processes(ROOT / "tests" / "scripts" / "ddp_train.py", str(tmp_path), data)
    infos = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [i["world_size"] for i in infos] == [2, 2] and [i["steps"] for i in infos] == [4, 4]
    # Text-only data: every adapter is on the language model, so DDP needs no unused-parameter search.
    assert infos[0]["ddp_find_unused_parameters"] is (data != "text")
    assert infos[0]["kept"] == infos[1]["kept"]
    assert infos[0]["fired"] == infos[1]["fired"]  # synced across ranks at each log
    if data == "text":
        assert all(name.startswith("model.language_model.") for name in infos[0]["kept"])
    a, b = (load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1))
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0)
    assert any("lora_B" in k and a[k].abs().sum() > 0 for k in a)
