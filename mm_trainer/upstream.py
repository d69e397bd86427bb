"""Every non-public API of TRL, PEFT, transformers and bitsandbytes that mm-trainer relies on, with the reason.

mm-trainer sits one level further out than TRL: public hooks first (``TrainerCallback.on_train_begin`` / ``on_save``,
``save_model``, ``push_to_hub``, ``create_model_card``). What could not be done through them is listed here, one entry
per API, so that an upgrade of a library has one place to check; ``tests/test_private_api.py`` imports each entry and
pins the signature mm-trainer calls it with (the behaviour it relies on is pinned by the tests named in ``pinned_by``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PrivateApi:
    """One non-public API mm-trainer uses.

    Attributes:
        path: ``module:qualified.name`` of the object.
        used_in: The mm-trainer module(s) using it.
        why: Why no public API does the job.
        parameters: Parameter names mm-trainer passes (checked against the signature).
        pinned_by: Tests that fail when its behaviour changes.
    """

    path: str
    used_in: str
    why: str
    parameters: tuple[str, ...] = ()
    pinned_by: str = ""

    def resolve(self) -> Any:
        """The object (raises ``ImportError`` / ``AttributeError`` when the library moved or dropped it)."""
        module_name, _, qualname = self.path.partition(":")
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
        return obj


PRIVATE_APIS: tuple[PrivateApi, ...] = (
    PrivateApi(
        "transformers:Trainer._push_from_checkpoint",
        "mm_trainer/trainer.py",
        "The only point between a checkpoint's save and its Hub upload (hub_strategy='every_save' / 'checkpoint'): a "
        "checkpoint whose audit verdict is 'fail' must not be pushed; on_save comes after the upload.",
        ("checkpoint_folder",),
        "tests/test_audit_trainer.py::test_checkpoint_pushes_carry_the_audit_and_skip_failed_ones",
    ),
    PrivateApi(
        "transformers:Trainer.save_model",
        "mm_trainer/trainer.py, mm_trainer/audit/auditor.py",
        "The `_internal_call` parameter: our save_model override saves without the Hub push and pushes after the "
        "audit files are written, as Trainer.save_model does for user calls.",
        ("output_dir", "_internal_call"),
        "tests/test_audit_trainer.py::test_push_uploads_adapter_audit_and_card",
    ),
    PrivateApi(
        "trl.trainer.utils:create_model_from_path",
        "mm_trainer/trainer.py, mm_trainer/quant/persistence.py",
        "TRL 1.16 loads a path and calls get_peft_model in the same SFTTrainer.__init__, with no hook between: the "
        "tower map, the probe and 4-bit preparation must run before PEFT wraps, so the load happens in MMSFTTrainer "
        "with TRL's own loader (same dtype / device-map rules as SFTTrainer).",
        ("model_id",),
        "tests/test_trainer.py (path loading equals SFTTrainer's own load)",
    ),
    PrivateApi(
        "trl.trainer.sft_trainer:DataCollatorForLanguageModeling",
        "mm_trainer/probe.py",
        "The probe builds its batch with the collator training will use (not exported at trl's top level).",
        ("pad_token_id", "padding_free", "pad_to_multiple_of"),
        "tests/test_probe_train_mode.py",
    ),
    PrivateApi(
        "trl.trainer.sft_trainer:DataCollatorForVisionLanguageModeling",
        "mm_trainer/probe.py",
        "The probe's image/video batches come from TRL's own vision collator (not exported at trl's top level).",
        ("processor", "max_length", "completion_only_loss", "pad_to_multiple_of", "dataset_text_field"),
        "tests/test_probe.py",
    ),
    PrivateApi(
        "peft.tuners.tuners_utils:check_target_module_exists",
        "mm_trainer/targets.py",
        "PEFT's own target matcher (regex, suffix, layers_to_transform, exclude_modules): target resolution must "
        "adapt exactly what PEFT would; PEFT exports no public equivalent.",
        ("config", "key"),
        "tests/test_targets.py (table test against the modules PEFT adapts)",
    ),
    PrivateApi(
        "peft.tuners.tuners_utils:BaseTunerLayer",
        "mm_trainer/towers.py",
        "The base class of every PEFT adapter layer: the tower map of a PEFT-wrapped model skips the adapters' own "
        "children by it (documented in PEFT's reference, not exported at peft's top level).",
        (),
        "tests/test_towers.py::test_peft_wrapped_paths_map_like_the_base",
    ),
    PrivateApi(
        "peft.utils.constants:TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING",
        "mm_trainer/targets.py",
        "PEFT's default target_modules per model type, for a LoraConfig without target_modules (PEFT has no public "
        "function returning them).",
        (),
        "tests/test_targets.py",
    ),
    PrivateApi(
        "peft.utils.constants:SEQ_CLS_HEAD_NAMES",
        "mm_trainer/targets.py",
        "The head names PEFT's all-linear expansion leaves out, so that the expansion equals PEFT's.",
        (),
        "tests/test_targets.py (table test against the modules PEFT adapts)",
    ),
    PrivateApi(
        "peft.utils.other:get_pattern_key",
        "mm_trainer/quant/preparation.py",
        "PEFT's rule for rank_pattern / alpha_pattern keys, so LoftQ factors use the rank PEFT gives each module.",
        ("pattern_keys", "key_to_match"),
        "tests/test_quant.py",
    ),
    PrivateApi(
        "bitsandbytes.functional:_convert_weight_packed_for_cpu_inverse",
        "mm_trainer/quant/layers.py",
        "bitsandbytes >= 0.49 repacks a CPU Linear4bit for its inference kernel after a no-grad forward, which breaks "
        "training of that layer; undoing the repack is the only way to keep training a layer that was evaluated.",
        ("packed_weight", "quant_state"),
        "tests/test_quant.py (bitsandbytes CPU repacking pinned)",
    ),
)
"""The list (see the module docstring). Attributes read with ``getattr`` and a fallback (the Trainer's
``current_gradient_accumulation_steps`` in :mod:`mm_trainer.imod.balance`) are not listed: a missing one changes
nothing but the IMoD scale of a short last accumulation window, which then falls back to the configured steps."""
