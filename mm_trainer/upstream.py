"""The one registry of what mm-trainer takes from its libraries beyond their public APIs, and the only place using it.

mm-trainer sits one level further out than TRL: public hooks first (`TrainerCallback.on_train_begin` / `on_save`,
`save_model`, `push_to_hub`, `create_model_card`). What could not be done through a public API is listed in
[`UPSTREAM`], one entry per name or behaviour, so that an upgrade of transformers, TRL, PEFT, accelerate, DeepSpeed,
bitsandbytes or torch has one place to check. Each entry says where it is used, why no public API does the job and
which tests fail when it changes. The kinds:

- `import`: a name imported from a module its library does not export publicly (a deep TRL / PEFT module or a
  private name).
- `attribute`: a private attribute or key of an upstream object, read or set.
- `override`: a private method or attribute of an upstream class that an mm-trainer subclass overrides.
- `mirror`: upstream behaviour mm-trainer reproduces because no API exposes it (a test pins that both agree).
- `behaviour`: upstream behaviour mm-trainer relies on without a documented contract.

Every private name mm-trainer's code touches goes through the accessor functions below (overrides excepted: they
live in the subclass that overrides them). `tests/test_upstream.py` resolves every entry, and scans the package: an
import of a private or deep upstream name, an attribute access `obj._x` or a string `"_x"` (as in `getattr`) that
mm-trainer does not define itself, anywhere outside this module, or not listed here, fails it; so does a private
upstream method or attribute overridden by an mm-trainer class and not listed.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

KINDS: tuple[str, ...] = ("import", "attribute", "override", "mirror", "behaviour")
LIBRARIES: tuple[str, ...] = ("transformers", "trl", "peft", "accelerate", "deepspeed", "bitsandbytes", "torch")


@dataclass(frozen=True)
class UpstreamUse:
    """One upstream name or behaviour mm-trainer relies on without a public API.

    Attributes:
        library: The library it belongs to (one of [`LIBRARIES`]).
        kind: One of [`KINDS`].
        names: The private names as they appear in mm-trainer's code (attribute, key or imported name); empty for
            mirrors and behaviours without one.
        path: `module:qualified.name` of the object, resolved by the test to check it still exists (`None` for keys,
            mirrors and behaviours).
        used_in: The mm-trainer module(s) relying on it.
        why: Why no public API does the job.
        parameters: Parameter names mm-trainer passes (checked against the signature).
        pinned_by: Tests that fail when its behaviour changes.
    """

    library: str
    kind: str
    names: tuple[str, ...]
    path: str | None
    used_in: str
    why: str
    parameters: tuple[str, ...] = ()
    pinned_by: str = ""

    def resolve(self) -> Any:
        """The object (raises `ImportError` / `AttributeError` when the library moved or dropped it)."""
        if self.path is None:
            raise ValueError(f"{self.names or self.why[:40]} has no path to resolve")
        module_name, _, qualname = self.path.partition(":")
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
        return obj


UPSTREAM: tuple[UpstreamUse, ...] = (
    # -- transformers ------------------------------------------------------------------------------------------------
    UpstreamUse(
        "transformers",
        "override",
        ("_push_from_checkpoint",),
        "transformers:Trainer._push_from_checkpoint",
        "mm_trainer/training/mixin.py",
        "The only point between a checkpoint's save and its Hub upload (hub_strategy='every_save' / 'checkpoint'): a "
        "checkpoint whose audit verdict is 'fail' must not be pushed; on_save comes after the upload.",
        ("checkpoint_folder",),
        "tests/test_audit_trainer.py::test_checkpoint_pushes_carry_the_audit_and_skip_failed_ones",
    ),
    UpstreamUse(
        "transformers",
        "override",
        ("_internal_call",),
        "transformers:Trainer.save_model",
        "mm_trainer/training/mixin.py, mm_trainer/audit/auditor.py",
        "The `_internal_call` parameter of the public `save_model`: our override saves without the Hub push and "
        "pushes after the audit files are written, as Trainer.save_model does for user calls.",
        ("output_dir", "_internal_call"),
        "tests/test_audit_trainer.py::test_push_uploads_adapter_audit_and_card",
    ),
    UpstreamUse(
        "transformers",
        "attribute",
        ("_save",),
        "transformers:Trainer._save",
        "mm_trainer/training/mixin.py (via trainer_save)",
        "An FSDP2 adapter is saved from a state dict whose LoRA tensors mm-trainer gathered itself (PEFT's save fails "
        "on DTensors); Trainer._save writes it with the processing class and training arguments exactly as "
        "save_model would.",
        ("output_dir", "state_dict"),
        "tests/test_sharded.py (FSDP2 adapter saved and audited)",
    ),
    UpstreamUse(
        "transformers",
        "attribute",
        ("_require_grads_hooks", "_require_grads_hook"),
        None,
        "mm_trainer/model/probe.py (via require_grads_hooks / restore_require_grads_hooks)",
        "Enabling activation checkpointing for the probe adds input-embedding hooks that make the embeddings' output "
        "require grad; `disable_input_require_grads` would also remove hooks the user added before, so the probe "
        "removes only its own and restores the attribute as it was (transformers >= 5.x: a list; earlier: one).",
        (),
        "tests/test_probe_train_mode.py (checkpointing restored after the probe)",
    ),
    UpstreamUse(
        "transformers",
        "attribute",
        ("_load_in_4bit",),
        None,
        "mm_trainer/quant/checks.py (via bnb_config_loads_4bit)",
        "`BitsAndBytesConfig.to_dict()` and a saved config.json keep the 4-bit flag under `_load_in_4bit` (the public "
        "`load_in_4bit` is a property and may be missing from a dict written by hand).",
        (),
        "tests/test_quant.py",
    ),
    UpstreamUse(
        "transformers",
        "mirror",
        (),
        "transformers.trainer_utils:PREFIX_CHECKPOINT_DIR",
        "mm_trainer/utils/checkpoints.py (CHECKPOINT_PREFIX)",
        "The Trainer names a checkpoint folder `<PREFIX_CHECKPOINT_DIR>-<step>`; mm-trainer reads folder names in "
        "code that must not import transformers (the `mm-trainer audit` command starts in well under a second).",
        (),
        "tests/test_upstream.py::test_checkpoint_prefix_is_the_trainers",
    ),
    # -- TRL ---------------------------------------------------------------------------------------------------------
    UpstreamUse(
        "trl",
        "override",
        ("_tag_names",),
        "trl:SFTTrainer._tag_names",
        "mm_trainer/training/sft.py",
        "TRL adds the class's `_tag_names` to the model card and Hub tags; MMSFTTrainer adds 'mm-trainer' to SFT's.",
        (),
        "tests/test_audit_trainer.py::test_push_uploads_adapter_audit_and_card",
    ),
    UpstreamUse(
        "trl",
        "import",
        ("create_model_from_path",),
        "trl.trainer.utils:create_model_from_path",
        "mm_trainer/training/loading.py, mm_trainer/quant/persistence.py (via trl_create_model_from_path)",
        "TRL 1.16 loads a path and calls get_peft_model in the same trainer __init__, with no hook between: the tower "
        "map, the probe and 4-bit preparation must run before PEFT wraps, so mm-trainer loads with TRL's own loader "
        "(same dtype / device-map / architecture rules); not exported at trl's top level.",
        ("model_id",),
        "tests/test_trainer.py (path loading equals SFTTrainer's own load)",
    ),
    UpstreamUse(
        "trl",
        "import",
        ("DataCollatorForLanguageModeling",),
        "trl.trainer.sft_trainer:DataCollatorForLanguageModeling",
        "mm_trainer/training/sft_probe_batch.py (via trl_sft_collators)",
        "The probe builds its text batches with the collator SFTTrainer trains with (not exported at trl's top "
        "level).",
        ("pad_token_id", "padding_free", "pad_to_multiple_of"),
        "tests/test_probe_train_mode.py",
    ),
    UpstreamUse(
        "trl",
        "import",
        ("DataCollatorForVisionLanguageModeling",),
        "trl.trainer.sft_trainer:DataCollatorForVisionLanguageModeling",
        "mm_trainer/training/sft_probe_batch.py (via trl_sft_collators)",
        "The probe's image / video batches come from SFTTrainer's own vision collator (not exported at trl's top "
        "level).",
        ("processor", "max_length", "completion_only_loss", "pad_to_multiple_of", "dataset_text_field"),
        "tests/test_probe.py",
    ),
    UpstreamUse(
        "trl",
        "mirror",
        (),
        None,
        "mm_trainer/training/loading.py",
        "TRL's trainers turn their arguments into `create_model_from_path` kwargs inline: `model_init_kwargs` copied, "
        "`quantization_config` added (refused with TRL's words when also in `model_init_kwargs`), `device_map=None` "
        "under MULTI_GPU / DEEPSPEED, `trust_remote_code` defaulted from the config, the processor loaded from the "
        "model's name at the kwargs' `revision`; and, when no `device_map` is given, `create_model_from_path` uses "
        "None on CPU / MPS and 'auto' elsewhere (`trl_default_device_map`).",
        (),
        "tests/test_trainer.py (the model loaded by path equals SFTTrainer's)",
    ),
    UpstreamUse(
        "trl",
        "mirror",
        (),
        None,
        "mm_trainer/training/sft_errors.py",
        "SFTTrainer.__init__ refuses bad input (dataset type, processing class, eos_token, vision data with a text "
        "model, packing / padding-free / keep_end with images, peft_config type, a PeftModel with a peft_config) "
        "inline, before PEFT wraps the model; mm-trainer plans before that point, so it asks `sft_init_error` which "
        "error TRL raises and raises that one, with TRL's type and words, before any planning.",
        (),
        "tests/test_trl_wording.py (13 inputs through both trainers: same type and message prefix)",
    ),
    UpstreamUse(
        "trl",
        "mirror",
        (),
        None,
        "mm_trainer/training/sft.py",
        "Without `args`, SFTTrainer names its output_dir `<model name>-SFT`; MMSFTTrainer needs its config before "
        "SFTTrainer.__init__ runs and names it the same way (a model without a name, built from a config, gets "
        "`model-SFT` where TRL's would be `-SFT`).",
        (),
        "tests/test_trainer.py::test_default_args_are_named_as_sft_trainer_names_them",
    ),
    # -- PEFT --------------------------------------------------------------------------------------------------------
    UpstreamUse(
        "peft",
        "import",
        ("check_target_module_exists",),
        "peft.tuners.tuners_utils:check_target_module_exists",
        "mm_trainer/model/matching.py (via peft_target_module_exists)",
        "PEFT's own target matcher (regex, suffix, layers_to_transform, exclude_modules): target resolution must "
        "adapt exactly what PEFT would; PEFT exports no public equivalent.",
        ("config", "key"),
        "tests/test_targets.py (table test against the modules PEFT adapts)",
    ),
    UpstreamUse(
        "peft",
        "import",
        ("_maybe_include_all_linear_layers",),
        "peft.tuners.tuners_utils:_maybe_include_all_linear_layers",
        "mm_trainer/model/matching.py (via peft_all_linear)",
        "PEFT's expansion of target_modules='all-linear' (every Linear / Conv1D but the output head or, for "
        "SEQ_CLS, the classifier); called on a copy of the config so the resolution adapts exactly what PEFT would.",
        ("peft_config", "model"),
        "tests/test_targets.py (table test against the modules PEFT adapts)",
    ),
    UpstreamUse(
        "peft",
        "import",
        ("BaseTunerLayer",),
        "peft.tuners.tuners_utils:BaseTunerLayer",
        "mm_trainer/model/layers.py (via peft_tuner_layer_class)",
        "The base class of every PEFT adapter layer: the tower map of a PEFT-wrapped model skips the adapters' own "
        "children by it (documented in PEFT's reference, not exported at peft's top level).",
        (),
        "tests/test_towers.py::test_peft_wrapped_paths_map_like_the_base",
    ),
    UpstreamUse(
        "peft",
        "import",
        ("TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING",),
        "peft.utils.constants:TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING",
        "mm_trainer/model/matching.py (via peft_default_target_modules)",
        "PEFT's default target_modules per model type, for a LoraConfig without target_modules (PEFT has no public "
        "function returning them).",
        (),
        "tests/test_targets.py",
    ),
    UpstreamUse(
        "peft",
        "import",
        ("get_pattern_key",),
        "peft.utils.other:get_pattern_key",
        "mm_trainer/quant/preparation.py (via peft_pattern_key)",
        "PEFT's rule for rank_pattern / alpha_pattern keys, so LoftQ factors use the rank PEFT gives each module.",
        ("pattern_keys", "key_to_match"),
        "tests/test_quant.py",
    ),
    UpstreamUse(
        "peft",
        "mirror",
        (),
        None,
        "mm_trainer/model/matching.py (matched_parameters)",
        "PEFT matches `target_parameters` inside its injection (no function returns the matches): a key "
        "`<module>.<parameter>` of the lowest module holding the parameter matches when it or a `.suffix` of it is "
        "listed. mm-trainer resolves the same keys before the injection.",
        (),
        "tests/test_moe.py (fused experts resolved as PEFT adapts them)",
    ),
    # -- accelerate --------------------------------------------------------------------------------------------------
    UpstreamUse(
        "accelerate",
        "behaviour",
        (),
        None,
        "mm_trainer/model/loading.py",
        "A `device_map` entry 'disk' leaves that subtree's parameters on the meta device at load (its weights are "
        "indexed where they lie, not copied); the log line it writes about it ('... offloaded to the ...', logger "
        "'accelerate.big_modeling') is filtered by its text while mm-trainer loads without unreached towers.",
        (),
        "tests/test_memory_peak.py (path load ends exactly as a release)",
    ),
    # -- bitsandbytes ------------------------------------------------------------------------------------------------
    UpstreamUse(
        "bitsandbytes",
        "import",
        ("_convert_weight_packed_for_cpu_inverse",),
        "bitsandbytes.functional:_convert_weight_packed_for_cpu_inverse",
        "mm_trainer/quant/layers.py (via bnb_unpack_cpu_weight)",
        "bitsandbytes >= 0.49 repacks a CPU Linear4bit for its inference kernel after a no-grad forward, which breaks "
        "training of that layer; undoing the repack is the only way to keep training a layer that was evaluated.",
        ("packed_weight", "quant_state"),
        "tests/test_quant.py (bitsandbytes CPU repacking pinned)",
    ),
    UpstreamUse(
        "bitsandbytes",
        "behaviour",
        (),
        None,
        "mm_trainer/quant/layers.py (via bnb_keep_training_kernel)",
        "`Linear4bit.support_avx512bf16_for_cpu` (undocumented): set to False, a CPU Linear4bit keeps dequantizing "
        "in the compute dtype instead of switching to its bf16 inference kernel.",
        (),
        "tests/test_quant.py (bitsandbytes CPU repacking pinned)",
    ),
)
"""Every entry (see the module docstring)."""


def registered_names() -> set[str]:
    """Every private name an entry lists."""
    return {name for use in UPSTREAM for name in use.names}


# ---------------------------------------------------------------------------------------------------------------------
# Accessors: mm-trainer's code reaches the entries above only through these.
# ---------------------------------------------------------------------------------------------------------------------
def trl_create_model_from_path(model_id: str, **kwargs: Any) -> Any:
    """TRL's `create_model_from_path` (`trl.trainer.utils`)."""
    from trl.trainer.utils import create_model_from_path

    return create_model_from_path(model_id, **kwargs)


