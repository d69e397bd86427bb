"""Memory freed by releasing a tower the data never reaches: the vision tower of a Qwen2.5-VL-7B-size VLM.

    HF_HUB_OFFLINE=1 python tests/benchmarks/bench_release.py

The model has Qwen2.5-VL-7B's vision tower (32 blocks, hidden 1280, ~0.67B params) in bf16 and a small language model
(2 layers, hidden 1024) so it fits any CPU box. Each variant runs in a fresh subprocess: build the model, build
``MMSFTTrainer`` on text-only data (``free_unreached_towers`` on / off), run 2 steps, and report parameter bytes held
and the process's resident memory (VmRSS) and peak (VmHWM).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def variant(release: bool) -> dict:
    import tempfile

    import torch
    from peft import LoraConfig

    from mm_trainer import MMSFTConfig, MMSFTTrainer
    from tests.benchmarks.common import qwen2_5_vl_model
    from tests.kit import make_tokenizer, text_dataset

    vision = dict(
        depth=32,
        hidden_size=1280,
        intermediate_size=3420,
        num_heads=16,
        window_size=112,
        fullatt_block_indexes=[7, 15, 23, 31],
    )  # Qwen2.5-VL-7B's vision tower
    model = qwen2_5_vl_model(
        hidden=1024, layers=2, intermediate=2816, heads=8, kv_heads=4, vision=vision, dtype=torch.bfloat16
    )
    params_before = sum(p.numel() * p.element_size() for p in model.parameters())
    vision_params = sum(p.numel() for p in model.model.visual.parameters())
    rss_model = _status("VmRSS")
    with tempfile.TemporaryDirectory() as tmp:
        trainer = MMSFTTrainer(
            model=model,
            args=MMSFTConfig(
                output_dir=tmp,
                max_steps=2,
                per_device_train_batch_size=2,
                report_to="none",
                save_strategy="no",
                use_cpu=True,
                bf16=True,
                disable_tqdm=True,
                audit=False,
                free_unreached_towers=release,
            ),
            train_dataset=text_dataset(8),
            processing_class=make_tokenizer("qwen2_5_vl"),
            peft_config=LoraConfig(r=16, target_modules="all-linear"),
        )
        del model
        import gc

        gc.collect()
        rss_init = _status("VmRSS")
        trainer.train()
        params_after = sum(p.numel() * p.element_size() for p in trainer.model.parameters())
    return {
        "release": release,
        "vision_params": vision_params,
        "param_bytes_model": params_before,
        "param_bytes_trainer": params_after,
        "rss_after_model": rss_model,
        "rss_after_init": rss_init,
        "rss_after_train": _status("VmRSS"),
        "peak_rss": _status("VmHWM"),
        "released": [r.to_dict() for r in trainer.released_towers],
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("on", "off"):
        print(json.dumps(variant(sys.argv[1] == "on")))
        return
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    results = {}
    for arm in ("off", "on"):
        out = subprocess.run([sys.executable, __file__, arm], capture_output=True, text=True, env=env, check=True)
        results[arm] = json.loads(out.stdout.strip().splitlines()[-1])
    gb = 2**30
    off, on = results["off"], results["on"]
    print(f"machine: {os.cpu_count()}-core CPU; vision tower {off['vision_params'] / 1e9:.3f}B params (bf16)")
    for name, r in results.items():
        print(
            f"release {name:>3}: param bytes held {r['param_bytes_trainer'] / gb:.3f} GiB, RSS after init "
            f"{r['rss_after_init'] / gb:.3f} GiB, after 2 steps {r['rss_after_train'] / gb:.3f} GiB"
        )
    print(
        f"freed parameter memory: {(off['param_bytes_trainer'] - on['param_bytes_trainer']) / gb:.3f} GiB "
        f"(ratio held on/off {on['param_bytes_trainer'] / off['param_bytes_trainer']:.3f}); RSS after 2 steps "
        f"lower by {(off['rss_after_train'] - on['rss_after_train']) / gb:.3f} GiB"
    )


if __name__ == "__main__":
    main()
