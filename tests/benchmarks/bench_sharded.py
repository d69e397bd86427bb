"""Step time of each engine (DDP, FSDP2, DeepSpeed ZeRO-2 / ZeRO-3) on 2 CPU processes, side by side from one run.

    python tests/benchmarks/bench_sharded.py [--steps 40] [--rounds 3] [--engines ddp fsdp2 zero2 zero3]

One launch per engine (``tests/scripts/sharded_train.py``) runs ``--rounds`` rounds of three jobs, one after the
other in the same two processes, in an order that rotates from round to round: TRL's plain ``SFTTrainer``,
``MMSFTTrainer``, and ``MMSFTTrainer`` without tower telemetry and audit. The job: the tiny Qwen2.5-VL of
``tests.kit``, text-only chat data, LoRA r=4 on q/v/down_proj, 2 rows per process, a log every ``--logging-steps``
(10, TRL's default). Per round and job, the median step time over steps 4..N of rank 0; per engine, the median over
the rounds of:

- ``engine / DDP``: MMSFTTrainer's step relative to MMSFTTrainer under DDP (the same job);
- ``MM / SFT``: MMSFTTrainer relative to SFTTrainer under the same engine (goal <= 1.10);
- ``tel on/off``: MMSFTTrainer with / without telemetry and audit, and the median time of ``TowerTelemetry.collect``
  per optimizer step (no collective under any engine: what FSDP2's shards and DeepSpeed's captured gradients need
  from the other ranks is all-reduced once per log);
- ``guard ms``: median time of the per-micro-batch modality check (``BatchModalityGuard.check``: one all-reduce of
  3 flags on several processes, so that a batch with an unseen modality stops every rank at the same step), waiting
  for the other rank included.

with the lowest and highest round in brackets: consecutive jobs on a shared 2-core machine differ by several
percent, so a single round decides nothing; jobs of a round run back to back in the same processes, which keeps the
machine's drift out of their ratio as far as it can be. On a model this small the step is mostly communication and
Python overhead, so the ratios bound what the engines and mm-trainer add rather than measure a real model's compute.
DeepSpeed on CPU needs ``DS_ACCELERATOR=cpu`` (set here) and builds its CPU op on first use (~3 minutes).
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


def rotated(cases: tuple[str, ...], k: int) -> tuple[str, ...]:
    """``cases`` starting at position ``k``: who runs first changes from round to round."""
    k %= len(cases)
    return cases[k:] + cases[:k]


def spread(values: list[float]) -> str:
    """``median [min-max]`` of per-round values."""
    return f"{statistics.median(values):.2f}x [{min(values):.2f}-{max(values):.2f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3, help="repetitions of the 3 jobs, their order rotated")
    parser.add_argument("--engines", nargs="+", default=["ddp", "fsdp2", "zero2", "zero3"])
    parser.add_argument("--logging-steps", type=int, default=10, help="TRL's SFTConfig default")
    ns = parser.parse_args()
    rounds: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for engine in ns.engines:  # one launch per engine: the rounds interleave the jobs in the same processes
            out = Path(tmp) / engine
            cases = [f"{case}@{k}" for k in range(ns.rounds) for case in rotated(CASES, k)]
            extra = ("--logging-steps", str(ns.logging_steps))
            launch_engine(engine, out, *cases, steps=ns.steps, extra=extra, timeout=3600)
            for k in range(ns.rounds):
                info = json.loads((out / f"text@{k}" / "rank0.json").read_text())
                rounds.setdefault(engine, []).append(
                    {case: median_step(out, f"{case}@{k}") for case in CASES}
                    | {"collect": statistics.median(info["collect_times"][3:])}
                    | {"guard": statistics.median(info["guard_times"][3:]) if info["guard_times"] else 0.0}
                )
    print(
        f"median step over steps 4..{ns.steps}, rank 0, 2 CPU processes (gloo), a log every {ns.logging_steps} "
        f"steps; {ns.rounds} rounds per engine (ratios: median [min-max] of the rounds' ratios)"
    )
    print(
        f"{'engine':<7} {'SFT ms':>8} {'MM ms':>8} {'MM-notel ms':>12} {'engine/DDP':>20} {'MM/SFT':>20} "
        f"{'tel on/off':>20} {'collect ms':>11} {'guard ms':>9}"
    )
    ddp = rounds.get("ddp")
    for engine, rs in rounds.items():
        med = {key: statistics.median(r[key] for r in rs) for key in (*CASES, "collect", "guard")}
        rel = spread([r["text"] / d["text"] for r, d in zip(rs, ddp)]) if ddp else "-"
        print(
            f"{engine:<7} {med['text-sft'] * 1e3:>8.1f} {med['text'] * 1e3:>8.1f} {med['text-notel'] * 1e3:>12.1f} "
            f"{rel:>20} {spread([r['text'] / r['text-sft'] for r in rs]):>20} "
            f"{spread([r['text'] / r['text-notel'] for r in rs]):>20} {med['collect'] * 1e3:>11.2f} "
            f"{med['guard'] * 1e3:>9.2f}"
        )


if __name__ == "__main__":
    main()