def trl_default_device_map() -> Any:
    """The `device_map` TRL's `create_model_from_path` uses when none is given: `None` on a CPU or MPS process,
    else `"auto"` (mirrored: TRL computes it inline)."""
    from accelerate import PartialState

    return None if PartialState().device.type in ("cpu", "mps") else "auto"


def trl_sft_collators() -> tuple[type, type]:
    """TRL's `DataCollatorForLanguageModeling` and `DataCollatorForVisionLanguageModeling` (SFT's collators)."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling, DataCollatorForVisionLanguageModeling

    return DataCollatorForLanguageModeling, DataCollatorForVisionLanguageModeling


def trainer_save(trainer: Any, output_dir: str, state_dict: dict[str, Any]) -> None:
    """`Trainer._save`: write the model with `state_dict`, the processing class and the training arguments, as
    `Trainer.save_model` does on the saving process."""
    trainer._save(output_dir, state_dict=state_dict)


_REQUIRE_GRADS_ATTRS = ("_require_grads_hooks", "_require_grads_hook")


def require_grads_hooks(model: Any) -> dict[str, Any]:
    """The input-embedding hooks `enable_input_require_grads` stored on `model`, by attribute (`None` if unset)."""
    return {attr: getattr(model, attr, None) for attr in _REQUIRE_GRADS_ATTRS}


def restore_require_grads_hooks(model: Any, before: dict[str, Any]) -> None:
    """Remove the input-embedding hooks added since `before` ([`require_grads_hooks`]) and restore the attributes."""
    known = {id(h) for h in _hook_handles(before)}
    for handle in _hook_handles(require_grads_hooks(model)):
        if id(handle) not in known:
            handle.remove()
    for attr, value in before.items():
        if value is None:
            if hasattr(model, attr):
                delattr(model, attr)
        else:
            setattr(model, attr, value)


def _hook_handles(hooks: dict[str, Any]) -> list[Any]:
    out: list[Any] = []
    for value in hooks.values():
        for handle in value if isinstance(value, list) else [value] if value is not None else []:
            if all(handle is not h for h in out):
                out.append(handle)
    return out


def bnb_config_loads_4bit(config: dict[str, Any]) -> bool:
    """Whether a bitsandbytes quantization config, as a dict, loads in 4 bits."""
    return bool(config.get("load_in_4bit") or config.get("_load_in_4bit"))


def peft_tuner_layer_class() -> type:
    """PEFT's `BaseTunerLayer`, the base class of every adapter layer."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return BaseTunerLayer


