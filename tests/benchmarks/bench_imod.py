"""Step time and peak memory of IMoD vs plain LoRA on the same model and batch, in one run.

    PYTHONPATH=. python tests/benchmarks/bench_imod.py                      # default shape (below)
    PYTHONPATH=. python tests/benchmarks/bench_imod.py --shape image-heavy  # 448 px images + short text, 4 layers

``--shape`` picks one of the batch shapes of :data:`SHAPES` (image size, answer length, decoder layers); the single
options (``--image-side``, ``--answer-words``, ``--layers``, ...) override it.

Model: a Qwen2.5-VL-architecture model (language model hidden 1024, intermediate 2816, 16 heads, 2 KV heads, 4
layers; the kit's tiny vision tower), fp32 on CPU. LoRA r=16, ``target_modules="all-linear"`` (language, vision and
projector adapters; IMoD constrains the 28 language ones). Batch: 4 image-text rows, 224 px images (64 image tokens
each) and a ~260-token answer. Goal: <= 1.05x time on the default and the image-heavy shape, an overhead of at most
twice the FLOP bound below on every shape, <= 1.05x memory.

- **Time**: both trainers are built in this process and their ``training_step`` (forward + backward, IMoD's injection
  included; the optimizer step, identical for both, is not timed, which makes the ratio conservative) alternates on
  the same batch; we report the minimum and the median over the repetitions, of wall time and of the process's CPU
  time (the 2 cores are shared with other jobs; the minimum is the least disturbed run). ``BENCH_THREADS`` sets the
  torch threads (default 2). A third trainer times a dominance-measuring step.
- **Memory**: each mode runs in a fresh subprocess (``MALLOC_MMAP_THRESHOLD_=65536``, so freed tensors leave the
  RSS); the peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs`` once model and batch are built) during 3
  steps minus the RSS before them is the memory the steps need; the process peak is printed too.
- **Profile**: IMoD's parts replayed one by one on the step's own tensors (the input of every constrained
  ``lora_A``, the batch's token layout), summed over the constrained layers, min CPU time over the repetitions:
  the token layout (once per micro-batch), arming and disarming, LoRA's own ``A`` products for scale, the widened
  forward product, MSDC and MAAC (all layers' responses stacked and computed in one batch, ``∂C/∂Z`` laid out in
  full width, as the injector does), and the injecting backward (its wider product and the zone-masked sum). IMoD
  adds no collective of its own: the injected gradient is all-reduced with the task gradient, in the same buckets
  (0 extra bytes), and the logged ``imod/msd`` / ``imod/ma`` cost one 4-number reduce per logging step.
- **Paired ratio**: each repetition runs plain LoRA then IMoD back to back; the median of the per-pair ratios is the
  statistic least exposed to the machine's drift (on a shared VM the step time moves by 10-20% between processes).

FLOP bound of the extra work, per constrained layer with ``A`` of ``r x d_in``, base weight ``d_in x d_out`` and
``N`` tokens. IMoD widens LoRA's own two products with ``X`` (see :mod:`mm_trainer.imod.inject`): the forward
computes ``X @ [A⊙M_o; A⊙M_t; A⊙M_s]ᵀ`` (``2r`` more columns than ``X Aᵀ``, whose blocks sum to it:
``2·N·d_in·2r``) and the backward ``[∂L/∂u + ∂C/∂Z_k]_kᵀ X`` (``2r`` more rows: ``2·N·d_in·2r``), ``8·N·d_in·r`` in
all, plus ``O(N·r)`` for the constraints themselves and ``O(r·d_in)`` for the masks. The bound printed is the one of
issue 17, ``12·N·d_in·r`` (the earlier ``4r``-wide products): the layer itself costs at least ``4·N·d_in·d_out``
(frozen base: forward and input gradient; LoRA, attention and the LM head only add to it), so the extra FLOPs are
at most ``3·r·Σ d_in / Σ (d_in·d_out)`` of the constrained layers' base FLOPs (``2·r·…`` now). The script prints that bound for its model and, for scale, for Qwen2.5-VL-7B's language model (hidden 3584,
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
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from peft import LoraConfig  # noqa: E402

from mm_trainer import MMSFTConfig, MMSFTTrainer  # noqa: E402
from mm_trainer.imod import TokenLayout, ZonedLoraA  # noqa: E402
from mm_trainer.imod.constraints import constraint_gradient, zone_masks  # noqa: E402
from mm_trainer.imod.inject import _full_width as full_width  # noqa: E402
from tests.benchmarks.common import image_text_rows, qwen2_5_vl_model, qwen2_5_vl_processor  # noqa: E402

SHAPES: dict[str, dict[str, int]] = {
    "default": {"image_side": 224, "answer_words": 200, "layers": 4},  # 4 rows, ~2k tokens, 256 of them image
    "image-heavy": {"image_side": 448, "answer_words": 0, "layers": 4},  # 4 x 256 image tokens + short text
    "image-heavy-2l": {"image_side": 448, "answer_words": 0, "layers": 2},
    "image-224-2l": {"image_side": 224, "answer_words": 0, "layers": 2},  # 4 x 64 image tokens + short text
    "image-56-2l": {"image_side": 56, "answer_words": 0, "layers": 2},  # 4 x 4 image tokens + short text
    "image-56-4l": {"image_side": 56, "answer_words": 0, "layers": 4},
}
"""Batch shapes of the benchmark (``--shape``): image side in pixels, filler words in the answer, decoder layers."""


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


def cpu_min(fn: Callable[[], object], reps: int) -> float:
    """Minimum CPU time of ``fn()`` over ``reps`` runs after one warm-up, seconds."""
    fn()
    best = float("inf")
    for _ in range(reps):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best


def profile(trainer: MMSFTTrainer, batch: dict, reps: int) -> dict[str, float]:
    """IMoD's parts, replayed one by one on the step's own tensors, CPU seconds per step (min over ``reps``)."""
    balance = trainer.modality_balance
    injector = balance.injector
    captured: dict[int, torch.Tensor] = {}
    handles = [
        module.register_forward_pre_hook(lambda m, args, _i=i: captured.setdefault(_i, args[0].detach()))
        for i, module in enumerate(injector._lora_a)
    ]
    step(trainer, batch)
    for handle in handles:
        handle.remove()
    layout = TokenLayout.from_batch(batch, trainer.model.config)
    scale = balance.constraint_scale(trainer.args.gradient_accumulation_steps)
    layers = []
    for i, x in captured.items():
        weight = injector._lora_a[i].weight.detach().clone().requires_grad_(True)
        x = x.clone().requires_grad_(True)
        masks = zone_masks(injector.masks.by_name[injector.adapters[i].name].zone)
        r, d = weight.shape
        responses = x.detach().reshape(-1, d) @ (weight.detach() * masks).view(3 * r, d).T
        layers.append((x, weight, masks, responses, torch.randn(*x.shape[:-1], r)))

    def lora_product() -> None:
        for x, weight, _, _, grad in layers:
            torch.nn.functional.linear(x, weight).backward(grad)

    def widened(step_of: Callable[[torch.Tensor], Callable | None]) -> Callable[[], None]:
        def run() -> None:
            for x, weight, masks, responses, grad in layers:
                ZonedLoraA.apply(x, weight, masks, step_of(responses)).backward(grad)

        return run

    def constraint(lambda_ma: float) -> Callable[[], None]:
        def run() -> None:  # as the injector does: every layer's responses stacked, one batched computation
            stacked = torch.stack([responses for *_, responses, _ in layers])
            full_width(constraint_gradient(stacked, layout, injector.lambda_msd, lambda_ma, scale), layout.text_rows)

        return run

    gradients = {
        id(responses): full_width(
            constraint_gradient(responses, layout, injector.lambda_msd, injector.lambda_ma, scale), layout.text_rows
        )
        for *_, responses, _ in layers
    }

    def precomputed(responses: torch.Tensor) -> Callable:
        gradient = gradients[id(responses)]  # computed above: only the backward's own work is timed
        return lambda _: gradient.clone

    def arming() -> None:
        injector.arm(layout, scale)
        injector.disarm()

    injector.micro_steps -= reps + 1  # arming() counts micro-steps; keep the audit's counters as they were
    injector.micro_steps_with_non_text -= (reps + 1) * int(layout.has_non_text)
    times = {
        "token layout (once per micro-batch)": cpu_min(
            lambda: TokenLayout.from_batch(batch, trainer.model.config), reps
        ),
        "arm + disarm": cpu_min(arming, reps),
        "LoRA A products fwd+bwd (plain, scale)": cpu_min(lora_product, reps),
        "zoned forward": cpu_min(widened(lambda z: None), reps),
        "MSDC": cpu_min(constraint(0.0), reps),
        "MSDC + MAAC": cpu_min(constraint(injector.lambda_ma), reps),
        "zoned forward + injecting backward": cpu_min(widened(precomputed), reps),
    }
    for x, weight, *_ in layers:
        x.grad = weight.grad = None
    return {
        "token layout (once per micro-batch)": times["token layout (once per micro-batch)"],
        "arm + disarm": times["arm + disarm"],
        "widened forward product (2r more columns)": times["zoned forward"]
        - times["LoRA A products fwd+bwd (plain, scale)"],
        "MSDC": times["MSDC"],
        "MAAC": times["MSDC + MAAC"] - times["MSDC"],
        "injecting backward (2r more rows, masked sum)": times["zoned forward + injecting backward"]
        - times["zoned forward"],
        "all-reduce (none of its own)": 0.0,
        "(LoRA A products fwd+bwd, plain LoRA)": times["LoRA A products fwd+bwd (plain, scale)"],
    }


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
    parser.add_argument("--shape", choices=sorted(SHAPES), default="default", help="batch shape preset")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--layers", type=int)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--image-side", type=int)
    parser.add_argument("--answer-words", type=int)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--no-dominance", action="store_true", help="skip the dominance-rate trainer")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--worker", choices=["plain", "imod"])
    opts = parser.parse_args()
    for key, value in SHAPES[opts.shape].items():
        if getattr(opts, key) is None:
            setattr(opts, key, value)
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    if opts.worker:
        worker(opts.worker, opts)
        return

    with tempfile.TemporaryDirectory() as out:
        modes = ("plain", "imod") if opts.no_dominance else ("plain", "imod", "dominance")
        trainers = {mode: build(mode, opts, f"{out}/{mode}") for mode in modes}
        plain, batch = trainers["plain"]
        tokens = int(batch["attention_mask"].sum())
        image_tokens = int((batch["input_ids"] == plain.model.config.image_token_id).sum())
        constrained = trainers["imod"][0].modality_balance.injector.adapters
        print(
            f"shape {opts.shape!r}: Qwen2.5-VL architecture, hidden {opts.hidden}, intermediate {opts.intermediate}, {opts.layers} "
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
        if "dominance" in trainers:
            measured = trainers["dominance"][0].modality_balance.dominance.history
            assert len(measured) == opts.reps + 1, "every step of the dominance trainer measures the rate"
        med = {m: statistics.median(v) for m, v in walls.items()}
        med_cpu = {m: statistics.median(v) for m, v in cpus.items()}
        parts = profile(*trainers["imod"], opts.reps)

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
    # Each repetition runs plain then IMoD back to back: the ratio within a pair is the least exposed to drift.
    paired = statistics.median(i / p for p, i in zip(cpus["plain"], cpus["imod"]))
    print(f"{'step time, paired CPU ratio':30s}{'':28s}{paired:9.3f}   (median over repetitions of IMoD / plain)")
    if "dominance" in mins_cpu:
        row(
            "dominance step, min CPU (s)",
            mins_cpu["plain"],
            mins_cpu["dominance"],
            note="   (plain LoRA measuring the rate: once every dominance_steps)",
        )
    print(f"wall times (s): { {m: [round(t, 3) for t in v] for m, v in walls.items()} }")
    print(f"CPU times (s): { {m: [round(t, 3) for t in v] for m, v in cpus.items()} }")
    bound = flop_bound(constrained, opts.rank)
    overhead = {
        "min CPU": mins_cpu["imod"] / mins_cpu["plain"] - 1,
        "median CPU": med_cpu["imod"] / med_cpu["plain"] - 1,
        "paired CPU": paired - 1,
    }
    print(
        f"FLOP bound of the extra work: {bound:.2%} of the constrained layers' base FLOPs here; "
        f"{qwen7b_bound(opts.rank):.2%} for Qwen2.5-VL-7B's language model at r={opts.rank}. IMoD's overhead: "
        + ", ".join(f"{v:+.2%} ({v / bound:.2f}x the bound) by {k}" for k, v in overhead.items())
    )
    print(f"profile of one IMoD step ({len(constrained)} constrained layers), min CPU ms over {opts.reps} replays:")
    extra = mins_cpu["imod"] - mins_cpu["plain"]
    for name, seconds in parts.items():
        print(f"  {name:42s}{seconds * 1e3:10.2f}")
    listed = sum(v for k, v in parts.items() if not k.startswith("("))
    print(f"  {'sum of IMoD parts':42s}{listed * 1e3:10.2f}   (measured step difference: {extra * 1e3:.2f})")
    sys.stdout.flush()

    mem: dict[str, dict] = {}
    # Large tensors get their own mappings, returned to the OS when freed, so RSS follows the live tensors.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MALLOC_MMAP_THRESHOLD_": "65536"}
    for mode in () if opts.no_memory else ("plain", "imod"):
        done = subprocess.run(
            [sys.executable, __file__, "--worker", mode, *sys.argv[1:]], capture_output=True, text=True, env=env
        )
        if done.returncode:
            raise RuntimeError(done.stderr[-3000:])
        mem[mode] = json.loads(done.stdout.strip().splitlines()[-1])

    if mem:
        print(f"{'':30s}{'plain LoRA':>14s}{'IMoD':>14s}{'ratio':>9s}")
        step_mem = {m: mem[m]["peak"] - mem[m]["rss_before"] for m in mem}
        row("step memory (MiB)", step_mem["plain"] * mib, step_mem["imod"] * mib, "14.1f")
        row("process peak RSS (MiB)", mem["plain"]["peak"] * mib, mem["imod"]["peak"] * mib, "14.1f")


if __name__ == "__main__":
    main()
