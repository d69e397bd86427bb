"""Step time of each engine (DDP, FSDP2, DeepSpeed ZeRO-2 / ZeRO-3) on 2 CPU processes, side by side from one run.

    python tests/benchmarks/bench_sharded.py [--steps 40] [--engines ddp fsdp2 zero2 zero3]

One launch per engine (``tests/scripts/sharded_train.py``) runs the same job three times: TRL's plain
``SFTTrainer``, ``MMSFTTrainer``, and ``MMSFTTrainer`` without tower telemetry and audit. The job: the tiny
Qwen2.5-VL of ``tests.kit``, text-only chat data, LoRA r=4 on q/v/down_proj, 2 rows per process. Reported per
engine, from the median step time over steps 4..N of rank 0:

- ``engine / DDP``: MMSFTTrainer's step relative to MMSFTTrainer under DDP (the same job);
- ``MM / SFT``: MMSFTTrainer relative to SFTTrainer under the same engine (goal <= 1.10);
- ``telemetry``: MMSFTTrainer with / without telemetry and audit, and the median time of ``TowerTelemetry.collect``
  per optimizer step (under FSDP2 it all-reduces one number per adapter, under DeepSpeed the captured gradients).

On a model this small the step is mostly communication and Python overhead, so the ratios bound what the engines
and mm-trainer add rather than measure a real model's compute. DeepSpeed on CPU needs ``DS_ACCELERATOR=cpu`` (set
here) and builds its CPU op on first use (~3 minutes).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.test_sharded import launch_engine  # noqa: E402

CASES = ("text-sft", "text", "text-notel")


def median_step(out: Path, case: str, skip: int = 3) -> float:
    times = json.loads((out / case / "rank0.json").read_text())["step_times"]
    return statistics.median(times[skip:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--engines", nargs="+", default=["ddp", "fsdp2", "zero2", "zero3"])
    ns = parser.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for engine in ns.engines:
            out = Path(tmp) / engine
            launch_engine(engine, out, *CASES, steps=ns.steps, timeout=3600)  # 3 jobs x --steps per launch
            collect = json.loads((out / "text" / "rank0.json").read_text())["collect_times"]
            rows[engine] = {case: median_step(out, case) for case in CASES} | {
                "collect": statistics.median(collect[3:])
            }
    ddp = rows.get("ddp", {}).get("text")
    print(f"median step over steps 4..{ns.steps}, rank 0, 2 CPU processes (gloo)")
    header = (
        f"{'engine':<7} {'SFT ms':>8} {'MM ms':>8} {'MM-notel ms':>12} {'engine/DDP':>11} {'MM/SFT':>7} "
        f"{'tel on/off':>10} {'collect ms':>11}"
    )
    print(header)
    for engine, r in rows.items():
        rel = f"{r['text'] / ddp:.2f}x" if ddp else "-"
        print(
            f"{engine:<7} {r['text-sft'] * 1e3:>8.1f} {r['text'] * 1e3:>8.1f} {r['text-notel'] * 1e3:>12.1f} "
            f"{rel:>11} {r['text'] / r['text-sft']:>6.2f}x {r['text'] / r['text-notel']:>9.2f}x "
            f"{r['collect'] * 1e3:>11.2f}"
        )


if __name__ == "__main__":
    main()
