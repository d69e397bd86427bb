"""`MMSFTConfig`: TRL's `SFTConfig` plus the multimodal settings of [`~mm_trainer.MMSFTTrainer`]."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields
from typing import Any

from transformers import TrainingArguments
from trl import SFTConfig

from ..model.modality import MODALITIES
from ..model.targets import DEAD_TARGET_POLICIES, validate_target_towers

QUANTIZATION_MODES: tuple[str, ...] = ("qlora", "loftq")


@dataclass
class MultimodalArguments:
    r"""The multimodal settings every mm-trainer config adds to its TRL config (a dataclass mixin).

    `MMSFTConfig` is `MultimodalArguments` + TRL's `SFTConfig`; the configs of the other TRL trainers combine the same
    way, so every trainer reads the same fields with the same defaults and validation.

    Parameters:
        > Targets from the data

        target_towers (`str` or `list[str]`, *optional*, defaults to `"auto"`):
            Towers LoRA adapters may go on. `"auto"` follows the data: the language tower always, the vision / audio
            tower and the projector only when the data holds images / audio. A list (`["language", "vision"]`)
            overrides the data. Tower names: `language`, `vision`, `audio`, `projector`, `output`, `other`.
        dead_targets (`str`, *optional*, defaults to `"drop"`):
            What to do with modules `target_modules` matches but the data never reaches: `"drop"` them (logged),
            `"warn"` (keep them and warn), or `"error"` (raise, listing them).
        target_probe (`bool`, *optional*, defaults to `True`):
            Confirm reachability with one forward + backward of a real batch built from a few training rows. Switch
            off for very large models; targets then follow the tower structure alone.
        target_probe_rows (`int`, *optional*, defaults to `4`):
            Rows in the probe batch, chosen to cover every modality the data holds.
        modality_sample_rows (`int`, *optional*, defaults to `256`):
            Rows inspected to profile the dataset's modalities (spread over a map-style dataset, the head of a stream).
        data_modalities (`list[str]`, *optional*):
            Declare the data's modalities (`text`, `image`, `video`, `audio`) instead of sampling the dataset.
        free_unreached_towers (`bool`, *optional*):
            Release the weights of towers the data never reaches (e.g. the vision tower on text-only data). `None`
            (default) does it when it is safe: text-only training and evaluation data, no adapter on the tower, and
            the probe saw none of its modules fire. The saved adapter still loads onto the full model.

        > Telemetry

        tower_telemetry (`bool`, *optional*, defaults to `True`):
            Log, per tower, the adapters' gradient norm and the fraction of adapters with a non-zero gradient. With
            `audit=True` the same measurements are still taken (the audit needs them) but not logged.

        > IMoD (Implicit Modality Decomposition)

        imod (`bool`, *optional*, defaults to `False`):
            Split each LoRA A matrix by seeded masks into text / non-text / shared parts and inject the MSDC and MAAC
            constraint gradients into A's gradient (LoRA Linear layers of the language model; adapters elsewhere
            train as plain LoRA). Needs data with non-text tokens. Adds no parameter: the saved adapter is a plain
            LoRA adapter. See `mm_trainer.imod`.
        imod_shared_ratio (`float`, *optional*, defaults to `0.2`):
            Shared ratio of the first layer, r_s(0).
        imod_alpha (`float`, *optional*, defaults to `0.4`):
            Growth of the shared ratio with depth: r_s(l) = r_s(0) + alpha * l / L.
        imod_lambda_msd (`float`, *optional*, defaults to `1.0`):
            Weight lambda_1 of the modality-specific decoupling constraint (MSDC) gradient.
        imod_lambda_ma (`float`, *optional*, defaults to `1e-4`):
            Weight lambda_2 of the modality-invariant alignment constraint (MAAC) gradient.
        imod_seed (`int`, *optional*):
            Seed of the masks. Defaults to `seed`.
        imod_text_only (`str`, *optional*, defaults to `"error"`):
            What `imod=True` does on text-only data: `"error"` or `"warn"` (then trains as plain LoRA).
        dominance_steps (`int`, *optional*, defaults to `50`):
            At step 1 and every this many steps, estimate the Non-Text Dominance Rate (share of the language model's
            LoRA parameters whose Fisher information from non-text tokens exceeds that from text tokens) on that
            step's batch, when the data is multimodal, with or without `imod`. Logged as `dominance/non_text_rate`
            and written to the audit. `0` disables.

        > 4-bit

        quantization (`str`, *optional*):
            `"qlora"`: the base in nf4 4-bit (double quantization) through bitsandbytes, with the towers in
            `quant_skip_towers` (vision, audio, projector, `lm_head`) in full precision; at load when `model` is a
            path / id, in place for a full-precision model instance; a bitsandbytes 4-bit model passed by the user is
            taken as it is. `"loftq"`: the same, with LoftQ on the kept target modules (nf4 quantization alternated
            with a rank-r SVD of the residual; needs the full-precision weights, so the model loads in full precision
            and is quantized after target resolution). Needs `peft_config` and bitsandbytes>=0.48 (CPU or CUDA).
            `quantization.json` is saved next to the adapter; `mm_trainer.quant.load_quantized_base` rebuilds the
            base from it.
        loftq_iter (`int`, *optional*, defaults to `1`):
            LoftQ alternating steps (nf4 quantization, rank-r SVD of the residual). With 1 the base is plain nf4 of
            the weights; with more, the factors it was quantized against are saved as `loftq_offsets.safetensors`.
        quant_compute_dtype (`str`, *optional*, defaults to `"auto"`):
            Compute dtype of 4-bit layers: `"auto"` (bf16 when `bf16=True`, fp16 when `fp16=True`, else fp32),
            `"bfloat16"`, `"float16"`, `"float32"`. With float32 the adapters train in float32 (TRL would cast them
            to bf16).
        quant_skip_towers (`list[str]`, *optional*, defaults to `["vision", "audio", "projector", "output"]`):
            Towers kept in full precision when quantizing.

        > Audit

        audit (`bool`, *optional*, defaults to `True`):
            Write `audit.json`, `AUDIT.md` and plots next to the adapter at every save (`save_model` and each
            checkpoint), add an audit section to the `README.md` model card, and print a summary after training.
            Each adapter gets a status (`trained`, `decay_only`, `zero_grad`, `never_fired`) from fingerprints of its
            A and B taken at init, so PiSSA / OLoRA / LoftQ starts are judged right. A failing audit never stops a
            save: the adapter is kept and the error goes to `audit_error.txt`.
        audit_plots (`bool`, *optional*, defaults to `True`):
            Draw the loss and per-tower gradient-norm plots (matplotlib) with the audit.
        audit_block_failed_push (`bool`, *optional*, defaults to `True`):
            Refuse `push_to_hub` (raising `AuditFailedError` before any upload) when the audit verdict is
            `"fail"`; checkpoint pushes with a failing verdict are skipped with a warning. Local files are kept.
        serving_clean_save (`bool`, *optional*, defaults to `False`):
            At `save_model` (not in `checkpoint-*` folders, which must stay resumable), strip adapters that never
            trained and whose update B @ A is exactly zero, and rewrite `target_modules` in `adapter_config.json` to
            the modules left, for serving engines that reject adapters on vision towers. Outputs are unchanged.
    """

    # Targets from the data
    target_towers: list[str] | str = field(
        default="auto",
        metadata={
            "help": 'Towers LoRA adapters may go on: "auto" (follow the data) or a list such as `language vision`. '
            "Tower names: language, vision, audio, projector, output, other."
        },
    )
    dead_targets: str = field(
        default="drop",
        metadata={
            "help": "What to do with target modules the data never reaches: drop (logged), warn (keep and warn), "
            "or error (raise, listing them).",
            "choices": list(DEAD_TARGET_POLICIES),
        },
    )
    target_probe: bool = field(
        default=True,
        metadata={
            "help": "Confirm reachability with one forward+backward of a real batch of training rows. Switch off for "
            "very large models; targets then follow the tower structure."
        },
    )
    target_probe_rows: int = field(
        default=4, metadata={"help": "Rows in the probe batch, chosen to cover every modality of the data."}
    )
    modality_sample_rows: int = field(
        default=256, metadata={"help": "Rows inspected to profile the dataset's modalities."}
    )
    data_modalities: list[str] | None = field(
        default=None,
        metadata={"help": "Declare the data's modalities (text, image, video, audio) instead of sampling the data."},
    )
    free_unreached_towers: bool | None = field(
        default=None,
        metadata={
            "help": "Release the weights of towers the data never reaches. Unset: do it when safe (text-only data, "
            "no adapter on the tower, the probe saw none of its modules fire)."
        },
    )

    # Telemetry
    tower_telemetry: bool = field(
        default=True,
        metadata={
            "help": "Log per-tower adapter gradient norms and the fraction of adapters with non-zero gradient (with "
            "audit=True they are measured anyway, for the audit, but not logged)."
        },
    )

    # IMoD
    imod: bool = field(
        default=False,
        metadata={"help": "Implicit Modality Decomposition: inject MSDC/MAAC constraint gradients into LoRA A."},
    )
    imod_shared_ratio: float = field(default=0.2, metadata={"help": "IMoD shared ratio of the first layer, r_s(0)."})
    imod_alpha: float = field(
        default=0.4, metadata={"help": "IMoD growth of the shared ratio with depth: r_s(l) = r_s(0) + alpha*l/L."}
    )
    imod_lambda_msd: float = field(default=1.0, metadata={"help": "IMoD weight lambda_1 of the MSDC gradient."})
    imod_lambda_ma: float = field(default=1e-4, metadata={"help": "IMoD weight lambda_2 of the MAAC gradient."})
    imod_seed: int | None = field(default=None, metadata={"help": "Seed of the IMoD masks (defaults to `seed`)."})
    imod_text_only: str = field(
        default="error",
        metadata={
            "help": "What imod=True does on text-only data: error, or warn (then trains as plain LoRA).",
            "choices": ["error", "warn"],
        },
    )
    dominance_steps: int = field(
        default=50,
        metadata={
            "help": "Every this many steps, estimate the Non-Text Dominance Rate from per-modality Fisher information "
            "when the data is multimodal. 0 disables."
        },
    )

    # 4-bit
    quantization: str | None = field(
        default=None,
        metadata={
            "help": "qlora: the base in nf4 4-bit (double quant) with vision/audio/projector/lm_head in full "
            "precision; loftq: the same with LoftQ initialisation of the kept target modules. Needs peft_config.",
            "choices": [None, *QUANTIZATION_MODES],
        },
    )
    loftq_iter: int = field(
        default=1, metadata={"help": "LoftQ alternating steps (nf4 quantization, rank-r SVD of the residual)."}
    )
    quant_compute_dtype: str = field(
        default="auto",
        metadata={
            "help": "Compute dtype of 4-bit layers: auto (bf16 when bf16=True, fp16 when fp16=True, else fp32), "
            "bfloat16, float16, float32.",
            "choices": ["auto", "bfloat16", "float16", "float32"],
        },
    )
    quant_skip_towers: list[str] = field(
        default_factory=lambda: ["vision", "audio", "projector", "output"],
        metadata={"help": "Towers kept in full precision when quantizing."},
    )

    # Audit
    audit: bool = field(
        default=True,
        metadata={
            "help": "Write audit.json, AUDIT.md and plots next to the adapter at every save, add the audit to the "
            "model card and print a summary after training."
        },
    )
    audit_plots: bool = field(default=True, metadata={"help": "Draw loss and per-tower gradient-norm plots."})
    audit_block_failed_push: bool = field(
        default=True,
        metadata={
            "help": 'Refuse push_to_hub (before any upload) when the audit verdict is "fail"; local files stay.'
        },
    )
    serving_clean_save: bool = field(
        default=False,
        metadata={
            "help": "At save_model, strip adapters that never trained (and change no output) and rewrite "
            "target_modules in adapter_config.json to the modules left."
        },
    )

    @classmethod
    def extend(cls, args: TrainingArguments, **changes: Any) -> Any:
        """A new config of this class with every field value of `args` (a `TrainingArguments`, a TRL config or an
        mm-trainer config), the fields `args` lacks at their defaults, and `changes` applied.

        Built through the dataclass fields (values are deep-copied, so `args` is never touched, and the hub token,
        which `to_dict()` hides, is kept); `__post_init__` validates the result as for a config built by hand.
        """
        own = {f.name for f in fields(cls) if f.init}
        values = {f.name: copy.deepcopy(getattr(args, f.name)) for f in fields(args) if f.init and f.name in own}
        unknown = sorted(set(changes) - own)
        if unknown:
            raise TypeError(f"{cls.__name__} has no field(s) {unknown}.")
        return cls(**{**values, **changes})

    def __post_init__(self) -> None:
        self._validate_mm()
        super().__post_init__()  # the TRL config's own validation (the next class in the MRO)

    def _validate_mm(self) -> None:
        if self.target_towers is None or (isinstance(self.target_towers, list) and self.target_towers == ["auto"]):
            self.target_towers = "auto"
        self.target_towers = validate_target_towers(self.target_towers)
        if self.dead_targets not in DEAD_TARGET_POLICIES:
            raise ValueError(f"`dead_targets` must be one of {list(DEAD_TARGET_POLICIES)}, got {self.dead_targets!r}.")
        for name in ("target_probe_rows", "modality_sample_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}.")
        if self.data_modalities is not None:
            unknown = sorted(set(self.data_modalities) - set(MODALITIES))
            if unknown:
                raise ValueError(f"Unknown `data_modalities` {unknown}; choose from {list(MODALITIES)}.")
        self._validate_imod()
        self._validate_quantization()

    def _validate_imod(self) -> None:
        if not 0.0 <= self.imod_shared_ratio <= 1.0:
            raise ValueError(f"`imod_shared_ratio` must be in [0, 1], got {self.imod_shared_ratio}.")
        if self.imod_alpha < 0 or self.imod_shared_ratio + self.imod_alpha > 1.0:
            raise ValueError(
                f"`imod_shared_ratio + imod_alpha` is the deepest layer's shared ratio and must be in [0, 1]; got "
                f"{self.imod_shared_ratio} + {self.imod_alpha}. Lower `imod_alpha` or `imod_shared_ratio`."
            )
        for name in ("imod_lambda_msd", "imod_lambda_ma"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be >= 0, got {getattr(self, name)}.")
        if self.imod_text_only not in ("error", "warn"):
            raise ValueError(f'`imod_text_only` must be "error" or "warn", got {self.imod_text_only!r}.')
        if self.dominance_steps < 0:
            raise ValueError(f"`dominance_steps` must be >= 0 (0 disables), got {self.dominance_steps}.")

    def _validate_quantization(self) -> None:
        if self.quantization is not None and self.quantization not in QUANTIZATION_MODES:
            raise ValueError(
                f"`quantization` must be None, {' or '.join(repr(m) for m in QUANTIZATION_MODES)}; got "
                f"{self.quantization!r}."
            )
        if self.loftq_iter < 1:
            raise ValueError(f"`loftq_iter` must be >= 1, got {self.loftq_iter}.")
        if self.quant_compute_dtype not in ("auto", "bfloat16", "float16", "float32"):
            raise ValueError(
                f"`quant_compute_dtype` must be 'auto', 'bfloat16', 'float16' or 'float32', got "
                f"{self.quant_compute_dtype!r}."
            )
        skip = self.quant_skip_towers
        if not skip or skip == "none":
            self.quant_skip_towers = []
        else:
            skip = validate_target_towers(skip)
            if skip == "auto" or "language" in skip:
                raise ValueError(
                    f"`quant_skip_towers` lists the towers kept in full precision, got {self.quant_skip_towers!r}; the "
                    "language tower is the one 4-bit quantizes. Use tower names such as "
                    '["vision", "audio", "projector", "output"] (the default).'
                )
            self.quant_skip_towers = skip


@dataclass
class MMSFTConfig(MultimodalArguments, SFTConfig):
    r"""Configuration for [`MMSFTTrainer`]: every [`~trl.SFTConfig`] field, plus the multimodal ones of
    [`MultimodalArguments`] (targets from the data, telemetry, IMoD, 4-bit, audit)."""
