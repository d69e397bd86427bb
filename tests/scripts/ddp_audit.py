"""Two-process DDP run for tests/test_audit_ddp.py: mixed text/image data, audit written at a checkpoint and at the end.

ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 tests/scripts/ddp_audit.py OUTPUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from peft import LoraConfig

from mm_trainer import MMSFTConfig, MMSFTTrainer
from tests.kit import end_process_group, make_processor, mixed_dataset, tiny_model, training_args


def main(output_dir: str) -> None:
    family = "qwen2_5_vl"
    args = training_args(
        output_dir,
        MMSFTConfig,
        max_steps=4,
        per_device_train_batch_size=1,
        save_strategy="steps",
        save_steps=2,
        max_length=None,
    )
    trainer = MMSFTTrainer(
        model=tiny_model(family),
        args=args,
        train_dataset=mixed_dataset(16, family=family),
        processing_class=make_processor(family),
        peft_config=LoraConfig(r=4, target_modules="all-linear"),
    )
    trainer.train()
    trainer.save_model()
    fired = sorted(trainer.telemetry.fired)
    rank = trainer.args.process_index
    (Path(output_dir) / f"fired_rank{rank}.json").write_text(json.dumps(fired))


if __name__ == "__main__":
    main(sys.argv[1])
    end_process_group()
