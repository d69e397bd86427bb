"""Train the tiny Qwen2.5-VL under whatever engine ``accelerate launch`` set up (DDP, FSDP2, DeepSpeed ZeRO-2/3), for
several cases in one launch, and save each run with ``MMSFTTrainer.save_model`` (adapter + audit).

Launched by ``tests/test_sharded.py`` (and ``tests/benchmarks/bench_sharded.py``), e.g.::

    ACCELERATE_USE_CPU=true OMP_NUM_THREADS=1 PYTHONPATH=.:tests/shims/cpu_fsdp \
        accelerate launch --config_file recipes/accelerate/fsdp_cpu.yaml tests/scripts/sharded_train.py OUT text image

DeepSpeed on CPU also needs ``DS_ACCELERATOR=cpu``; the script sets ``ddp_backend="gloo"`` itself under DeepSpeed.

Cases: ``text`` (text-only rows), ``image`` (an image in every row), ``image-imod`` (``image`` with IMoD), each
optionally suffixed ``-sft`` to run TRL's plain ``SFTTrainer`` on the same job instead, or ``-notel`` to run
MMSFTTrainer without tower telemetry and audit (both for the benchmark), and with ``@k`` to repeat a job in the
same launch (``text@1`` writes ``OUT/text@1``).
The case ``unseen`` trains on image rows that the modality profile did not sample, on rank 1 only: every rank must
stop with ``UnseenModalityError`` at the same step (it writes ``OUT/unseen/rank<r>.json`` with the error).
Per case, every rank writes ``OUT/<case>/rank<r>.json``: the engine, losses, telemetry, dominance history and the
train step times, so a test can check that the ranks agree; ``OUT/<case>/final`` holds the saved adapter and audit.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from peft import LoraConfig
from transformers import TrainerCallback
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from mm_trainer import MMSFTConfig, MMSFTTrainer
from mm_trainer.core.batch_guard import UnseenModalityError
from tests.kit import (
    end_process_group,
    image_text_dataset,
    make_processor,
    make_tokenizer,
    mixed_dataset,
    text_dataset,
    tiny_model,
    training_args,
)

FAMILY = "qwen2_5_vl"
CASES = ("text", "image", "image-imod")
LORA_TARGETS = ["q_proj", "v_proj", "down_proj"]


class StepTimes(TrainerCallback):
    """Wall time of every optimizer step (begin to end, on this rank)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


def engine_name(trainer: Any) -> str:
    """What the Trainer really runs: ``ddp``, ``fsdp2`` (or ``fsdp1``), ``zero2``/``zero3``, or ``single``; for an
    MMSFTTrainer checked against the engine its core trains under (`Engine.name`), which must be the same."""
    if trainer.is_deepspeed_enabled:
        ran = f"zero{trainer.model_wrapped.zero_optimization_stage()}"
    elif trainer.is_fsdp_enabled:
        from torch.distributed.fsdp import FSDPModule

        ran = "fsdp2" if isinstance(trainer.model, FSDPModule) else "fsdp1"
    else:
        ran = "ddp" if trainer.accelerator.num_processes > 1 else "single"
    mm = getattr(trainer, "mm", None)  # None for TRL's own SFTTrainer (the benchmark's reference jobs)
    if mm is not None and mm.engine.name != ran:
        raise RuntimeError(f"mm-trainer's engine is {mm.engine.name!r} but the Trainer runs {ran!r}")
    return ran


def run_unseen(out: Path, steps: int) -> None:
    """Rank 1's rows hold an image from row 1 on, every second row, rank 0's none; the profile reads row 0 only
    (text), so the run is planned text-only. Each rank records the error it stopped with."""
    rank = int(os.environ.get("RANK", "0"))
    unset_hf_deepspeed_config()
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    settings: dict[str, Any] = {
        "max_steps": steps,
        "seed": 3,
        "max_length": None,
        "per_device_train_batch_size": 2,
        "modality_sample_rows": 1,
        **({"ddp_backend": "gloo"} if deepspeed else {}),
    }
    trainer = MMSFTTrainer(
        model=tiny_model(FAMILY),
        args=training_args(out / "unseen" / "run", MMSFTConfig, **settings),
        train_dataset=mixed_dataset(16, family=FAMILY, image_every=2 if rank == 1 else 10**6),
        processing_class=make_processor(FAMILY),
        peft_config=LoraConfig(r=4, target_modules=LORA_TARGETS),
    )
    info: dict[str, Any] = {"text_only_plan": trainer.modality_profile.text_only, "raised": None}
    try:
        trainer.train()
    except UnseenModalityError as err:
        info["raised"] = str(err)
    info["deferred_check"] = trainer.mm.deferred_batch_check
    (out / "unseen").mkdir(parents=True, exist_ok=True)
    (out / "unseen" / f"rank{rank}.json").write_text(json.dumps(info, indent=1))


