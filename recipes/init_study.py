"""The LoRA-init study as one command: the same model and data trained once per init scheme, then compared.

Each scheme is an ordinary audited MMSFTTrainer run in its own sub-folder of `output_dir`; at the end
`mm-trainer compare` draws loss and per-tower gradient norm of all runs into one PNG and prints the table.
Offline default (embedded small Qwen2.5-VL-architecture model, arithmetic word problems), 2 CPU cores, < 10 minutes:

    accelerate launch recipes/init_study.py
    accelerate launch recipes/init_study.py --config recipes/configs/init_study.yaml --schemes lora pissa loftq

Schemes: lora (Gaussian A, zero B), pissa, olora, eva, loftq (4-bit base, `quantization="loftq"`).
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass, field
from pathlib import Path

from peft import EvaConfig, LoraConfig
from trl import ScriptArguments, get_peft_config

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import embedded  # noqa: E402

from mm_trainer import MMSFTConfig, MMSFTTrainer  # noqa: E402
from mm_trainer.cli.compare import run as print_compare  # noqa: E402

SCHEMES = ("lora", "pissa", "olora", "eva", "loftq")


@dataclass
class StudyArguments(ScriptArguments):
    """Which init schemes to run, and the embedded data size."""

    schemes: list[str] = field(default_factory=lambda: list(SCHEMES), metadata={"help": f"Any of {SCHEMES}."})
    train_samples: int = field(default=2000, metadata={"help": "Rows of the embedded training set."})


def parser():
    """The study's parser, with its defaults (a `--config` YAML and the command line override them)."""
    return common.make_parser(
        StudyArguments,
        output_dir="outputs/init_study",
        max_steps=120,
        per_device_train_batch_size=16,
        learning_rate=2e-3,
        warmup_steps=5,
        logging_steps=4,
        max_length=256,
    )


def scheme_setup(scheme: str, peft_config: LoraConfig, args: MMSFTConfig) -> tuple[LoraConfig, MMSFTConfig]:
    """The LoRA config and training config of one scheme (copies; the base settings are shared)."""
    if scheme not in SCHEMES:
        raise ValueError(f"Unknown init scheme {scheme!r}; choose from {list(SCHEMES)}.")
    peft_config, args = copy.deepcopy(peft_config), copy.copy(args)
    args.output_dir = str(Path(args.output_dir) / scheme)
    peft_config.init_lora_weights = {"lora": True, "pissa": "pissa", "olora": "olora", "eva": "eva", "loftq": True}[
        scheme
    ]
    if scheme == "eva":
        peft_config.eva_config = EvaConfig(rho=2.0)
    args.quantization = "loftq" if scheme == "loftq" else args.quantization
    return peft_config, args


def main(argv: list[str] | None = None) -> list[str]:
    study_args, training_args, model_args = parser().parse_args_and_config(argv)
    base_peft = get_peft_config(model_args)
    if study_args.dataset_name is None:
        train_dataset = embedded.arithmetic_dataset(study_args.train_samples, seed=training_args.seed)
    else:
        from datasets import load_dataset

        train_dataset = load_dataset(study_args.dataset_name, study_args.dataset_config)[
            study_args.dataset_train_split
        ]
    run_dirs = []
    for scheme in study_args.schemes:
        peft_config, args = scheme_setup(scheme, base_peft, training_args)
        model, tokenizer = common.load_model(model_args, args)
        trainer = MMSFTTrainer(
            model=model, args=args, train_dataset=train_dataset, processing_class=tokenizer, peft_config=peft_config
        )
        trainer.train()
        trainer.save_model()
        run_dirs.append(args.output_dir)
        del trainer, model
    if training_args.process_index == 0:
        from argparse import Namespace

        print_compare(Namespace(runs=run_dirs, out=str(Path(training_args.output_dir) / "compare.png"), json=False))
    return run_dirs


if __name__ == "__main__":
    main()
