"""Image-text SFT of a Qwen-architecture VLM with IMoD (implicit modality decomposition) LoRA.

Offline out of the box, on the embedded default (a small Qwen2.5-VL-architecture model initialised from a seed, and
images of coloured squares to name), 2 CPU cores, a few minutes:

    accelerate launch recipes/qwen_vl_imod_sft.py --config recipes/configs/qwen_vl_imod_sft.yaml

The 4-bit variant (LoftQ-initialised nf4 language model, vision tower in full precision):

    accelerate launch recipes/qwen_vl_imod_sft.py --config recipes/configs/qwen_vl_imod_loftq.yaml

A real model and image-text dataset (needs the Hub and a GPU; only the source differs):

    accelerate launch recipes/qwen_vl_imod_sft.py --config recipes/configs/qwen_vl_imod_sft.yaml \
        --model_name_or_path Qwen/Qwen2.5-VL-7B-Instruct --dataset_name HuggingFaceH4/llava-instruct-mix-vsft
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from datasets import load_dataset
from trl import ScriptArguments, get_peft_config

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import embedded  # noqa: E402

from mm_trainer import MMSFTTrainer  # noqa: E402
from mm_trainer.training.evaluation import exact_match_accuracy  # noqa: E402


@dataclass
class RecipeArguments(ScriptArguments):
    """Data and evaluation settings of the recipe (plus TRL's dataset arguments)."""

    train_samples: int = field(default=512, metadata={"help": "Rows of the embedded training set."})
    eval_samples: int = field(default=48, metadata={"help": "Held-out rows scored by exact match before and after."})
    max_new_tokens: int = field(default=12, metadata={"help": "Generation budget of each evaluated answer."})


def parser():
    """The recipe's parser, with its defaults (a `--config` YAML and the command line override them)."""
    return common.make_parser(
        RecipeArguments,
        output_dir="outputs/qwen_vl_imod_sft",
        max_steps=200,
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        max_length=None,
        imod=True,
        dominance_steps=50,
    )


def color_answer(text: str) -> str:
    """The colour word a generated answer names ("" when none)."""
    words = [w.strip(".,!").lower() for w in text.split()]
    return next((w for w in reversed(words) if w in embedded.COLORS), "")


def main(argv: list[str] | None = None) -> dict:
    script_args, training_args, model_args = parser().parse_args_and_config(argv)
    model, processor = common.load_model(model_args, training_args, processor=True)
    if embedded.is_embedded(model_args.model_name_or_path):
        train_dataset = embedded.color_dataset(script_args.train_samples, seed=training_args.seed)
        eval_rows = embedded.color_dataset(script_args.eval_samples, seed=training_args.seed + 10_000)
    else:
        data = load_dataset(script_args.dataset_name, script_args.dataset_config)
        train_dataset, eval_rows = data[script_args.dataset_train_split], data.get(script_args.dataset_test_split)
    scorable = eval_rows is not None and "answer" in eval_rows.column_names
    trainer = MMSFTTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        processing_class=processor,
        peft_config=get_peft_config(model_args),
    )

    def score() -> float:
        return exact_match_accuracy(
            trainer.model, processor, eval_rows, color_answer, max_new_tokens=script_args.max_new_tokens, batch_size=8
        )["exact_match"]

    result: dict = {"exact_match_before": score()} if scorable else {}
    trainer.train()
    trainer.save_model()
    loss = common.losses(trainer)
    result.update(train_loss_first=loss[0], train_loss_last=loss[-1])
    history = trainer.state.log_history
    result["non_text_dominance_rate"] = [
        h["dominance/non_text_rate"] for h in history if "dominance/non_text_rate" in h
    ]
    if scorable:
        result["exact_match_after"] = score()
    common.report(trainer, result)
    common.end(trainer)
    return result


if __name__ == "__main__":
    main()
