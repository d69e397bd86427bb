"""IMoD evidence study: does text dominate LoRA's updates on a task with a text shortcut, and does IMoD change that?

Offline on the embedded small Qwen2.5-VL-architecture model (language model narrowed to 128 wide), 2 CPU cores:

    python recipes/imod_study.py             # 5 arms x 5 seeds, writes outputs/imod_study/ (~30 min, 1 thread)
    python recipes/imod_study.py --quick     # one seed, a few steps (what tests/test_imod_study.py runs)

1. **Base with a language prior.** The embedded model is fully fine-tuned on captions of coloured squares
   ("<image> This picture shows a red square.") and text-only arithmetic word problems, then cached under
   ``--cache_dir`` (``~/.cache/mm-trainer-study``, keyed by every setting it depends on; rebuilt when missing).
2. **Task with a text shortcut.** Visual question answering: "which colour is the square?" (4 colours). Each colour
   has its own question wording; on ``--shortcut_rate`` (85%) of the training rows the wording matches the colour,
   on the rest it is another colour's wording. Only the image decides the answer. Two held-out sets: *decorrelated*
   (wording drawn independently of the colour: following the wording scores chance, 25%) and *holds* (wording always
   matches). Rows are prompt-completion, so the loss is on the answer only, as in the paper's instruction tuning
   (``--completion_only_loss false`` puts it on every token). A vision-only linear probe on the base's image
   features shows the image signal is learnable.
3. **Arms** (same LoRA config, steps, data and seeds): plain LoRA with gradient clipping (``max_grad_norm``) on and
   off, IMoD at the paper's λ1=1, λ2=1e-4, and at both λ ×10 and ÷10 (clipping on, as plain LoRA's default).
4. **Measured** per run: the Non-Text Dominance Rate at step 1 and every ``dominance_steps``, accuracy of the first
   answer token (argmax over the 4 colours) on both held-out sets. Written to ``output_dir``: ``results.json``,
   ``results.md`` (mean ± 95% interval over seeds) and ``imod_study.png``. Finished runs are kept in
   ``output_dir/runs/`` and skipped when the study is run again with the same settings.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from PIL import Image
from trl import get_peft_config

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import embedded  # noqa: E402
import study_report  # noqa: E402

from mm_trainer import MMSFTConfig, MMSFTTrainer  # noqa: E402

logger = logging.getLogger(__name__)

STUDY_COLORS = ("red", "green", "blue", "yellow")
"""Answers of the task (their first tokens differ in the embedded tokenizer, so one logit decides)."""

WORDINGS: dict[str, str] = {
    "red": "What color is the square in this picture?",
    "green": "Which colour does the square have?",
    "blue": "Tell me the color of that square.",
    "yellow": "Name the colour you see in the middle.",
}
"""The question wording tied to each colour: the text shortcut."""

ARMS: dict[str, dict[str, Any]] = {
    "lora-clip": {"imod": False},
    "lora-noclip": {"imod": False, "max_grad_norm": 0.0},
    "imod": {"imod": True, "lambda_scale": 1.0},
    "imod-x10": {"imod": True, "lambda_scale": 10.0},
    "imod-div10": {"imod": True, "lambda_scale": 0.1},
}
"""Arm name -> what differs from the shared training arguments (λ scales multiply the configured λ1 and λ2)."""

VISION_TEXT = "<|vision_start|><|image_pad|><|vision_end|>"
DEFAULT_CACHE = Path(os.environ.get("MM_TRAINER_STUDY_CACHE", Path.home() / ".cache" / "mm-trainer-study"))


@dataclass
class StudyArguments:
    """The study's own settings (the training arguments are MMSFTConfig's, LoRA's are ModelConfig's)."""

    arms: list[str] = field(default_factory=lambda: list(ARMS), metadata={"help": f"Any of {list(ARMS)}."})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4], metadata={"help": "One run per arm and seed."})
    quick: bool = field(
        default=False,
        metadata={"help": "One seed, a few steps, small data and base (for tests; numbers mean little)."},
    )
    shortcut_rate: float = field(
        default=0.85, metadata={"help": "Share of training rows whose question wording matches the answer colour."}
    )
    train_samples: int = field(default=1024, metadata={"help": "Training rows of the VQA task."})
    eval_samples: int = field(default=200, metadata={"help": "Rows of each held-out set."})
    image_side: int = field(default=56, metadata={"help": "Image side in pixels (a multiple of 28)."})
    noise: float = field(default=40.0, metadata={"help": "Std of the Gaussian pixel noise added to every image."})
    pretrain_steps: int = field(default=300, metadata={"help": "Full fine-tuning steps that build the base."})
    pretrain_batch_size: int = field(default=16, metadata={"help": "Rows per base step (half captions, half text)."})
    pretrain_learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate of the base."})
    cache_dir: str = field(default=str(DEFAULT_CACHE), metadata={"help": "Where the pretrained base is cached."})
    probe_steps: int = field(default=300, metadata={"help": "Full-batch Adam steps of the vision-only probe."})
    threads: int = field(
        default=1,
        metadata={
            "help": "torch CPU threads (1: on a busy 2-core machine, 2 threads ran this small model ~40x slower)."
        },
    )


QUICK: dict[str, Any] = {
    "seeds": [0],
    "train_samples": 48,
    "eval_samples": 16,
    "pretrain_steps": 8,
    "pretrain_batch_size": 8,
    "probe_steps": 50,
}
QUICK_TRAINING: dict[str, Any] = {"max_steps": 4, "dominance_steps": 2, "logging_steps": 2, "warmup_steps": 1}
"""What ``--quick`` overrides (study settings, training settings)."""


def parser():
    """The study's parser, with its defaults (a `--config` YAML and the command line override them)."""
    return common.make_parser(
        StudyArguments,
        output_dir="outputs/imod_study",
        max_steps=200,
        per_device_train_batch_size=8,
        learning_rate=2e-3,
        warmup_steps=10,
        logging_steps=10,
        dominance_steps=10,
        max_length=None,
        lora_r=8,
        lora_alpha=16,
        disable_tqdm=True,
    )


