"""Step time and peak memory of IMoD vs plain LoRA on the same model and batch, in one run.

    PYTHONPATH=. python tests/benchmarks/bench_imod.py            # hidden 1024, 4 layers, batch 4, ~330 tokens/row

Model: a Qwen2.5-VL-architecture model (language model hidden 1024, intermediate 2816, 16 heads, 2 KV heads, 4
layers; the kit's tiny vision tower), fp32 on CPU. LoRA r=16, ``target_modules="all-linear"`` (language, vision and
projector adapters; IMoD constrains the 28 language ones). Batch: 4 image-text rows, 224 px images (64 image tokens
each) and a ~260-token answer. Goal: <= 1.10x time, <= 1.05x memory.

- **Time**: both trainers are built in this process and their ``training_step`` (forward + backward, IMoD's injection
  included; the optimizer step, identical for both, is not timed, which makes the ratio conservative) alternates on
  the same batch; we report the minimum and the median over the repetitions, of wall time and of the process's CPU
  time (the 2 cores are shared with other jobs; the minimum is the least disturbed run). ``BENCH_THREADS`` sets the
  torch threads (default 2). A third trainer times a dominance-measuring step.
- **Memory**: each mode runs in a fresh subprocess (``MALLOC_MMAP_THRESHOLD_=65536``, so freed tensors leave the
  RSS); the peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs`` once model and batch are built) during 3
  steps minus the RSS before them is the memory the steps need; the process peak is printed too.

FLOP bound of the extra work, per constrained layer with ``A`` of ``r x d_in``, base weight ``d_in x d_out`` and
``N`` tokens. IMoD widens LoRA's own two products with ``X`` (see :mod:`mm_trainer.imod.inject`): the forward
computes ``X @ [A; A⊙M_o; A⊙M_t; A⊙M_s]ᵀ`` (``3r`` more columns: ``2·N·d_in·3r``) and the backward
``[∂L/∂u | ∂C/∂Z]ᵀ X`` (``3r`` more rows: ``2·N·d_in·3r``), ``12·N·d_in·r`` in all, plus ``O(N·r)`` for the
constraints themselves and ``O(r·d_in)`` for the masks. (Computing only the rows each term needs would take
``8·N·d_in·r`` but two more reads of ``X``; the products are bound by reading ``X``, so we take the FLOPs.) The layer
itself costs at least ``4·N·d_in·d_out`` (frozen base: forward and input gradient; LoRA, attention and the LM head
only add to it), so the extra FLOPs are at most ``3·r·Σ d_in / Σ (d_in·d_out)`` of the constrained layers' base
FLOPs. The script prints that bound for its model and, for scale, for Qwen2.5-VL-7B's language model (hidden 3584,
intermediate 18944, 28 layers).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from peft import LoraConfig  # noqa: E402

from mm_trainer import MMSFTConfig, MMSFTTrainer  # noqa: E402
from tests.benchmarks.common import image_text_rows, qwen2_5_vl_model, qwen2_5_vl_processor  # noqa: E402


def build(mode: str, opts: argparse.Namespace, out: str) -> tuple[MMSFTTrainer, dict]:
    """A trainer in ``mode`` (``plain`` / ``imod``) and one collated batch."""
    args = MMSFTConfig(
        output_dir=out,
        per_device_train_batch_size=opts.batch,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        disable_tqdm=True,
        max_length=None,
        gradient_checkpointing=opts.gradient_checkpointing,
        target_probe=False,
        tower_telemetry=False,
        imod=mode == "imod",
        dominance_steps=0 if mode != "dominance" else 1,
        seed=0,
    )
    data = image_text_rows(opts.batch, image_side=opts.image_side, answer_words=opts.answer_words)
    trainer = MMSFTTrainer(
        model=qwen2_5_vl_model(hidden=opts.hidden, layers=opts.layers, intermediate=opts.intermediate),
        args=args,
        train_dataset=data,
        processing_class=qwen2_5_vl_processor(opts.image_side),
        peft_config=LoraConfig(r=opts.rank, lora_alpha=2 * opts.rank, target_modules="all-linear"),
    )
    if opts.gradient_checkpointing:
        trainer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        trainer.model.enable_input_require_grads()
    batch = trainer._prepare_inputs(trainer.data_collator([data[i] for i in range(opts.batch)]))
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    return trainer, batch


def step(trainer: MMSFTTrainer, batch: dict) -> tuple[float, float]:
    """One forward + backward: (wall seconds, CPU seconds of this process)."""
    wall, cpu = time.perf_counter(), time.process_time()
    trainer.training_step(trainer.model, dict(batch))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    trainer.model.zero_grad(set_to_none=True)
    return wall, cpu


def memory_status() -> dict[str, int]:
    """Current (``VmRSS``) and peak (``VmHWM``) resident memory of this process, bytes."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) * 1024
    return values


def worker(mode: str, opts: argparse.Namespace) -> None:
    """Memory of one mode, in a fresh process: peak RSS during 3 steps minus RSS before them.

    The peak is reset (``/proc/self/clear_refs``) once the model and batch are built, so it covers the steps only.
    """
    with tempfile.TemporaryDirectory() as out:
        trainer, batch = build(mode, opts, out)
        before = memory_status()["VmRSS"]
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        for _ in range(3):
            step(trainer, batch)
        peak = memory_status()["VmHWM"]
    print(json.dumps({"mode": mode, "rss_before": before, "peak": peak}))


