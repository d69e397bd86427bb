"""Text-only SFT of a Qwen-architecture VLM, with LoRA targets derived from the data (language tower only).

Offline out of the box, on the embedded default (a small Qwen2.5-VL-architecture model initialised from a seed, and
arithmetic word problems with worked answers), 2 CPU cores, a few minutes:

    accelerate launch recipes/qwen_text_sft.py

The same recipe on a real model and dataset (only the source differs; needs the Hub and a GPU):

    accelerate launch recipes/qwen_text_sft.py --config recipes/configs/qwen_text_sft.yaml \
        --model_name_or_path Qwen/Qwen2.5-VL-7B-Instruct --dataset_name trl-lib/Capybara

Multi-GPU: add `--config_file recipes/accelerate/multi_gpu.yaml` (or fsdp.yaml, deepspeed_zero3.yaml) after `launch`.
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

    train_samples: int = field(default=4000, metadata={"help": "Rows of the embedded training set."})
    eval_samples: int = field(default=64, metadata={"help": "Held-out rows scored by exact match before and after."})
    max_new_tokens: int = field(default=24, metadata={"help": "Generation budget of each evaluated answer."})


def parser():
    """The recipe's parser, with its defaults (a `--config` YAML and the command line override them)."""
    return common.make_parser(
        RecipeArguments,
        output_dir="outputs/qwen_text_sft",
        max_steps=600,
        per_device_train_batch_size=16,
        learning_rate=3e-3,
        max_length=256,
    )


def load_data(args: RecipeArguments, seed: int):
    if args.dataset_name is None:
        return (
            embedded.arithmetic_dataset(args.train_samples, seed=seed),
            embedded.arithmetic_dataset(args.eval_samples, seed=seed, split="test"),
        )
    data = load_dataset(args.dataset_name, args.dataset_config, streaming=args.dataset_streaming)
    test = data.get(args.dataset_test_split) if hasattr(data, "get") else None
    return data[args.dataset_train_split], test


def main(argv: list[str] | None = None) -> dict:
    script_args, training_args, model_args = parser().parse_args_and_config(argv)
    model, tokenizer = common.load_model(model_args, training_args)
    train_dataset, eval_rows = load_data(script_args, training_args.seed)
    scorable = eval_rows is not None and "answer" in eval_rows.column_names
    trainer = MMSFTTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )

    def score() -> dict:
        return exact_match_accuracy(
            trainer.model, tokenizer, eval_rows, embedded.extract_answer, max_new_tokens=script_args.max_new_tokens
        )

    result: dict = {"exact_match_before": score()["exact_match"]} if scorable else {}
    train_output = trainer.train()
    trainer.save_model()
    loss = common.losses(trainer)
    result.update(train_loss_first=loss[0], train_loss_last=loss[-1])
    result["train_runtime_s"] = train_output.metrics.get("train_runtime")
    if scorable:
        after = score()
        result["exact_match_after"] = after["exact_match"]
        result["answers_after"] = {"predictions": after["predictions"], "references": after["references"]}
        result["example"] = {"question": eval_rows[0]["messages"][0]["content"], "answer": after["generations"][0]}
    common.report(trainer, result)
    common.end(trainer)
    return result


if __name__ == "__main__":
    main()
