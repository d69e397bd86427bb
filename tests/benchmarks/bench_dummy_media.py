"""Cost of the dummy media (FSDP / ZeRO-3 with mixed data): a text-only micro-batch's forward + backward with and
without the vision tower run on the dummy image, on one process (the compute; under a sharding engine the tower's
weight gathers happen on image micro-batches anyway, and the dummy makes every rank's micro-batch take that path).

    HF_HUB_OFFLINE=1 PYTHONPATH=. python tests/benchmarks/bench_dummy_media.py

Model: a Qwen2.5-VL with a 4-layer, 1024-wide language model and an 8-block slice of Qwen2.5-VL-7B's vision tower
(hidden 1280), fp32 on CPU; LoRA r=16 on q/v/down_proj of both towers; micro-batch of 2 text rows.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(repeats: int = 7) -> None:
    import tempfile

    import torch
    from peft import LoraConfig

    from mm_trainer import MMSFTConfig, MMSFTTrainer
    from mm_trainer.core.dummy_media import DummyMedia
    from tests.benchmarks.common import qwen2_5_vl_model
    from tests.kit import make_processor, mixed_dataset

    vision = dict(depth=8, hidden_size=1280, intermediate_size=3420, num_heads=16, fullatt_block_indexes=[7])
    model = qwen2_5_vl_model(hidden=1024, layers=4, heads=16, kv_heads=2, vision=vision)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = MMSFTTrainer(
            model=model,
            args=MMSFTConfig(
                output_dir=tmp,
                per_device_train_batch_size=2,
                report_to="none",
                use_cpu=True,
                bf16=False,
                disable_tqdm=True,
                audit=False,
                tower_telemetry=False,
                max_length=None,
            ),
            train_dataset=mixed_dataset(16, family="qwen2_5_vl", image_every=4),
            processing_class=make_processor("qwen2_5_vl"),
            peft_config=LoraConfig(r=16, target_modules=["q_proj", "v_proj", "down_proj"]),
        )
        base = trainer.model.get_base_model()
        dummy = DummyMedia(base, {"vision": ["model.visual"]}, "model.language_model", trainer.processing_class)
        batch = next(b for b in trainer.get_train_dataloader() if b.get("pixel_values") is None)
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(repeats):
            for armed in (False, True):
                trainer.model.zero_grad(set_to_none=True)
                if armed:
                    dummy.begin_micro_step(batch)
                start = time.perf_counter()
                trainer.model(**batch).loss.backward()
                times[armed].append(time.perf_counter() - start)
        plain, with_dummy = (statistics.median(times[k][1:]) for k in (False, True))
        tokens = int(batch["attention_mask"].sum())
        patches = dummy._extractors["vision"][1]["pixel_values"].shape[0]
        print(f"machine: {os.cpu_count()}-core CPU, torch {torch.__version__}; text micro-batch of {tokens} tokens")
        print(f"vision tower {sum(p.numel() for p in base.model.visual.parameters()) / 1e6:.1f}M params; "
              f"dummy image: {patches} patches")  # fmt: skip
        print(f"forward+backward without dummy: {plain * 1e3:.1f} ms; with dummy: {with_dummy * 1e3:.1f} ms; "
              f"ratio {with_dummy / plain:.3f} (+{(with_dummy - plain) * 1e3:.1f} ms per text-only micro-batch)")  # fmt: skip


if __name__ == "__main__":
    main()
