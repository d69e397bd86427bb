"""Architecture zoo: text-only MMSFTTrainer on every image-text / audio-text architecture transformers ships.

For each model type in transformers' image-text-to-text and multimodal-LM mappings, a tiny model is built from the
default config class with every size shrunk (``tests/kit/shrink.py``; transformers' model testers are not installed
with the wheel). Then, for ``target_modules="all-linear"`` and ``["q_proj", "v_proj", "down_proj"]``:

- the modules plain TRL adapts: PEFT's own ``get_peft_model`` on a fresh copy;
- the modules a text batch really trains (the reference): a forward + backward of the training batch in training
  mode with hooks on those modules; a module counts when it fires, its input is non-zero and its output gets a
  non-zero gradient (exactly when ``lora_B`` would get one), independently of mm-trainer's tower map and probe;
- mm-trainer's kept set, after one training step.

A row passes when mm-trainer keeps exactly the reference set. The dead adapters plain TRL would leave are the
modules PEFT adapts minus the reference set.

    python tests/benchmarks/zoo.py [--only qwen2_5_vl,llava] [--markdown] [--budget-s 3000]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers.models.auto import modeling_auto  # noqa: E402
from transformers.models.auto.configuration_auto import CONFIG_MAPPING  # noqa: E402

SPECS = {"all-linear": "all-linear", "qvd": ["q_proj", "v_proj", "down_proj"]}


@dataclass
class ZooRow:
    model_type: str
    model_class: str
    status: str = "ok"  # ok | mismatch | skipped
    reason: str = ""
    seconds: float = 0.0
    results: dict[str, dict] = field(default_factory=dict)


def zoo_architectures() -> list[tuple[str, str]]:
    """``(model_type, class name)`` of every image-text-to-text and multimodal-LM architecture, sorted."""
    found: dict[str, str] = {}
    for mapping in ("MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES", "MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES"):
        for model_type, name in getattr(modeling_auto, mapping, {}).items():
            found.setdefault(model_type, name if isinstance(name, str) else name[0])
    return sorted(found.items())


def build_tiny(model_type: str, class_name: str, seed: int = 0) -> torch.nn.Module:
    """A tiny float32 model of ``model_type`` (raises with the reason when it cannot be built)."""
    from tests.kit.shrink import shrink_config

    config = shrink_config(CONFIG_MAPPING[model_type]())
    model_cls = getattr(transformers, class_name)
    torch.manual_seed(seed)
    model = model_cls._from_config(config, dtype=torch.float32)
    params = sum(p.numel() for p in model.parameters())
    if params > 60_000_000:
        raise RuntimeError(f"still {params / 1e6:.0f}M parameters after shrinking (too large for a CPU zoo)")
    return model


def peft_adapted(model_type: str, class_name: str, spec) -> list[str]:
    """Modules plain TRL would adapt: PEFT's own matching on a fresh copy."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(build_tiny(model_type, class_name), LoraConfig(r=2, target_modules=spec))
    names = []
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and isinstance(module.lora_A, torch.nn.ModuleDict) and module.lora_A:
            names.append(name.removeprefix("base_model.model."))
    return names


def reference_reached(model: torch.nn.Module, batch: dict, names: list[str]) -> set[str]:
    """Modules that fire on ``batch`` with a non-zero input and get a non-zero output gradient (training mode)."""
    modules = dict(model.named_modules())
    seen_input: dict[str, bool] = {}
    outputs: dict[str, list[torch.Tensor]] = {}
    handles = []

    def hook(name):
        def fn(module, args, output):
            x = args[0] if args else None
            if torch.is_tensor(x):
                seen_input[name] = seen_input.get(name, False) or bool(torch.any(x != 0))
            if torch.is_tensor(output) and output.requires_grad:
                output.retain_grad()
                outputs.setdefault(name, []).append(output)

        return fn

    for name in names:
        handles.append(modules[name].register_forward_hook(hook(name)))
    model.train()
    try:
        torch.manual_seed(0)
        try:
            out = model(**batch, use_cache=False)  # as the trainer runs it (hybrid caches refuse a training forward)
        except TypeError:
            out = model(**batch)
        loss = out.loss if getattr(out, "loss", None) is not None else out.logits.float().logsumexp(-1).mean()
        loss.backward()
    finally:
        for h in handles:
            h.remove()
    reached = set()
    for name, outs in outputs.items():
        if seen_input.get(name) and any(o.grad is not None and bool(torch.any(o.grad != 0)) for o in outs):
            reached.add(name)
    return reached


