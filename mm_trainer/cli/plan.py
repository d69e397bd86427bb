"""`mm-trainer plan MODEL_OR_DIR`: the LoRA target plan from `config.json` alone (meta device, no weights)."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from .errors import describe, unusable

_REGEX_CHARS = re.compile(r"[\\^$.*+?()\[\]{}|]")
MAX_CONFIG_BYTES = 64 * 2**20


def add_parser(sub: Any) -> None:
    """Register the `plan` sub-command."""
    p = sub.add_parser(
        "plan",
        help="Show, per tower, where LoRA adapters would go for a model and data modality (reads config.json only).",
        description="Build the model from its config on the meta device (no weight is read) and print, per tower, "
        "its linear modules, base params, LoRA params at rank r, what is targeted or excluded and why, and the "
        "share of the LoRA budget an unfiltered config would waste.",
    )
    p.add_argument("model", metavar="MODEL_OR_DIR", help="A model directory, a config.json file, or a Hub id.")
    p.add_argument(
        "--modality",
        default="text",
        help="Modalities of the training data, comma-separated: text, image, video, audio (default: text).",
    )
    p.add_argument(
        "--target-modules",
        default="all-linear",
        help='LoRA target_modules: "all-linear" (default), a comma-separated suffix list (q_proj,v_proj), or a '
        "full-path regex.",
    )
    p.add_argument("--target-towers", default="auto", help='"auto" (follow the data) or comma-separated towers.')
    p.add_argument("--rank", type=int, default=16, help="LoRA rank r for the budget columns (default: 16).")
    p.add_argument("--trust-remote-code", action="store_true", help="Allow configs that ship custom code.")
    p.add_argument("--json", action="store_true", help="Print the plan as JSON instead of a table.")
    p.set_defaults(func=run)


def parse_target_modules(text: str) -> str | list[str]:
    """`"all-linear"` and regexes stay strings; `"q_proj,v_proj"` becomes a list."""
    text = text.strip()
    if text.lower() == "all-linear" or _REGEX_CHARS.search(text):
        return text
    return [t.strip() for t in text.split(",") if t.strip()]


def load_config(model: str, trust_remote_code: bool = False) -> Any:
    """The model config from a directory, a `config.json` path, or a Hub id (cached or online)."""
    from transformers import AutoConfig

    from ..utils.inputs import check_model_path

    check_model_path(model)
    path = Path(model)
    if path.is_file():
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ValueError(f"{path} is {path.stat().st_size:,} bytes, too large for a config.json.")
        path = path.parent
    elif (path / "config.json").is_file() and (path / "config.json").stat().st_size > MAX_CONFIG_BYTES:
        raise ValueError(f"{path / 'config.json'} is too large for a config.json.")
    return AutoConfig.from_pretrained(str(path) if path.exists() else model, trust_remote_code=trust_remote_code)


def build_plan(args: argparse.Namespace) -> Any:
    """The [`~mm_trainer.model.targets.TargetPlan`] for the command-line arguments."""
    from peft import LoraConfig

    from ..model.modality import ModalityProfile
    from ..model.model_class import meta_model
    from ..model.plan_report import param_memory
    from ..model.targets import resolve_targets

    config = load_config(args.model, args.trust_remote_code)
    model = meta_model(config, args.trust_remote_code)
    profile = ModalityProfile.declare(m.strip() for m in args.modality.split(",") if m.strip())
    lora = LoraConfig(r=args.rank, target_modules=parse_target_modules(args.target_modules))
    plan = resolve_targets(model, lora, profile, target_towers=args.target_towers, dead_targets="drop")
    args.param_memory = param_memory(model, plan)  # peak parameter memory with and without the released towers
    return plan, type(model).__name__


def run(args: argparse.Namespace) -> int:
    """Run `mm-trainer plan`."""
    if args.rank < 1:
        return unusable("plan", f"--rank must be >= 1, got {args.rank}")
    try:
        plan, class_name = build_plan(args)
    except (OSError, ValueError) as err:
        return unusable("plan", str(err))
    except Exception as err:  # noqa: BLE001 - e.g. num_attention_heads=0: the config cannot build a model
        return unusable("plan", f"{args.model}: its config cannot build a model ({describe(err)})")
    if args.json:
        out = {"model": args.model, "model_class": class_name, **plan.to_dict()}
        out["param_memory"] = args.param_memory.to_dict()
        json.dump(out, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    from ..model.plan_report import console, print_param_memory, print_plan

    out = console()
    print_plan(plan, out, title=f"{args.model} ({class_name}) - LoRA r={args.rank}, data: {args.modality}")
    print_param_memory(args.param_memory, out)
    return 0
