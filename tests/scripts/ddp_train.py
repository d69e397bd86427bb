"""Two-process DDP run of MMSFTTrainer on the tiny Qwen2.5-VL with text-only data (launched by tests/test_ddp.py).

Each rank writes its final adapter weights to ``OUT/rank<r>.safetensors`` and its resolved settings to
``OUT/rank<r>.json``, so the test can check that both ranks hold identical adapters.

    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 tests/scripts/ddp_train.py OUT [FAMILY]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from peft import LoraConfig, get_peft_model_state_dict
from safetensors.torch import save_file

from mm_trainer import MMSFTConfig, MMSFTTrainer
from tests.kit import (
    end_process_group,
    make_processor,
    make_tokenizer,
    mixed_dataset,
    text_dataset,
    tiny_model,
    training_args,
)


def main(out: Path, data: str = "text") -> None:
    family = "qwen2_5_vl"
    if data == "text":
        dataset, processing = text_dataset(16), make_tokenizer(family)
    else:
        dataset, processing = mixed_dataset(16, family=family), make_processor(family)
    args = training_args(out / "run", MMSFTConfig, max_steps=4, seed=3, max_length=None)
    trainer = MMSFTTrainer(
        model=tiny_model(family),
        args=args,
        train_dataset=dataset,
        processing_class=processing,
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]),
    )
    trainer.train()
    rank = trainer.args.process_index
    state = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(trainer.model).items()}
    save_file(state, str(out / f"rank{rank}.safetensors"))
    info = {
        "world_size": trainer.args.world_size,
        "ddp_find_unused_parameters": trainer.args.ddp_find_unused_parameters,
        "kept": trainer.target_plan.kept(),
        "fired": sorted(trainer.telemetry.fired),
        "steps": trainer.state.global_step,
    }
    (out / f"rank{rank}.json").write_text(json.dumps(info))


if __name__ == "__main__":
    main(Path(sys.argv[1]), *(sys.argv[2:3] or []))
    end_process_group()
