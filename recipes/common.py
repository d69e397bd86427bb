"""What the recipes share: defaults, the parser, loading the embedded or a real model, and the closing report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import embedded
import torch
from trl import ModelConfig, TrlParser

from mm_trainer import MMSFTConfig

COMMON_DEFAULTS: dict[str, Any] = {
    # MMSFTConfig
    "lr_scheduler_type": "cosine",
    "warmup_steps": 10,
    "logging_steps": 10,
    "save_strategy": "no",
    "report_to": "none",
    "bf16": torch.cuda.is_available(),
    "gradient_checkpointing": False,
    # ModelConfig: LoRA on every linear layer the data reaches
    "use_peft": True,
    "lora_r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.0,
    "lora_target_modules": ["all-linear"],
}
"""Defaults every recipe starts from; a recipe's own defaults, a `--config` YAML and the command line override them."""


def make_parser(script_arguments: type, **defaults: Any) -> TrlParser:
    """``TrlParser((script_arguments, MMSFTConfig, ModelConfig))`` with :data:`COMMON_DEFAULTS` and ``defaults``."""
    parser = TrlParser((script_arguments, MMSFTConfig, ModelConfig))
    parser.set_defaults(**{**COMMON_DEFAULTS, **defaults})
    return parser


def load_model(model_args: ModelConfig, training_args: MMSFTConfig, processor: bool = False) -> tuple[Any, Any]:
    """The model and its tokenizer (or processor): the embedded default, or ``--model_name_or_path``.

    The embedded model is an instance built from the shipped config with a seeded init; a real model is passed to the
    trainer as its id (loaded there with ``--dtype`` and ``--model_revision``), its tokenizer / processor loaded the
    usual way. Only the source differs.
    """
    if embedded.is_embedded(model_args.model_name_or_path):
        model = embedded.embedded_model(seed=training_args.seed)
        return model, embedded.embedded_processor() if processor else embedded.embedded_tokenizer()
    from transformers import AutoProcessor, AutoTokenizer

    name, revision = model_args.model_name_or_path, model_args.model_revision
    training_args.model_init_kwargs = {"dtype": model_args.dtype or "auto", "revision": revision}
    loader = AutoProcessor if processor else AutoTokenizer
    return name, loader.from_pretrained(name, revision=revision)


def losses(trainer: Any) -> list[float]:
    """The logged training losses of a finished run."""
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def report(trainer: Any, result: dict[str, Any]) -> dict[str, Any]:
    """Add where the adapter, ``AUDIT.md`` and plots are to ``result`` and print it all on the main process."""
    out = Path(trainer.args.output_dir)
    result.update(adapter=str(out), audit=str(out / "AUDIT.md"), plots=sorted(str(p) for p in out.glob("*.png")))
    if trainer.is_world_process_zero():
        print(json.dumps({k: v for k, v in result.items() if k != "answers_after"}, indent=1))
        line = f"\nloss {result['train_loss_first']:.3f} -> {result['train_loss_last']:.3f}"
        if "exact_match_after" in result:
            line += f"; exact match {result['exact_match_before']:.1%} -> {result['exact_match_after']:.1%}"
        print(line)
        print(f"adapter: {out}\naudit:   {out / 'AUDIT.md'}\nplots:   {', '.join(result['plots']) or '(none)'}")
    return result


def end(trainer: Any) -> None:
    """End the run as torch asks of every launched process: destroy the process group (accelerate's
    ``end_training``), after everything that communicates (training, saving, the evaluation's generation).

    A gloo rank that exits with its group alive leaves the group's worker threads to the interpreter's teardown, which
    can abort the process ("terminate called without an active exception") after a run that succeeded. One process:
    nothing to destroy.
    """
    trainer.accelerator.end_training()
