"""What the audit costs on a 7B-size adapter, next to what a save costs anyway.

Adapter shaped like Qwen2-7B's language model with LoRA r=16 on all linear layers (28 layers x 7 modules, 40.4M
fp32 parameters, 161 MB). Measured side by side in one run:

- init record: fingerprints of every A and B, taken once at trainer construction;
- per-save audit core: fingerprints again + comparison + statuses + parameter table;
- saving the same adapter with safetensors (what every save already does);
- the init record's size on disk vs. keeping a copy of the adapter.

Run: ``python tests/benchmarks/bench_audit.py`` (from the repository root).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from mm_trainer.audit.record import InitRecord
from mm_trainer.audit.status import module_audits
from mm_trainer.model.adapters import LoraAdapter

HIDDEN, KV, INTERMEDIATE, LAYERS, RANK = 3584, 512, 18944, 28, 16
SHAPES = {
    "self_attn.q_proj": (HIDDEN, HIDDEN),
    "self_attn.k_proj": (HIDDEN, KV),
    "self_attn.v_proj": (HIDDEN, KV),
    "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (HIDDEN, INTERMEDIATE),
    "mlp.up_proj": (HIDDEN, INTERMEDIATE),
    "mlp.down_proj": (INTERMEDIATE, HIDDEN),
}


def adapters() -> list[LoraAdapter]:
    out = []
    for layer in range(LAYERS):
        for leaf, (fan_in, fan_out) in SHAPES.items():
            a = nn.Parameter(torch.randn(RANK, fan_in) / fan_in**0.5)
            b = nn.Parameter(torch.zeros(fan_out, RANK))
            out.append(LoraAdapter(f"model.layers.{layer}.{leaf}", "language", nn.Identity(), a, b))
    return out


def best_of(fn, repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    torch.manual_seed(0)
    ads = adapters()
    n_params = sum(a.params for a in ads)
    n_bytes = n_params * 4
    record = InitRecord(ads)
    with torch.no_grad():  # one optimizer-like step on half the adapters
        for a in ads[::2]:
            a.lora_B.add_(1e-4)
    fired = {a.name for a in ads}
    nonzero = {a.name: (1 if i % 2 == 0 else 0) for i, a in enumerate(ads)}

    t_record = best_of(lambda: InitRecord(ads))
    t_audit = best_of(lambda: module_audits(ads, record.compare(ads), fired, nonzero))
    with tempfile.TemporaryDirectory() as tmp:
        tensors = {f"base_model.model.{a.name}.lora_A.weight": a.lora_A.detach() for a in ads}
        tensors |= {f"base_model.model.{a.name}.lora_B.weight": a.lora_B.detach() for a in ads}
        path = Path(tmp) / "adapter_model.safetensors"
        t_save = best_of(lambda: save_file(tensors, str(path)))
    record_bytes = len(json.dumps(record.state_dict()).encode())
    statuses = module_audits(ads, record.compare(ads), fired, nonzero)
    assert sum(m.status == "trained" for m in statuses) == len(ads) // 2

    print(f"adapter: {len(ads)} modules, {n_params / 1e6:.1f}M params, {n_bytes / 2**20:.0f} MiB fp32")
    print(f"init record (once)        : {t_record:6.3f} s")
    print(f"per-save audit core       : {t_audit:6.3f} s")
    print(f"safetensors save (anyway) : {t_save:6.3f} s")
    print(f"audit / save              : {t_audit / t_save:6.2f}x")
    print(f"audit throughput          : {n_bytes / t_audit / 2**30:6.2f} GiB/s")
    print(
        f"init record size          : {record_bytes / 2**10:.0f} KiB vs {n_bytes / 2**20:.0f} MiB for a copy "
        f"({n_bytes / record_bytes:.0f}x smaller)"
    )


if __name__ == "__main__":
    main()