def run_architecture(model_type: str, class_name: str, workdir: Path) -> ZooRow:
    from peft import LoraConfig

    from mm_trainer import MMSFTConfig, MMSFTTrainer
    from tests.kit import make_tokenizer, text_dataset, training_args

    row = ZooRow(model_type, class_name)
    start = time.perf_counter()
    try:
        tokenizer = make_tokenizer("causal_lm")
        model = build_tiny(model_type, class_name)
        vocab = model.get_input_embeddings().num_embeddings if model.get_input_embeddings() is not None else 0
        if vocab < len(tokenizer):
            raise RuntimeError(f"text vocabulary {vocab} < the test tokenizer's {len(tokenizer)}")
    except Exception as err:  # noqa: BLE001 - every failure is a reported skip reason
        row.status, row.reason = "skipped", f"not buildable tiny: {type(err).__name__}: {str(err)[:160]}"
        row.seconds = time.perf_counter() - start
        return row
    for key, spec in SPECS.items():
        try:
            adapted = peft_adapted(model_type, class_name, spec)
        except Exception as err:  # noqa: BLE001
            row.results[key] = {"skipped": f"PEFT: {type(err).__name__}: {str(err)[:120]}"}
            continue
        try:
            args = training_args(
                workdir / f"{model_type}-{key}",
                MMSFTConfig,
                max_steps=1,
                per_device_train_batch_size=4,
                gradient_checkpointing=False,
            )
            trainer = MMSFTTrainer(
                model=build_tiny(model_type, class_name),
                args=args,
                train_dataset=text_dataset(4),
                processing_class=tokenizer,
                peft_config=LoraConfig(r=2, target_modules=spec),
            )
            batch = next(iter(trainer.get_train_dataloader()))
            batch = {k: v.cpu() if torch.is_tensor(v) else v for k, v in batch.items()}
            trainer.train()
            kept = set(trainer.target_plan.kept())
        except Exception as err:  # noqa: BLE001
            row.results[key] = {"skipped": f"training: {type(err).__name__}: {str(err)[:160]}"}
            continue
        try:
            reached = reference_reached(build_tiny(model_type, class_name), batch, adapted)
        except Exception as err:  # noqa: BLE001
            row.results[key] = {"skipped": f"reference: {type(err).__name__}: {str(err)[:160]}"}
            continue
        row.results[key] = {
            "peft_adapted": len(adapted),
            "reference_reached": len(reached),
            "kept": len(kept),
            "dead_plain_trl": len(set(adapted) - reached),
            "missing": sorted(reached - kept)[:5],
            "extra": sorted(kept - reached)[:5],
        }
    results = [r for r in row.results.values() if "skipped" not in r]
    if not results:
        row.status = "skipped"
        row.reason = "; ".join(f"{k}: {r['skipped']}" for k, r in row.results.items())
    elif any(r["missing"] or r["extra"] for r in results):
        row.status = "mismatch"
    row.seconds = time.perf_counter() - start
    return row


def markdown(rows: list[ZooRow]) -> str:
    lines = [
        "| architecture | all-linear: kept / reached / PEFT | dead (plain TRL) | q,v,down: kept / reached / PEFT "
        "| dead (plain TRL) | result |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row.status == "skipped":
            continue
        cells = []
        for key in SPECS:
            r = row.results.get(key, {})
            if "kept" in r:
                cells += [f"{r['kept']} / {r['reference_reached']} / {r['peft_adapted']}", str(r["dead_plain_trl"])]
            else:
                cells += ["skipped", "-"]
        lines.append(f"| {row.model_type} | {' | '.join(cells)} | {row.status} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="comma-separated model types")
    parser.add_argument("--budget-s", type=float, default=float("inf"), help="stop starting new architectures after")
    parser.add_argument("--json", default="", help="write the rows here")
    parser.add_argument("--markdown", action="store_true")
    cli = parser.parse_args()
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    only = {t for t in cli.only.split(",") if t}
    archs = [(t, c) for t, c in zoo_architectures() if not only or t in only]
    rows: list[ZooRow] = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for model_type, class_name in archs:
            if time.perf_counter() - start > cli.budget_s:
                rows.append(ZooRow(model_type, class_name, "skipped", "time budget of this run spent"))
                continue
            with contextlib.redirect_stdout(io.StringIO()):
                row = run_architecture(model_type, class_name, Path(tmp))
            rows.append(row)
            print(f"{row.model_type:28s} {row.status:9s} {row.seconds:6.1f}s {json.dumps(row.results)} {row.reason}")
            sys.stdout.flush()
    ok = [r for r in rows if r.status == "ok"]
    trained = [r for r in rows if r.status != "skipped"]
    dead = [r for r in trained if any(v.get("dead_plain_trl", 0) for v in r.results.values())]
    print(
        f"\n{len(rows)} architectures, {len(trained)} trained, {len(ok)} exact (kept == reference on both specs), "
        f"{len(dead)} where plain TRL leaves dead adapters; {time.perf_counter() - start:.0f}s"
    )
    if cli.json:
        Path(cli.json).write_text(json.dumps([asdict(r) for r in rows], indent=1))
    if cli.markdown:
        print(markdown(rows))


if __name__ == "__main__":
    main()
