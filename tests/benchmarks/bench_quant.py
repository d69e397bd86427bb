"""4-bit benchmark: memory of the language linears, LoftQ init time per billion parameters, LoftQ vs QLoRA error.

One Qwen2.5-VL-architecture model built from config (random weights, bf16; no hub access needed), by default with
Qwen2.5-1.5B's language dimensions (hidden 1536, intermediate 8960, 12 / 2 heads) and 4 decoder layers, and a small
vision tower. All numbers come from one run, side by side:

* resident bytes of the language linears as nf4 ``Linear4bit`` (double quant, quantization state included) vs bf16
  (goal <= 0.30x);
* LoftQ init time (quantize + rank-r SVD, ``loftq_iter`` times) over the language linears, per billion parameters,
  next to plain nf4 quantization time;
* LoftQ's error reduction at rank r: sum ||W - Q - s*B@A||_F / sum ||W - Q||_F (QLoRA's error).

Run: ``python tests/benchmarks/bench_quant.py [--layers 4 --hidden 1536 --intermediate 8960 --rank 16]``
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from torch import nn
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from mm_trainer.model.towers import map_towers
from mm_trainer.quant import Nf4Spec, loftq_decompose, lora_scaling, resident_bytes
from mm_trainer.quant.layers import quantize_linear


def build(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int) -> nn.Module:
    head_dim = hidden // heads
    half = head_dim // 2
    mrope = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": 8192,
            "hidden_size": hidden,
            "intermediate_size": intermediate,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope},
        },
        vision_config={
            "depth": 2,
            "hidden_size": 256,
            "intermediate_size": 512,
            "num_heads": 4,
            "out_hidden_size": hidden,
            "fullatt_block_indexes": [1],
        },
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--intermediate", type=int, default=8960)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument("--loftq-iter", type=int, default=1)
    args = parser.parse_args()

    model = build(args.hidden, args.intermediate, args.layers, args.heads, args.kv_heads)
    tower_map = map_towers(model)
    names = tower_map.linear_names("language")
    modules = dict(model.named_modules())
    params = sum(tower_map.linears[n].params for n in names)
    spec = Nf4Spec(compute_dtype=torch.bfloat16)
    scaling = lora_scaling(args.alpha, args.rank)

    bf16_bytes = sum(resident_bytes(modules[n]) for n in names)
    start = time.perf_counter()
    quantized = {n: quantize_linear(modules[n], spec) for n in names}
    nf4_seconds = time.perf_counter() - start
    nf4_bytes = sum(resident_bytes(q) for q in quantized.values())

    qlora_error = loftq_error = 0.0
    start = time.perf_counter()
    for n in names:
        result = loftq_decompose(
            modules[n].weight, args.rank, scaling, spec, iters=args.loftq_iter, adapter_dtype=torch.bfloat16
        )
        qlora_error += result.qlora_error
        loftq_error += result.loftq_error
    loftq_seconds = time.perf_counter() - start

    billions = params / 1e9
    print(
        f"machine: {platform.machine()} {torch.get_num_threads()}-thread CPU, torch {torch.__version__}; model: "
        f"Qwen2.5-VL architecture, hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, "
        f"{len(names)} language linears, {params / 1e6:.1f}M params (random init, bf16)"
    )
    print(f"{'language linears, resident MiB':<48} bf16 {bf16_bytes / 2**20:9.1f}   nf4 {nf4_bytes / 2**20:9.1f}")
    print(f"{'  ratio nf4 / bf16 (goal <= 0.30)':<48} {nf4_bytes / bf16_bytes:.3f}")
    print(
        f"{'init time, s per 1B params':<48} nf4 {nf4_seconds / billions:9.1f}   "
        f"LoftQ r={args.rank} iter={args.loftq_iter} {loftq_seconds / billions:9.1f}"
    )
    print(f"{'  ratio LoftQ / nf4 time':<48} {loftq_seconds / max(nf4_seconds, 1e-9):.1f}")
    print(
        f"{f'sum ||W-Q||_F (QLoRA) vs ||W-Q-sBA||_F (LoftQ), r={args.rank}':<48} {qlora_error:.4f} vs {loftq_error:.4f}"
    )
    print(f"{'  ratio LoftQ / QLoRA error':<48} {loftq_error / qlora_error:.4f}")


if __name__ == "__main__":
    main()