# --------------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------------
def noisy_square(color: str, rng: random.Random, side: int, noise: float) -> Image.Image:
    """A square of ``color`` (random shade and size) on grey, with Gaussian pixel noise of std ``noise``."""
    canvas = np.full((side, side, 3), 128.0, dtype=np.float32)
    half = int(side * rng.uniform(0.18, 0.32))
    cy, cx = rng.randint(half, side - half), rng.randint(half, side - half)
    canvas[cy - half : cy + half, cx - half : cx + half] = np.array(embedded.COLORS[color]) * rng.uniform(0.6, 1.0)
    canvas += np.random.default_rng(rng.getrandbits(32)).normal(0.0, noise, canvas.shape)
    return Image.fromarray(canvas.clip(0, 255).round().astype(np.uint8), mode="RGB")


def vqa_rows(n: int, seed: int, shortcut_rate: float | None, side: int, noise: float) -> Dataset:
    """``n`` TRL vision rows of the task.

    Args:
        shortcut_rate: Probability that the wording is the answer colour's own (else another colour's, uniformly);
            ``None`` draws the wording independently of the colour (the decorrelated set).
    """
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        color = rng.choice(STUDY_COLORS)
        if shortcut_rate is None:
            cue = rng.choice(STUDY_COLORS)
        elif rng.random() < shortcut_rate:
            cue = color
        else:
            cue = rng.choice([c for c in STUDY_COLORS if c != color])
        rows.append(
            {
                "images": [noisy_square(color, rng, side, noise)],
                "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": WORDINGS[cue]}]}],
                "completion": [{"role": "assistant", "content": [{"type": "text", "text": f"{color}."}]}],
                "answer": color,
                "cue": cue,
            }
        )
    return Dataset.from_list(rows)


