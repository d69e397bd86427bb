"""The parameter figures a user reads, each defined once: the plan, the audit, the model card and the CLI share them.

- **base params** (per tower): every parameter of the base model, the model before PEFT adds adapters, whether the
  run trains it or not; a 4-bit weight at its unpacked size, a parameter tied to another once, a tower that was
  released (or never loaded) at the size it had, a DeepSpeed ZeRO-3 partition at its whole size. Counted once, when
  the tower map is built ([`~mm_trainer.model.towers.map_towers`], before any release), so the start-up plan and
  every audit show the same number.
- **of which 4-bit** (`base_params_4bit`): the base params held by bitsandbytes 4-bit weights when the audit is
  written (in-place QLoRA / LoftQ quantizes after the plan).
- **nominal trainable**: every parameter the optimizer updates (what PEFT's `print_trainable_parameters` shows):
  the adapters' A and B, and other trainable parameters (`modules_to_save` copies, trainable tokens, biases).
- **effective trainable**: the part of the nominal that learned: adapters whose status is `trained` and other
  trainable parameters that moved since init (all of them when the init record was lost).
- **LoRA params** in the plan: what a LoRA adapter of the plan's rank costs on a module, `r x (in + out)`
  ([`~mm_trainer.model.towers.LinearInfo.lora_params`]); summed over the kept modules it is the plan's share of the
  nominal trainable.

The audit computes nominal and effective trainable ([`~mm_trainer.audit.params.param_summary`]); the plan table,
`AUDIT.md`, the model card and `mm-trainer plan` / `compare` print these fields and nothing recomputed.
"""

from __future__ import annotations

from torch import nn

from ..distributed.sharding import full_numel


def param_count(param: nn.Parameter) -> int:
    """Elements of a parameter as if unquantized and unsharded: a bitsandbytes 4-bit weight packs two values per byte
    and keeps its real shape in `quant_state.shape`; an FSDP2 shard or a ZeRO-3 partition counts whole."""
    quant_state = getattr(param, "quant_state", None)
    shape = getattr(quant_state, "shape", None)
    if shape is not None:
        n = 1
        for d in shape:
            n *= int(d)
        return n
    return full_numel(param)