def peft_target_module_exists(config: Any, key: str) -> bool:
    """Whether PEFT adapts the module at path `key` for `config` (PEFT's own matcher)."""
    from peft.tuners.tuners_utils import check_target_module_exists

    return bool(check_target_module_exists(config, key))


def peft_all_linear(config: Any, model: Any) -> Any:
    """A shallow copy of `config` with `target_modules="all-linear"` expanded as PEFT expands it for `model`."""
    import copy

    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers

    return _maybe_include_all_linear_layers(copy.copy(config), model)


def peft_default_target_modules() -> dict[str, Any]:
    """PEFT's default LoRA `target_modules` per model type."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    return TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING


def peft_pattern_key(pattern_keys: Any, key: str) -> str:
    """The `rank_pattern` / `alpha_pattern` key PEFT applies to module `key`."""
    from peft.utils.other import get_pattern_key

    return get_pattern_key(pattern_keys, key)


def bnb_unpack_cpu_weight(packed: Any, quant_state: Any) -> tuple[Any, Any]:
    """Undo bitsandbytes' CPU inference repacking of a 4-bit weight: `(weight, quant_state)` as before it."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    return _convert_weight_packed_for_cpu_inverse(packed, quant_state)


def bnb_keep_training_kernel(layer: Any) -> None:
    """Keep a CPU `Linear4bit` off bitsandbytes' bf16 inference kernel (see the `behaviour` entry)."""
    layer.support_avx512bf16_for_cpu = False
