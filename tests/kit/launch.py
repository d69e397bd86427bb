"""Run a test script in a child process (``accelerate launch`` on 2 CPU processes, or plain Python), bounded.

Every multi-process test goes through :func:`run_bounded`, so that they all share three rules:

- The child's environment is the test process's, minus the distributed variables that an in-process ``Trainer``
  earlier in the same pytest session may have left in ``os.environ`` (accelerate sets ``RANK``, ``WORLD_SIZE``,
  ``MASTER_PORT``... when it builds a CPU state); a launched rank must get them from its launcher only.
- The child runs in its own session; on timeout the whole process group is killed (``accelerate launch`` and every
  rank it started), so a hung collective cannot keep two cores busy for the rest of the suite.
- A failure or a timeout raises ``AssertionError`` with the tail of what the child printed.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ACCELERATE_CONFIGS = ROOT / "recipes" / "accelerate"
CPU_FSDP_SHIM = ROOT / "tests" / "shims" / "cpu_fsdp"
LAUNCH_TIMEOUT = 600  # seconds; a 2-process launch of the tiny models takes ~1-2 minutes on 2 cores

# Variables a launcher sets for its ranks; stale values from the test process must not reach a child.
_DISTRIBUTED_VARIABLES = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "LOCAL_SIZE",
    "GROUP_RANK",
    "ROLE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
)
_DISTRIBUTED_PREFIXES = ("ACCELERATE_", "FSDP_", "TORCHELASTIC_")


def free_port() -> int:
    """A TCP port free on the loopback interface right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_environment(extra: Mapping[str, str] | None = None, paths: Sequence[Path | str] = ()) -> dict[str, str]:
    """The environment of a launched child: this process's, cleaned of distributed settings, offline, 1 thread.

    Args:
        extra: Variables to set (they win over everything else).
        paths: Folders put first on ``PYTHONPATH``, before this checkout.
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in _DISTRIBUTED_VARIABLES and not k.startswith(_DISTRIBUTED_PREFIXES)
    }
    python_path = [str(p) for p in paths] + [str(ROOT)]
    if os.environ.get("PYTHONPATH"):
        python_path.append(os.environ["PYTHONPATH"])
    env.update({"PYTHONPATH": os.pathsep.join(python_path), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    env.update(extra or {})
    return env


def run_bounded(
    cmd: Sequence[str], env: Mapping[str, str], timeout: float = LAUNCH_TIMEOUT, cwd: Path = ROOT
) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own process group; kill the group on timeout; assert it exited with 0.

    Returns:
        The completed process (``stdout`` and ``stderr`` as text).
    """
    process = subprocess.Popen(
        list(cmd), cwd=cwd, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        raise AssertionError(
            f"{' '.join(map(str, cmd[:6]))} ... did not finish within {timeout:.0f} s (process group killed).\n"
            f"--- stdout (tail)\n{stdout[-3000:]}\n--- stderr (tail)\n{stderr[-6000:]}"
        ) from None
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    assert result.returncode == 0, f"exit code {result.returncode}\n{stdout[-3000:]}\n{stderr[-6000:]}"
    return result


def accelerate_launch(
    script: Path,
    *script_args: str,
    config: str | None = None,
    launch_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    fsdp_shim: bool = False,
    timeout: float = LAUNCH_TIMEOUT,
) -> subprocess.CompletedProcess:
    """``accelerate launch`` ``script`` on 2 CPU processes.

    Args:
        script: The training script.
        *script_args: Its arguments.
        config: A file of ``recipes/accelerate/`` (``ddp_cpu.yaml``, ``fsdp_cpu.yaml``, ``deepspeed_zero3_cpu.yaml``
            ...); ``None`` launches plain DDP on the CPU (``--multi_gpu`` with ``ACCELERATE_USE_CPU``).
        launch_args: More ``accelerate launch`` options.
        env: More environment variables (``DS_ACCELERATOR``, ``ACCELERATE_USE_CPU``...).
        fsdp_shim: Put the test-only shim that lets accelerate run FSDP on the CPU (``tests/shims/cpu_fsdp``) first
            on the path.
        timeout: Seconds before the launch and all its ranks are killed.
    """
    if config is None:
        options = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                   "--dynamo_backend", "no"]  # fmt: skip
        env = {"ACCELERATE_USE_CPU": "true", **(env or {})}
    else:
        options = ["--config_file", str(ACCELERATE_CONFIGS / config)]
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", *options, *launch_args,
        "--main_process_port", str(free_port()), str(script), *script_args,
    ]  # fmt: skip
    return run_bounded(cmd, child_environment(env, [CPU_FSDP_SHIM] if fsdp_shim else []), timeout)
