"""Train IMoD for a few steps in one process of a DDP run and save what each rank ends with.

Launched by ``tests/test_imod_ddp.py``::

    ACCELERATE_USE_CPU=true PYTHONPATH=<worktree> accelerate launch --multi_gpu --num_processes 2 \
        tests/scripts/imod_ddp.py OUT_DIR

Also runnable without ``accelerate`` (one process) with ``--batch-size 2`` for the single-process comparison.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict
from transformers import TrainerCallback

from mm_trainer import MMSFTConfig, MMSFTTrainer
from tests.kit import end_process_group, make_processor, mixed_dataset, tiny_model, training_args

FAMILY = "qwen2_5_vl"


class FirstStepGradients(TrainerCallback):
    """The adapters' gradients of the first optimizer step: accumulated, all-reduced, not clipped (max_grad_norm=0)."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] | None = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.grads is None:
            self.grads = {n: p.grad.detach().cpu().clone() for n, p in model.named_parameters() if p.grad is not None}


def run(out: Path, batch_size: int, steps: int = 3) -> MMSFTTrainer:
    """Train and write ``rank<i>.pt`` (adapter, first-step gradients) and ``rank<i>.json`` (logs, dominance) to ``out``.

    The Trainer is told to count the tokens of each step (``num_items_in_batch``), so TRL normalises the task loss by
    the token count of the whole step on every rank and multiplies it by the number of processes: with that, one
    process with the global batch and two with half of it each must compute the same gradients, and any mistake in
    how the injected term is scaled under DDP shows.
    """
    args = training_args(
        out / "run",
        MMSFTConfig,
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        gradient_checkpointing=False,
        max_length=None,
        imod=True,
        imod_lambda_ma=0.5,
        dominance_steps=1,
        dataloader_drop_last=True,
        max_grad_norm=0.0,
    )
    trainer = MMSFTTrainer(
        model=tiny_model(FAMILY),
        args=args,
        train_dataset=mixed_dataset(12, family=FAMILY),
        processing_class=make_processor(FAMILY),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    )
    trainer.model_accepts_loss_kwargs = True
    capture = FirstStepGradients()
    trainer.add_callback(capture)
    trainer.train()
    rank = trainer.args.process_index
    adapter = {k: v.detach().cpu() for k, v in get_peft_model_state_dict(trainer.model).items()}
    torch.save({"adapter": adapter, "grads": capture.grads}, out / f"rank{rank}.pt")
    logs = [h for h in trainer.state.log_history if "loss" in h]
    record = {
        "world_size": trainer.args.world_size,
        "logs": logs,
        "dominance": trainer.modality_balance.dominance.history,
        "micro_steps_with_non_text": trainer.modality_balance.injector.micro_steps_with_non_text,
    }
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    return trainer


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--batch-size", type=int, default=1)
    cli = parser.parse_args()
    cli.out.mkdir(parents=True, exist_ok=True)
    run(cli.out, cli.batch_size)
    end_process_group()