def pretrain_batch(rng: random.Random, size: int, side: int, noise: float) -> tuple[list[str], list[Image.Image]]:
    """Half captions of coloured squares (every embedded colour), half text-only arithmetic problems."""
    texts, images = [], []
    for _ in range(size - size // 2):
        color = rng.choice(list(embedded.COLORS))
        images.append(noisy_square(color, rng, side, noise))
        texts.append(f"{VISION_TEXT}This picture shows a {color} square.")
    for row in embedded.arithmetic_dataset(size // 2, seed=rng.getrandbits(31)):
        texts.append(f"{row['messages'][0]['content']} {row['messages'][1]['content']}")
    return texts, images


# --------------------------------------------------------------------------------------------------------------------
# The pretrained base
# --------------------------------------------------------------------------------------------------------------------
STUDY_TEXT_CONFIG: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 352,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
"""The study narrows the embedded language model (256 -> 128 wide, same 4 layers, vocabulary and vision tower) so that
25 runs fit in ~40 minutes on 2 CPU cores."""


def study_config() -> Any:
    """The embedded model's config with the language model narrowed to :data:`STUDY_TEXT_CONFIG`."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(embedded.ASSET_DIR)
    for key, value in STUDY_TEXT_CONFIG.items():
        setattr(config.text_config, key, value)
    half = STUDY_TEXT_CONFIG["hidden_size"] // STUDY_TEXT_CONFIG["num_attention_heads"] // 2
    config.text_config.rope_parameters["mrope_section"] = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]
    config.vision_config.out_hidden_size = STUDY_TEXT_CONFIG["hidden_size"]
    return config


def study_model(seed: int = 0) -> Any:
    """A seeded random init of :func:`study_config` (float32)."""
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(seed)
    return AutoModelForImageTextToText.from_config(study_config(), dtype=torch.float32)


def base_settings(study: StudyArguments) -> dict[str, Any]:
    """Everything the base depends on (its cache key)."""
    config = study_config().to_json_string(use_diff=False)
    return {
        "config_sha": hashlib.sha256(config.encode()).hexdigest()[:16],
        "steps": study.pretrain_steps,
        "batch_size": study.pretrain_batch_size,
        "learning_rate": study.pretrain_learning_rate,
        "image_side": study.image_side,
        "noise": study.noise,
        "torch": torch.__version__.split("+")[0],
        "version": 1,
    }


def pretrained_base(study: StudyArguments, processor: Any) -> Path:
    """The cached base checkpoint directory; built (full fine-tuning, seed 0) when missing."""
    settings = base_settings(study)
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    path = Path(study.cache_dir).expanduser() / f"base-{key}"
    if (path / "study_base.json").is_file():
        return path
    start = time.time()
    model = study_model(seed=0)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=study.pretrain_learning_rate, weight_decay=0.0)
    warmup = max(1, study.pretrain_steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * s / study.pretrain_steps))
    )
    tokenizer = processor.tokenizer
    image_ids = {model.config.image_token_id, model.config.vision_start_token_id, model.config.vision_end_token_id}
    rng = random.Random(0)
    losses = []
    for step in range(study.pretrain_steps):
        texts, images = pretrain_batch(rng, study.pretrain_batch_size, study.image_side, study.noise)
        texts = [t + tokenizer.eos_token for t in texts]
        inputs = processor(text=texts, images=images, padding=True, return_tensors="pt")
        labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
        for token in image_ids:
            labels = labels.masked_fill(inputs["input_ids"] == token, -100)
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % 50 == 0:
            logger.warning("base step %d/%d: loss %.3f", step + 1, study.pretrain_steps, np.mean(losses[-50:]))
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    record = {
        **settings,
        "loss_first": losses[0],
        "loss_last": float(np.mean(losses[-10:])),
        "seconds": time.time() - start,
    }
    (tmp / "study_base.json").write_text(json.dumps(record, indent=1))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)  # atomic on one file system: a half-written base is never used
    return path


def load_base(path: Path) -> Any:
    """The base model from its cache directory (float32)."""
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)


# --------------------------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------------------------
def colour_token_ids(tokenizer: Any) -> list[int]:
    """First token of each study colour; they must differ for a single logit to decide the answer."""
    ids = [tokenizer(c, add_special_tokens=False).input_ids[0] for c in STUDY_COLORS]
    if len(set(ids)) != len(ids):
        raise ValueError(f"The study colours {STUDY_COLORS} share a first token in this tokenizer: {ids}.")
    return ids


@torch.no_grad()
def predict(model: Any, processor: Any, rows: Dataset, batch_size: int = 32) -> list[str]:
    """The colour whose first token has the highest next-token logit after each row's prompt (greedy, 4-way)."""
    tokenizer = processor.tokenizer
    candidates = torch.tensor(colour_token_ids(tokenizer))
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    was_training = model.training
    model.eval()
    predictions: list[str] = []
    try:
        for start in range(0, len(rows), batch_size):
            chunk = rows.select(range(start, min(start + batch_size, len(rows))))
            prompts = [
                processor.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False) for r in chunk
            ]
            images = [r["images"][0] for r in chunk]
            inputs = processor(text=prompts, images=images, padding=True, return_tensors="pt")
            inputs = {k: v.to(model.device) if torch.is_tensor(v) else v for k, v in inputs.items()}
            logits = model(**inputs).logits[:, -1, :]
            predictions += [STUDY_COLORS[i] for i in logits[:, candidates.to(logits.device)].argmax(-1).tolist()]
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return predictions


def scores(model: Any, processor: Any, decorrelated: Dataset, holds: Dataset) -> dict[str, float]:
    """Accuracy on both held-out sets, and how often the model answers the wording's colour on the decorrelated set."""
    on_decorrelated = predict(model, processor, decorrelated)
    on_holds = predict(model, processor, holds)
    return {
        "acc_decorrelated": float(np.mean([p == a for p, a in zip(on_decorrelated, decorrelated["answer"])])),
        "acc_holds": float(np.mean([p == a for p, a in zip(on_holds, holds["answer"])])),
        "follows_wording": float(np.mean([p == c for p, c in zip(on_decorrelated, decorrelated["cue"])])),
    }


@torch.no_grad()
def image_features(model: Any, processor: Any, rows: Dataset) -> torch.Tensor:
    """Mean of the projector's output over each image's tokens (what the language model receives), per row."""
    feats = []
    for start in range(0, len(rows), 64):
        images = rows[start : start + 64]["images"]
        inputs = processor.image_processor(images=[ims[0] for ims in images], return_tensors="pt")
        out = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        feats += [t.mean(0) for t in out.pooler_output]
    return torch.stack(feats)


def vision_probe(model: Any, processor: Any, train: Dataset, test: Dataset, steps: int) -> float:
    """Accuracy on ``test`` of a linear classifier trained on the frozen base's image features of ``train``."""
    x_train, x_test = image_features(model, processor, train), image_features(model, processor, test)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    y_train = torch.tensor([STUDY_COLORS.index(a) for a in train["answer"]])
    y_test = torch.tensor([STUDY_COLORS.index(a) for a in test["answer"]])
    torch.manual_seed(0)
    probe = torch.nn.Linear(x_train.shape[1], len(STUDY_COLORS))
    optimizer = torch.optim.Adam(probe.parameters(), lr=1e-2, weight_decay=1e-3)
    with torch.enable_grad():
        for _ in range(steps):
            loss = torch.nn.functional.cross_entropy(probe(x_train), y_train)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        return float((probe(x_test).argmax(-1) == y_test).float().mean())


# --------------------------------------------------------------------------------------------------------------------
# Arms
# --------------------------------------------------------------------------------------------------------------------
def arm_args(arm: str, seed: int, args: MMSFTConfig) -> MMSFTConfig:
    """The training arguments of one arm and seed (a copy; everything else shared)."""
    if arm not in ARMS:
        raise ValueError(f"Unknown arm {arm!r}; choose from {list(ARMS)}.")
    spec = dict(ARMS[arm])
    args = copy.copy(args)
    args.output_dir = str(Path(args.output_dir) / "runs" / f"{arm}-seed{seed}")
    args.seed = seed
    args.imod = spec.pop("imod")
    scale = spec.pop("lambda_scale", 1.0)
    args.imod_lambda_msd, args.imod_lambda_ma = args.imod_lambda_msd * scale, args.imod_lambda_ma * scale
    for key, value in spec.items():
        setattr(args, key, value)
    return args


def run_arm(arm: str, seed: int, args: MMSFTConfig, peft_config: Any, base: Path, processor: Any, data: dict) -> dict:
    """Train one arm from the base and measure it."""
    args = arm_args(arm, seed, args)
    start = time.time()
    trainer = MMSFTTrainer(
        model=load_base(base),
        args=args,
        train_dataset=data["train"],
        processing_class=processor,
        peft_config=copy.deepcopy(peft_config),
    )
    trainer.train()
    history = trainer.modality_balance.dominance.history
    result = {
        "arm": arm,
        "seed": seed,
        "rates": {int(h["step"]): float(h["non_text_rate"]) for h in history},
        "train_loss_last": common.losses(trainer)[-1],
        "imod_lambda_msd": args.imod_lambda_msd if args.imod else None,
        "imod_lambda_ma": args.imod_lambda_ma if args.imod else None,
        "max_grad_norm": args.max_grad_norm,
        **scores(trainer.model, processor, data["decorrelated"], data["holds"]),
    }
    result["seconds"] = time.time() - start
    return result


def _settings(study: StudyArguments, args: MMSFTConfig, peft_config: Any) -> dict[str, Any]:
    """What a finished run depends on besides its arm and seed (reused only when equal)."""
    keep = ("max_steps", "per_device_train_batch_size", "learning_rate", "warmup_steps", "lr_scheduler_type")
    keep += ("dominance_steps", "max_grad_norm", "imod_lambda_msd", "imod_lambda_ma", "imod_shared_ratio")
    keep += ("completion_only_loss", "imod_alpha")
    study_keys = ("shortcut_rate", "train_samples", "eval_samples", "image_side", "noise")
    return {
        "base": base_settings(study),
        **{k: getattr(study, k) for k in study_keys},
        **{k: str(getattr(args, k)) for k in keep},
        "lora": {"r": peft_config.r, "alpha": peft_config.lora_alpha, "targets": str(peft_config.target_modules)},
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    study, training_args, model_args = parser().parse_args_and_config(argv)
    if not embedded.is_embedded(model_args.model_name_or_path):
        raise ValueError("The IMoD study runs on the embedded model only (it builds its own base and task).")
    if study.quick:
        for key, value in QUICK.items():
            setattr(study, key, value)
        for key, value in QUICK_TRAINING.items():
            setattr(training_args, key, value)
    if training_args.dominance_steps <= 0:
        raise ValueError("The study measures the dominance rate: set `dominance_steps` > 0.")
    threads = torch.get_num_threads()
    torch.set_num_threads(study.threads)
    try:
        return _run(study, training_args, model_args)
    finally:
        torch.set_num_threads(threads)


def _run(study: StudyArguments, training_args: MMSFTConfig, model_args: Any) -> dict[str, Any]:
    """The study proper (see the module docstring)."""
    out = Path(training_args.output_dir)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    start = time.time()
    processor = embedded.embedded_processor()
    peft_config = get_peft_config(model_args)
    base = pretrained_base(study, processor)
    data = {
        "train": vqa_rows(study.train_samples, 1, study.shortcut_rate, study.image_side, study.noise),
        "decorrelated": vqa_rows(study.eval_samples, 2, None, study.image_side, study.noise),
        "holds": vqa_rows(study.eval_samples, 3, 1.0, study.image_side, study.noise),
    }
    base_model = load_base(base)
    reference = {
        "base": json.loads((base / "study_base.json").read_text()),
        "base_zero_shot": scores(base_model, processor, data["decorrelated"], data["holds"]),
        "vision_probe_decorrelated": vision_probe(
            base_model, processor, data["train"], data["decorrelated"], study.probe_steps
        ),
        "shortcut_rate_measured": float(
            np.mean([a == c for a, c in zip(data["train"]["answer"], data["train"]["cue"])])
        ),
    }
    del base_model
    settings = _settings(study, training_args, peft_config)
    runs: dict[str, list[dict]] = {arm: [] for arm in study.arms}
    trained = 0
    for seed in study.seeds:
        for arm in study.arms:
            path = out / "runs" / f"{arm}-seed{seed}.json"
            saved = json.loads(path.read_text()) if path.is_file() else {}
            if saved.get("settings") == settings:
                result = saved["result"]
                result["rates"] = {int(k): v for k, v in result["rates"].items()}
            else:
                result = run_arm(arm, seed, training_args, peft_config, base, processor, data)
                trained += 1
                path.write_text(json.dumps({"settings": settings, "result": result}, indent=1))
            runs[arm].append(result)
            logger.warning(
                "%s seed %d: rate %.3f -> %.3f, acc decorrelated %.3f, holds %.3f (%.0f s)", arm, seed,
                result["rates"][min(result["rates"])], result["rates"][max(result["rates"])],
                result["acc_decorrelated"], result["acc_holds"], result["seconds"],
            )  # fmt: skip
    return write_report(out, study, training_args, reference, runs, time.time() - start, trained)


def _median_seconds(runs: dict[str, list[dict]]) -> float:
    """Median wall time of one run (training and both evaluations)."""
    return float(np.median([r["seconds"] for rs in runs.values() for r in rs]))


LABELS = {
    "lora-clip": "LoRA, clip on",
    "lora-noclip": "LoRA, clip off",
    "imod": "IMoD λ1=1, λ2=1e-4",
    "imod-x10": "IMoD λ ×10",
    "imod-div10": "IMoD λ ÷10",
}


def write_report(
    out: Path, study: StudyArguments, args: MMSFTConfig, reference: dict, runs: dict, seconds: float, trained: int
) -> dict[str, Any]:
    """``results.json``, ``results.md`` and ``imod_study.png`` in ``out``; returns what results.json holds."""
    labels = {**LABELS, "imod": f"IMoD λ1={args.imod_lambda_msd:g}, λ2={args.imod_lambda_ma:g}"}
    zero = reference["base_zero_shot"]
    chance = 1 / len(STUDY_COLORS)
    title = (
        f"loss on {'every token' if args.completion_only_loss is False else 'the answer'}, "
        f"{args.max_steps} steps, batch {args.per_device_train_batch_size}, lr {args.learning_rate:g}, "
        f"{study.train_samples} rows ({reference['shortcut_rate_measured']:.0%} follow the wording), "
        f"seeds {study.seeds}"
    )
    picture = study_report.draw(
        runs,
        labels,
        out / "imod_study.png",
        title=title,
        references={"vision probe": reference["vision_probe_decorrelated"], "chance": chance},
    )
    table = study_report.markdown_table(runs, labels)
    paired = study_report.paired_table(runs, labels, reference="lora-clip")
    text = (
        f"# IMoD study\n\n{title}; dominance rate every {args.dominance_steps} steps; mean ± 95% interval "
        f"(Student t over seeds).\n\n{table}\n"
        + (
            f"Paired by seed, difference to plain LoRA with clipping (percentage points):\n\n{paired}\n"
            if paired
            else ""
        )
        + f"- Vision-only linear probe on the base's image features, decorrelated set: "
        f"{reference['vision_probe_decorrelated']:.1%}\n"
        f"- Base before fine-tuning: decorrelated {zero['acc_decorrelated']:.1%}, holds {zero['acc_holds']:.1%}; "
        f"chance {chance:.0%}\n"
        f"- Base: {study.pretrain_steps} full fine-tuning steps, loss {reference['base']['loss_first']:.3f} -> "
        f"{reference['base']['loss_last']:.3f} ({reference['base']['seconds'] / 60:.1f} min when built)\n"
        f"- Runtime: {seconds / 60:.1f} min ({trained} of {sum(map(len, runs.values()))} runs trained in this call, "
        f"{study.threads} thread(s); one run: {_median_seconds(runs):.0f} s median)\n"
    )
    (out / "results.md").write_text(text)
    result = {
        "study": asdict(study),
        "reference": reference,
        "runs": runs,
        "table": table,
        "paired": paired,
        "picture": str(picture),
        "seconds": seconds,
    }
    (out / "results.json").write_text(json.dumps(result, indent=1, default=str))
    print(text)
    return result


if __name__ == "__main__":
    main()