def run_case(out: Path, case: str, steps: int, logging_steps: int = 1) -> None:
    if case == "unseen":
        run_unseen(out, steps)
        return
    job = case.partition("@")[0]  # `text@2`: the job `text` again, written to OUT/text@2 (benchmark repetitions)
    plain_sft = job.endswith("-sft")
    no_telemetry = job.endswith("-notel")
    base_case = job.removesuffix("-sft").removesuffix("-notel")
    imod = base_case.endswith("-imod")
    data = base_case.removesuffix("-imod")
    if data == "text":
        dataset, processing = text_dataset(16), make_tokenizer(FAMILY)
    elif data == "image":
        dataset, processing = image_text_dataset(16, family=FAMILY), make_processor(FAMILY)
    else:
        raise ValueError(f"unknown case {case!r}; choose from {CASES} (optionally with -sft)")
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    settings: dict[str, Any] = {
        "max_steps": steps,
        "logging_steps": logging_steps,
        "seed": 3,
        "max_length": None,
        "per_device_train_batch_size": 2,
        "dataloader_drop_last": True,
        "gradient_checkpointing": False,
        # DeepSpeed on CPU: accelerate leaves the process group's backend unset and each rank thinks it is alone.
        **({"ddp_backend": "gloo"} if deepspeed else {}),
    }
    # A previous case's ZeRO-3 config stays registered in transformers and would build this model under zero.Init
    # (another init than DDP's): forget it first. The trainer registers its own again.
    unset_hf_deepspeed_config()
    model = tiny_model(FAMILY)
    peft_config = LoraConfig(r=4, target_modules=LORA_TARGETS)
    times = StepTimes()
    if plain_sft:  # plain TRL, same job: the reference of the benchmark
        from trl import SFTConfig, SFTTrainer

        args = training_args(out / case / "run", SFTConfig, **settings)
        trainer = SFTTrainer(
            model=model, args=args, train_dataset=dataset, processing_class=processing, peft_config=peft_config
        )
    else:
        # Releasing the unreached vision tower under FSDP is issue 11 item 2 (another branch): keep it here.
        settings.update(free_unreached_towers=False, dominance_steps=1, imod=imod)
        if no_telemetry:
            settings.update(tower_telemetry=False, audit=False)
        args = training_args(out / case / "run", MMSFTConfig, **settings)
        trainer = MMSFTTrainer(
            model=model, args=args, train_dataset=dataset, processing_class=processing, peft_config=peft_config
        )
    trainer.add_callback(times)
    collect_times: list[float] = []
    telemetry = getattr(trainer, "telemetry", None)
    if telemetry is not None:  # time the per-step collection (with its cross-rank reduction) for the benchmark
        collect = telemetry.collect

        def timed_collect() -> None:
            start = time.perf_counter()
            collect()
            collect_times.append(time.perf_counter() - start)

        telemetry.collect = timed_collect
    guard_times: list[float] = []
    guard = getattr(trainer, "batch_guard", None)
    if guard is not None:  # time the per-micro-batch modality check (one all-reduce of 3 flags on several ranks)
        check = guard.check

        def timed_check(*args: Any, **kwargs: Any) -> None:
            start = time.perf_counter()
            try:
                check(*args, **kwargs)
            finally:
                guard_times.append(time.perf_counter() - start)

        guard.check = timed_check
    trainer.train()
    if not plain_sft:  # plain TRL's save fails under FSDP2 (PEFT gets sharded tensors); the benchmark needs none
        trainer.save_model(str(out / case / "final"))
    rank = trainer.args.process_index
    info: dict[str, Any] = {
        "engine": engine_name(trainer),
        "world_size": trainer.args.world_size,
        "steps": trainer.state.global_step,
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "step_times": times.times,
        "collect_times": collect_times,
        "guard_times": guard_times,
    }
    if telemetry is not None:
        info["telemetry"] = telemetry.state_dict()
    balance = getattr(trainer, "modality_balance", None)
    if balance is not None and balance.dominance is not None:
        info["dominance"] = balance.dominance.history
    (out / case / f"rank{rank}.json").write_text(json.dumps(info, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("cases", nargs="+")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--logging-steps", type=int, default=1, help="the tests compare every step's log")
    ns = parser.parse_args()
    for case in ns.cases:
        run_case(ns.out, case, ns.steps, ns.logging_steps)


if __name__ == "__main__":
    main()
    end_process_group()