def flop_bound(adapters: list, rank: int) -> float:
    """``3·r·Σ d_in / Σ (d_in·d_out)`` over the constrained adapters (see the module docstring)."""
    sum_in = sum(a.lora_A.shape[1] for a in adapters)
    sum_base = sum(a.lora_A.shape[1] * a.lora_B.shape[0] for a in adapters)
    return 3 * rank * sum_in / sum_base


def qwen7b_bound(rank: int) -> float:
    hidden, inter, kv = 3584, 18944, 512
    shapes = [
        (hidden, hidden),
        (hidden, kv),
        (hidden, kv),
        (hidden, hidden),
        (hidden, inter),
        (hidden, inter),
        (inter, hidden),
    ]
    return 3 * rank * sum(i for i, _ in shapes) / sum(i * o for i, o in shapes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--image-side", type=int, default=224)
    parser.add_argument("--answer-words", type=int, default=200)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--worker", choices=["plain", "imod"])
    opts = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    if opts.worker:
        worker(opts.worker, opts)
        return

    with tempfile.TemporaryDirectory() as out:
        trainers = {mode: build(mode, opts, f"{out}/{mode}") for mode in ("plain", "imod", "dominance")}
        plain, batch = trainers["plain"]
        tokens = int(batch["attention_mask"].sum())
        image_tokens = int((batch["input_ids"] == plain.model.config.image_token_id).sum())
        constrained = trainers["imod"][0].modality_balance.injector.adapters
        print(
            f"model: Qwen2.5-VL architecture, hidden {opts.hidden}, intermediate {opts.intermediate}, {opts.layers} "
            f"layers, fp32, LoRA r={opts.rank} all-linear ({len(plain.adapters)} adapters, {len(constrained)} "
            f"constrained by IMoD); batch {opts.batch} rows, {tokens} tokens ({image_tokens} image); gradient "
            f"checkpointing {'on' if opts.gradient_checkpointing else 'off'}; torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads"
        )
        walls: dict[str, list[float]] = {m: [] for m in trainers}
        cpus: dict[str, list[float]] = {m: [] for m in trainers}
        for trainer, b in trainers.values():  # warm-up
            step(trainer, b)
        for _ in range(opts.reps):  # interleaved, so that load from other processes hits every mode alike
            for mode, (trainer, b) in trainers.items():  # "dominance": global_step stays 0, every step is measured
                wall, cpu = step(trainer, b)
                walls[mode].append(wall)
                cpus[mode].append(cpu)
        measured = trainers["dominance"][0].modality_balance.dominance.history
        assert len(measured) == opts.reps + 1, "every step of the dominance trainer measures the rate"
        med = {m: statistics.median(v) for m, v in walls.items()}
        med_cpu = {m: statistics.median(v) for m, v in cpus.items()}

    mem = {}
    # Large tensors get their own mappings, returned to the OS when freed, so RSS follows the live tensors.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MALLOC_MMAP_THRESHOLD_": "65536"}
    for mode in ("plain", "imod"):
        done = subprocess.run(
            [sys.executable, __file__, "--worker", mode, *sys.argv[1:]], capture_output=True, text=True, env=env
        )
        if done.returncode:
            raise RuntimeError(done.stderr[-3000:])
        mem[mode] = json.loads(done.stdout.strip().splitlines()[-1])

    mib = 1 / 2**20

    def row(label: str, plain: float, other: float, fmt: str = "14.3f", note: str = "") -> None:
        print(f"{label:30s}{plain:{fmt}}{other:{fmt}}{other / plain:9.3f}{note}")

    print(f"{'':30s}{'plain LoRA':>14s}{'IMoD':>14s}{'ratio':>9s}")
    mins = {m: min(v) for m, v in walls.items()}
    mins_cpu = {m: min(v) for m, v in cpus.items()}
    row("step time, min wall (s)", mins["plain"], mins["imod"])
    row("step time, min CPU (s)", mins_cpu["plain"], mins_cpu["imod"])
    row("step time, median wall (s)", med["plain"], med["imod"])
    row("step time, median CPU (s)", med_cpu["plain"], med_cpu["imod"])
    step_mem = {m: mem[m]["peak"] - mem[m]["rss_before"] for m in mem}
    row("step memory (MiB)", step_mem["plain"] * mib, step_mem["imod"] * mib, "14.1f")
    row("process peak RSS (MiB)", mem["plain"]["peak"] * mib, mem["imod"]["peak"] * mib, "14.1f")
    row(
        "dominance step, min CPU (s)",
        mins_cpu["plain"],
        mins_cpu["dominance"],
        note="   (plain LoRA measuring the rate: once every dominance_steps)",
    )
    print(f"wall times (s): { {m: [round(t, 2) for t in v] for m, v in walls.items()} }")
    print(f"CPU times (s): { {m: [round(t, 2) for t in v] for m, v in cpus.items()} }")
    print(
        f"FLOP bound of the extra work: {flop_bound(constrained, opts.rank):.2%} of the constrained layers' base "
        f"FLOPs here; {qwen7b_bound(opts.rank):.2%} for Qwen2.5-VL-7B's language model at r={opts.rank}"
    )


if __name__ == "__main__":
    main()
