"""Non-Text Dominance Rate of plain LoRA vs IMoD on a small synthetic image-text task, side by side.

    PYTHONPATH=. python tests/benchmarks/dominance_imod.py           # ~3 min on 2 CPU cores (3 seeds x 2 x 400 steps)

Task: the test kit's tiny Qwen2.5-VL (language model hidden 64, 2 layers; 2-block vision tower) learns to name the
colour of a square in an image ("[image] What color is this square?" -> "red", 8 colours, 64 rows). The answer is
in the image only. Images of ``--image-side`` px give ``(side / 28)²`` image tokens per row, next to ~20 text tokens
(chat template, question, answer). The random LM head is scaled by ``--head-scale`` (25: weights of std 0.5 instead
of 0.02, else the logits behind the final RMSNorm are too small for the loss to drop much below 5 nats). LoRA r=8 on every linear layer the data reaches (``"all-linear"``: language,
vision, projector), lr ``--lr`` (1e-2, constant), batch 4, ``--steps`` steps, for each seed in ``--seeds``; both modes start from the same
weights, adapters and batches. The rate (share of the language-model LoRA A/B elements whose per-modality Fisher
from image tokens exceeds that from text tokens; see :mod:`mm_trainer.imod.dominance`) is measured at step 1 and
every ``--every`` steps, each time on that step's batch alone, which makes single values noisy: we print block means
and the mean over the second half of training. We also print the mean training loss of the last 20 steps and how often the model's
greedy answer (first answer token) is the right colour on the 64 training rows.
"""

from __future__ import annotations

import argparse
import os
import statistics
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
from tests.benchmarks.common import image_text_rows, qwen2_5_vl_processor  # noqa: E402
from tests.kit import tiny_model  # noqa: E402


def train(imod: bool, seed: int, opts: argparse.Namespace, out: str) -> dict:
    """One run; the dominance history, the final loss and the colour accuracy."""
    data = image_text_rows(64, image_side=opts.image_side)
    model = tiny_model("qwen2_5_vl", seed=seed)
    with torch.no_grad():  # a random head (std 0.02) behind a final RMSNorm caps the logits: loss stalls near 5 nats
        model.lm_head.weight.mul_(opts.head_scale)
    trainer = MMSFTTrainer(
        model=model,
        args=MMSFTConfig(
            output_dir=out,
            max_steps=opts.steps,
            per_device_train_batch_size=4,
            learning_rate=opts.lr,
            lr_scheduler_type="constant",
            logging_steps=10,
            report_to="none",
            save_strategy="no",
            use_cpu=True,
            bf16=False,
            gradient_checkpointing=False,
            disable_tqdm=True,
            max_length=None,
            seed=seed,
            imod=imod,
            dominance_steps=opts.every,
        ),
        train_dataset=data,
        processing_class=qwen2_5_vl_processor(opts.image_side),
        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
    )
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    history = trainer.modality_balance.dominance.history
    return {
        "rates": {h["step"]: h["non_text_rate"] for h in history},
        "loss": statistics.mean(losses[-2:]),
        "accuracy": colour_accuracy(trainer, data),
        "msd": [h["imod/msd"] for h in trainer.state.log_history if "imod/msd" in h],
    }


@torch.no_grad()
def colour_accuracy(trainer: MMSFTTrainer, data) -> float:
    """Share of rows whose greedy first answer token is the first token of the right colour."""
    processor = trainer.processing_class
    model = trainer.model.eval()
    right = 0
    for row in data:
        prompt = processor.apply_chat_template(row["messages"][:1], add_generation_prompt=True, tokenize=False)
        inputs = processor(text=[prompt], images=[row["images"]], return_tensors="pt")
        logits = model(**inputs).logits[0, -1]
        answer = row["messages"][1]["content"][0]["text"].split(".")[0]
        target = processor.tokenizer(answer, add_special_tokens=False).input_ids[0]
        right += int(logits.argmax() == target)
    return right / len(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--block", type=int, default=50)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--image-side", type=int, default=112)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--head-scale", type=float, default=25.0)
    opts = parser.parse_args()
    torch.set_num_threads(2)
    start = time.time()
    runs: dict[bool, list[dict]] = {False: [], True: []}
    with tempfile.TemporaryDirectory() as out:
        for seed in opts.seeds:
            for imod in (False, True):
                runs[imod].append(train(imod, seed, opts, f"{out}/{seed}-{imod}"))
    image_tokens = (opts.image_side // 28) ** 2
    print(
        f"tiny Qwen2.5-VL, colour-of-square task, {image_tokens} image tokens/row, {opts.steps} steps, seeds "
        f"{opts.seeds}, rate measured every {opts.every} steps on that step's batch of 4 rows."
    )
    print(f"Non-Text Dominance Rate, mean of the measurements in each block of {opts.block} steps (per seed | mean):")
    print(f"{'steps':>9s}  {'plain LoRA':>28s}  {'IMoD':>28s}")
    blocks = [(1, 1)] + [(lo, lo + opts.block - 1) for lo in range(1, opts.steps + 1, opts.block)]
    for lo, hi in blocks:
        cells = []
        for imod in (False, True):
            values = []
            for run in runs[imod]:
                inside = [rate for step, rate in run["rates"].items() if lo <= step <= hi and (lo == hi or step > 1)]
                values.append(statistics.mean(inside))
            cells.append(" ".join(f"{v:.3f}" for v in values) + f" | {statistics.mean(values):.3f}")
        label = f"{lo}" if lo == hi else f"{lo}-{hi}"
        print(f"{label:>9s}  {cells[0]:>28s}  {cells[1]:>28s}")
    half = opts.steps // 2
    for imod in (False, True):
        late = [r for run in runs[imod] for step, r in run["rates"].items() if step > half]
        print(
            f"{'IMoD' if imod else 'plain LoRA'}: mean rate over steps {half + 1}-{opts.steps}, all seeds: "
            f"{statistics.mean(late):.3f} (sd {statistics.stdev(late):.3f}, n={len(late)})"
        )
    for label, key in (("final loss", "loss"), ("colour accuracy", "accuracy")):
        cells = [" ".join(f"{run[key]:.3f}" for run in runs[imod]) for imod in (False, True)]
        print(f"{label:>16s}: plain {cells[0]}   IMoD {cells[1]}")
    msd = [f"{run['msd'][0]:.3f}->{run['msd'][-1]:.3f}" for run in runs[True]]
    print(f"IMoD imod/msd first->last log: {' '.join(msd)}")
    print(f"({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
