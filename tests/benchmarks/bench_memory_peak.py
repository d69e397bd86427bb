"""Peak memory of text-only LoRA on a VLM given by path: is the unreached vision tower ever loaded?

    HF_HUB_OFFLINE=1 python tests/benchmarks/bench_memory_peak.py [--steps 2] [--dir ~/.cache/mm-trainer-bench]

A Qwen2.5-VL-3B-architecture checkpoint (3.75B params: 3.09B language model with tied embeddings, 0.67B vision tower)
with random bf16 weights is written to disk once, in the Hub's key layout (``model.layers.*``, ``visual.*``), tensor by
tensor from the model built on the meta device (never more than one shard in memory), and reused while present. A
``Qwen2ForCausalLM`` directory next to it holds the same text config and links to the same shards (its loader reads the
``model.*`` / ``lm_head`` keys and leaves ``visual.*`` unread).

Then, one process after another (never in parallel), each builds its trainer from the path on text-only data (bf16,
LoRA r=16 all-linear, batch 1 x 32 tokens), runs ``--steps`` steps, and reports its peak RSS (VmHWM) and the
trainer's construction time (the load; the page cache is warmed before each arm):

* (a) ``SFTTrainer`` on the VLM path;
* (b) ``MMSFTTrainer`` on the VLM path (the tower is never materialized);
* (c) ``SFTTrainer`` on the language-only model.

Goals: (b) peak RSS <= 1.05 x (c), and (b) load time <= (a). Check ``free -g`` first: (a) needs ~9 GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

DEFAULT_DIR = Path(os.environ.get("MM_TRAINER_BENCH_CACHE", Path.home() / ".cache" / "mm-trainer-bench"))
SHARD_BYTES = 2 * 2**30
HUB_LAYOUT = (("model.language_model.", "model."), ("model.visual.", "visual."))
"""Model key prefix -> key prefix in the Hub's Qwen2.5-VL checkpoints (what ``save_pretrained`` writes)."""


def qwen2_5_vl_3b_config():
    """Qwen2.5-VL-3B-Instruct's architecture, with the test kit's special-token ids (its tokenizer drives the data)."""
    from tests.kit import tiny_config

    config = tiny_config("qwen2_5_vl")
    text = config.text_config
    text.vocab_size = 151936
    text.hidden_size = 2048
    text.intermediate_size = 11008
    text.num_hidden_layers = 36
    text.num_attention_heads = 16
    text.num_key_value_heads = 2
    text.head_dim = 128
    text.layer_types = ["full_attention"] * 36
    text.max_position_embeddings = 128000
    text.rope_parameters = {**text.rope_parameters, "mrope_section": [16, 24, 24], "rope_theta": 1000000.0}
    text.tie_word_embeddings = True
    config.tie_word_embeddings = True
    vision = config.vision_config
    vision.depth = 32
    vision.hidden_size = 1280
    vision.intermediate_size = 3420
    vision.num_heads = 16
    vision.patch_size = 14
    vision.window_size = 112
    vision.fullatt_block_indexes = [7, 15, 23, 31]
    vision.out_hidden_size = 2048
    config.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    return config


def hub_key(name: str) -> str:
    for prefix, saved in HUB_LAYOUT:
        if name.startswith(prefix):
            return saved + name[len(prefix) :]
    return name


