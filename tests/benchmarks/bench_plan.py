"""Wall time of ``mm-trainer plan`` on a 72B-class config (transformers' default ``Qwen2_5_VLConfig``).

    HF_HUB_OFFLINE=1 python tests/benchmarks/bench_plan.py [--runs 3]

Each run is a fresh interpreter (start-up and imports included), as a user types the command. Goal: < 10 s on a
2-core machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    from transformers import Qwen2_5_VLConfig

    with tempfile.TemporaryDirectory() as tmp:
        Qwen2_5_VLConfig().save_pretrained(tmp)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
        times = []
        for _ in range(args.runs):
            start = time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "mm_trainer.cli.main", "plan", tmp, "--rank", "16"],
                check=True, capture_output=True, env=env,
            )  # fmt: skip
            times.append(time.perf_counter() - start)
    print(f"machine: {os.cpu_count()}-core CPU")
    print(
        f"mm-trainer plan on the 72B default Qwen2_5_VLConfig: median {statistics.median(times):.2f} s wall "
        f"(runs: {', '.join(f'{t:.2f}' for t in times)}), goal < 10 s"
    )


if __name__ == "__main__":
    main()
