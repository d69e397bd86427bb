"""Per-tower gradient telemetry overhead: step time with telemetry on vs off, side by side in one run.

    HF_HUB_OFFLINE=1 python tests/benchmarks/bench_telemetry.py [--steps 60]

A Qwen2.5-VL-architecture model (hidden 512, 4 text layers, vision tower present), text-only chat data, LoRA r=16 on
all linear layers of the language model. Telemetry is switched on for even optimizer steps and off for odd ones
within one run, so both arms see the same machine load; the ratio is median(on) / median(off) of the step time. The time spent in ``collect()`` itself is
reported too.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from peft import LoraConfig  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from mm_trainer import MMSFTConfig, MMSFTTrainer  # noqa: E402
from tests.benchmarks.common import qwen2_5_vl_model  # noqa: E402
from tests.kit import make_tokenizer, text_dataset  # noqa: E402


class InterleavedTelemetry(TrainerCallback):
    """Switches telemetry on for even steps and off for odd ones, and times each step: both arms share the run."""

    def __init__(self):
        self.trainer = None
        self.kept = None
        self.times = {True: [], False: []}
        self.collect_times = []
        self._t = 0.0
        self._on = True

    def on_step_begin(self, args, state, control, **kw):
        self._on = state.global_step % 2 == 0
        self.trainer.mm.telemetry = self.kept if self._on else None
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        if state.global_step > 4:  # skip warm-up
            self.times[self._on].append(time.perf_counter() - self._t)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    import tempfile

    timer = InterleavedTelemetry()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = MMSFTTrainer(
            model=qwen2_5_vl_model(hidden=512, layers=4, intermediate=2048, heads=8, kv_heads=4),
            args=MMSFTConfig(
                output_dir=tmp,
                max_steps=args.steps,
                per_device_train_batch_size=4,
                learning_rate=1e-4,
                logging_steps=10,
                report_to="none",
                save_strategy="no",
                use_cpu=True,
                bf16=False,
                disable_tqdm=True,
                gradient_checkpointing=False,
                seed=0,
            ),
            train_dataset=text_dataset(4 * args.steps),
            processing_class=make_tokenizer("qwen2_5_vl"),
            peft_config=LoraConfig(r=16, target_modules="all-linear"),
            callbacks=[timer],
        )
        timer.trainer, timer.kept = trainer, trainer.telemetry
        collect = trainer.telemetry.collect

        def timed_collect():
            t = time.perf_counter()
            collect()
            timer.collect_times.append(time.perf_counter() - t)

        trainer.telemetry.collect = timed_collect
        trainer.train()
    t_on, t_off = statistics.median(timer.times[True]), statistics.median(timer.times[False])
    share = sum(timer.collect_times) / sum(timer.times[True])
    print(f"machine: {os.cpu_count()}-core CPU, torch {torch.__version__}; {len(trainer.adapters)} adapters")
    print(f"median step time, telemetry off: {t_off * 1e3:.1f} ms, on: {t_on * 1e3:.1f} ms (steps interleaved)")
    print(f"telemetry overhead ratio (on/off): {t_on / t_off:.4f}  (goal <= 1.03)")
    print(f"collect() itself: {statistics.median(timer.collect_times) * 1e3:.2f} ms/step = {share:.2%} of step time")


if __name__ == "__main__":
    main()