def write_checkpoint(config, path: Path, seed: int = 0) -> None:
    """Write ``config``'s model with random bf16 weights to ``path`` one shard at a time (Hub key layout)."""
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen2_5_VLForConditionalGeneration

    with torch.device("meta"):
        meta = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    tied = set(meta.all_tied_weights_keys) if config.tie_word_embeddings else set()
    persistent = {k: v for k, v in meta.state_dict().items() if k not in tied}
    gen = torch.Generator().manual_seed(seed)
    path.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    weight_map: dict[str, str] = {}
    names: list[str] = []

    def flush() -> None:
        index = len(names) + 1
        name = f"model-{index:05d}.safetensors"
        save_file(shards[-1], str(path / name), metadata={"format": "pt"})
        names.append(name)
        weight_map.update(dict.fromkeys(shards[-1], name))
        shards[-1] = {}

    for key, t in persistent.items():
        if key.endswith("norm.weight") or key.endswith("ln_q.weight") or "norm" in key.split(".")[-2]:
            value = torch.ones(t.shape, dtype=t.dtype)
        elif key.endswith(".bias"):
            value = torch.zeros(t.shape, dtype=t.dtype)
        else:
            value = (torch.randn(t.shape, generator=gen) * 0.02).to(t.dtype)
        nbytes = value.numel() * value.element_size()
        if size and size + nbytes > SHARD_BYTES:
            flush()
            size = 0
        shards[-1][hub_key(key)] = value
        size += nbytes
    if shards[-1]:
        flush()
    total = len(names)
    renamed = {}
    for i, old in enumerate(names, 1):
        new = f"model-{i:05d}-of-{total:05d}.safetensors"
        (path / old).rename(path / new)
        renamed[old] = new
    index = {"metadata": {"total_size": 0}, "weight_map": {k: renamed[v] for k, v in weight_map.items()}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    config.save_pretrained(path)


def build(root: Path) -> tuple[Path, Path]:
    """The VLM and language-only checkpoint directories under ``root`` (written when missing)."""
    from transformers import Qwen2Config

    from tests.kit import make_processor, make_tokenizer

    vlm, lm = root / "qwen2_5_vl_3b_random_bf16", root / "qwen2_3b_text_of_vlm"
    if not (vlm / "done").is_file():
        print(f"writing {vlm} (~7.5 GB, once)", flush=True)
        config = qwen2_5_vl_3b_config()
        write_checkpoint(config, vlm)
        make_processor("qwen2_5_vl").save_pretrained(vlm)
        (vlm / "done").write_text("ok")
    if not (lm / "done").is_file():
        from transformers import AutoConfig

        text = AutoConfig.from_pretrained(vlm).text_config.to_dict()
        text.pop("model_type", None)
        text.pop("rope_parameters", None)
        config = Qwen2Config(**{k: v for k, v in text.items() if k not in ("architectures", "dtype")})
        config.rope_parameters = {"rope_type": "default", "rope_theta": 1000000.0}
        config.architectures = ["Qwen2ForCausalLM"]
        config.tie_word_embeddings = True
        lm.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(lm)
        for f in vlm.glob("*.safetensors*"):
            target = lm / f.name
            if not target.exists():
                target.symlink_to(f)
        make_tokenizer("qwen2_5_vl").save_pretrained(lm)
        (lm / "done").write_text("ok")
    return vlm, lm


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def arm(name: str, vlm: Path, lm: Path, steps: int, probe: bool = True) -> dict:
    """Run one arm in this process: build the trainer from the path, train ``steps`` steps, report memory."""
    import tempfile

    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from mm_trainer import MMSFTConfig, MMSFTTrainer
    from tests.kit import text_dataset

    trainer_cls, config_cls, path = {
        "a": (SFTTrainer, SFTConfig, vlm),
        "b": (MMSFTTrainer, MMSFTConfig, vlm),
        "c": (SFTTrainer, SFTConfig, lm),
    }[name]
    extra = {"audit": False, "target_probe": probe} if config_cls is MMSFTConfig else {}
    with tempfile.TemporaryDirectory() as tmp:
        args = config_cls(
            output_dir=tmp,
            max_steps=steps,
            per_device_train_batch_size=1,
            report_to="none",
            save_strategy="no",
            use_cpu=True,
            bf16=True,
            disable_tqdm=True,
            max_length=32,
            model_init_kwargs={"dtype": "bfloat16"},
            **extra,
        )
        start = time.perf_counter()
        trainer = trainer_cls(
            model=str(path),
            args=args,
            train_dataset=text_dataset(8),
            peft_config=LoraConfig(r=16, target_modules="all-linear"),
        )
        load_s = time.perf_counter() - start
        rss_init = _status("VmRSS")
        rss_anon, rss_file = _status("RssAnon"), _status("RssFile")
        start = time.perf_counter()
        if steps:
            trainer.train()
        train_s = time.perf_counter() - start
        params = sum(p.numel() for p in trainer.model.parameters())
        param_bytes = sum(p.numel() * p.element_size() for p in trainer.model.parameters())
    return {
        "arm": name,
        "load_s": load_s,
        "train_s": train_s,
        "params_held": params,
        "param_bytes": param_bytes,
        "rss_after_init": rss_init,
        "rss_anon_after_init": rss_anon,
        "rss_file_after_init": rss_file,
        "peak_rss": _status("VmHWM"),
        "released": [r.to_dict() for r in getattr(trainer, "released_towers", [])],
    }


def _warm_page_cache(folder: Path) -> None:
    """Read the shards once so that every arm loads from the page cache (the first arm would otherwise pay the disk)."""
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as fh:
            while fh.read(64 * 2**20):
                pass


def _free_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="Where the checkpoints are cached.")
    parser.add_argument("--steps", type=int, default=1, help="Training steps per arm (0: build the trainer only).")
    parser.add_argument("--arm", choices=["a", "b", "c"], help=argparse.SUPPRESS)
    parser.add_argument(
        "--no-probe",
        action="store_true",
        help="Arm (b) without the reachability probe: on CPU its bf16 forward+backward of a 3B model takes minutes "
        "(torch's reference bf16 gemm), which is not part of the load.",
    )
    parser.add_argument("--build-only", action="store_true", help="Write the checkpoints and exit.")
    parser.add_argument("--arms", default="b,c,a", help="Comma-separated arms to run, in order (default: b,c,a).")
    opts = parser.parse_args()
    vlm, lm = build(opts.dir)
    if opts.arm:
        print(json.dumps(arm(opts.arm, vlm, lm, opts.steps, probe=not opts.no_probe)))
        return
    if opts.build_only:
        return
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    results = {}
    for name in opts.arms.split(","):
        _warm_page_cache(vlm)
        print(f"arm {name}: MemAvailable {_free_gib():.1f} GiB", flush=True)
        cmd = [sys.executable, __file__, "--arm", name, "--dir", str(opts.dir), "--steps", str(opts.steps)]
        cmd += ["--no-probe"] if opts.no_probe else []
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if out.returncode != 0:
            print(out.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"arm {name} failed ({out.returncode})")
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
        r = results[name]
        print(
            f"  load {r['load_s']:.1f} s, {opts.steps} steps {r['train_s']:.1f} s, peak RSS "
            f"{r['peak_rss'] / 2**30:.2f} GiB (after init: anon {r['rss_anon_after_init'] / 2**30:.2f} + file-backed "
            f"{r['rss_file_after_init'] / 2**30:.2f} GiB), parameters held {r['param_bytes'] / 2**30:.2f} GiB",
            flush=True,
        )
    labels = {
        "a": "SFTTrainer, VLM path",
        "b": "MMSFTTrainer, VLM path",
        "c": "SFTTrainer, language-only model",
    }
    print(f"\nmachine: {os.cpu_count()}-core CPU, bf16, LoRA r=16 all-linear, text-only data, {opts.steps} steps")
    for name, r in results.items():
        print(
            f"({name}) {labels[name]:<32} peak RSS {r['peak_rss'] / 2**30:6.2f} GiB   parameters held "
            f"{r['param_bytes'] / 2**30:6.2f} GiB   load {r['load_s']:6.1f} s"
        )
    if {"b", "c"} <= results.keys():
        b, c = results["b"], results["c"]
        print(f"peak RSS (b)/(c): {b['peak_rss'] / c['peak_rss']:.3f} (goal <= 1.05)")
        print(f"parameters held (b)/(c): {b['param_bytes'] / c['param_bytes']:.3f}")
    if {"a", "b"} <= results.keys():
        print(f"peak RSS (b)/(a): {results['b']['peak_rss'] / results['a']['peak_rss']:.3f}")
        print(f"load time (b)/(a): {results['b']['load_s'] / results['a']['load_s']:.3f} (goal <= 1)")


if __name__ == "__main__":
    main()
