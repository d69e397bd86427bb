"""Dummy media for sharded engines: every rank runs every media tower on every micro-batch.

Under FSDP and DeepSpeed ZeRO-3 each module gathers its sharded weights when it runs (and reduces its gradients in
the backward), and the ranks' collectives must match one for one. With mixed data a rank whose micro-batch holds no
image skips the vision tower while another rank runs it, and the run hangs or aborts ("collective mismatch").

[`DummyMedia`] closes that gap. For each media tower the data reaches, when a micro-batch holds none of its
media, a forward pre-hook on the language model runs the model's own feature extractor (`get_image_features` /
`get_audio_features`) on one tiny blank input built by the processor, at the point where real features would be
computed (before the language model), and adds `0 * features` to the language model's input embeddings. So:

- the tower's forward and backward (gathers, gradient reductions) run on every rank in the same order;
- the loss is unchanged (`x + 0 == x`), and so is every gradient of a real batch: the dummy's branch gets an
  all-zero upstream gradient, so it adds exact zeros to the tower's parameter gradients;
- adapters that only a dummy ran are not counted as having fired (the telemetry's `fired` set is restored), so the
  audit of a tower that only ever saw dummies says `never_fired`, as under DDP;
- in an optimizer step where no rank saw real media of a tower, the tower's (all-zero) gradients are set back to
  `None` before the optimizer runs, so that AdamW skips those parameters exactly as it does under DDP (a zero
  gradient would still apply momentum and weight decay). DeepSpeed steps inside its backward and treats a missing
  gradient as zero anyway, so there this changes nothing.

It is only switched on under a sharding engine (FSDP, ZeRO-3); DDP and ZeRO-1/2 do not need it.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..distributed.engine import Engine
from ..model.modality import batch_modalities

logger = logging.getLogger(__name__)

_EXTRACTORS = {"vision": "get_image_features", "audio": "get_audio_features"}
_TOWER_MODALITIES = {"vision": ("image", "video"), "audio": ("audio",)}


class DummyMediaError(ValueError):
    """A sharded run with mixed media cannot get a dummy input for a tower (refused at start-up, with the fix)."""


@dataclass
class DummyStats:
    """Per tower: micro-batches that needed a dummy, the seconds the dummy forwards took, and optimizer steps in which
    no rank saw real media (whose gradients were set back to `None`)."""

    used: dict[str, int] = field(default_factory=dict)
    forward_seconds: dict[str, float] = field(default_factory=dict)
    idle_steps: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "used": dict(self.used),
            "forward_seconds": dict(self.forward_seconds),
            "idle_steps": dict(self.idle_steps),
        }


def _features(output: Any) -> Any:
    """The part of a feature extractor's output that the model feeds to its language model: `pooler_output` of
    transformers' `get_image_features` / `get_audio_features` outputs, else the output itself. Using only that
    keeps the dummy's backward through the same modules as a real batch's (ZeRO-3 checks that the module order
    matches across ranks)."""
    pooled = output.get("pooler_output") if isinstance(output, Mapping) else None
    return pooled if pooled is not None else output


def _tensors(output: Any) -> Iterator[torch.Tensor]:
    """Every floating-point tensor in a model output (tensors, tuples / lists, dicts, `ModelOutput`)."""
    if torch.is_tensor(output):
        if output.is_floating_point():
            yield output
    elif isinstance(output, Mapping):
        for value in output.values():
            yield from _tensors(value)
    elif isinstance(output, (list, tuple)):
        for value in output:
            yield from _tensors(value)


def _blank_image() -> Image.Image:
    """A small mid-grey RGB image: processors scale it to their minimum size (4 merged tokens for Qwen2.5-VL, the
    fixed input size for CLIP / SigLIP towers), so the dummy costs the least the tower can run on."""
    return Image.fromarray(np.full((56, 56, 3), 128, dtype=np.uint8))


def _dummy_inputs(tower: str, processor: Any) -> dict[str, torch.Tensor]:
    """The processor's features for one blank image (vision) or 0.1 s of silence (audio)."""
    if tower == "vision":
        image_processor = getattr(processor, "image_processor", None)
        if image_processor is None:
            raise DummyMediaError(f"{type(processor).__name__} has no `image_processor` to build a dummy image from")
        return dict(image_processor(images=[_blank_image()], return_tensors="pt"))
    extractor = getattr(processor, "feature_extractor", None)
    if extractor is None:
        raise DummyMediaError(f"{type(processor).__name__} has no `feature_extractor` to build dummy audio from")
    rate = int(getattr(extractor, "sampling_rate", 16000))
    return dict(extractor([np.zeros(rate // 10, dtype=np.float32)], sampling_rate=rate, return_tensors="pt"))


def _call_kwargs(extractor: Any, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`inputs` restricted to the arguments `extractor` names (`pixel_values`, `image_grid_thw`, ...)."""
    params = inspect.signature(extractor).parameters
    return {k: v for k, v in inputs.items() if k in params}


class DummyMedia:
    """Runs each reached media tower on a dummy input in micro-batches that hold none of its media.

    Args:
        model: The base model (unwrapped from PEFT), whose modules stay the same objects under FSDP2 / ZeRO-3.
        towers: Media towers (`vision`, `audio`) the data reaches and that are not released, each with the module
            paths (in `model`) whose gradients only its media produce (its roots; projectors go with the last one).
        language_root: Module path of the language model in `model` (the hook sits on its forward).
        processor: The processing class, to build the dummy inputs.
        telemetry: The trainer's telemetry (its `fired` set is restored after each dummy), or `None`.

    Raises:
        DummyMediaError: A tower has no feature extractor method, or the processor cannot build its input.
    """

    def __init__(
        self,
        model: nn.Module,
        towers: Mapping[str, list[str]],
        language_root: str,
        processor: Any,
        telemetry: Any = None,
    ) -> None:
        self.model = model
        self.telemetry = telemetry
        self.stats = DummyStats()
        self._roots = {t: list(paths) for t, paths in towers.items()}
        self._real = dict.fromkeys(towers, 0)  # micro-batches with real media of each tower, this optimizer step
        self._extractors: dict[str, tuple[Any, dict[str, torch.Tensor]]] = {}
        for tower in self._roots:
            method = _EXTRACTORS[tower]
            owners = [(n, m) for n, m in model.named_modules() if callable(getattr(m, method, None))]
            if not owners:
                raise DummyMediaError(f"{type(model).__name__} has no `{method}` to run its {tower} tower on its own")
            _, owner = max(owners, key=lambda item: item[0].count(".") + (item[0] != ""))  # innermost
            extractor = getattr(owner, method)
            self._extractors[tower] = (extractor, _call_kwargs(extractor, _dummy_inputs(tower, processor)))
        self._needed: list[str] = []
        self._hook = model.get_submodule(language_root).register_forward_pre_hook(self._pre_hook, with_kwargs=True)

    @classmethod
    def for_run(
        cls,
        engine: Engine,
        tower_map: Any,
        released_towers: list[str],
        profile: Any,
        model: nn.Module,
        processor: Any,
        telemetry: Any = None,
    ) -> DummyMedia | None:
        """The dummies a run needs: one per media tower the data reaches (not released), when the engine shards
        parameters (FSDP, ZeRO-3); `None` otherwise.

        Args:
            engine: The run's engine.
            tower_map: The base model's tower map.
            released_towers: Towers (names) whose weights were released.
            profile: The training data's modality profile.
            model: The model (a PEFT model is unwrapped to its base).
            processor: The processing class, to build the dummy inputs.
            telemetry: The run's telemetry (see the class), or `None`.

        Raises:
            ValueError: A dummy is needed but cannot be built, with the fix.
        """
        if not engine.shards_parameters:
            return None
        roots = tower_map.roots
        reached = profile.reached_towers()
        present = tower_map.present_towers()
        towers = [t for t in _EXTRACTORS if t in reached and t in present and t not in released_towers]
        if not towers:
            return None
        paths = {t: [path for path, (tower, _) in roots.items() if tower == t] for t in towers}
        paths[towers[-1]] += [path for path, (tower, _) in roots.items() if tower == "projector"]
        language = [path for path, (tower, _) in roots.items() if tower == "language"]
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        try:
            if not language:
                raise DummyMediaError("the tower map found no language model to attach the dummy to")
            return cls(base, paths, language[0], processor, telemetry)
        except DummyMediaError as err:
            kind = "/".join(towers)
            raise ValueError(
                f"Data with {kind} media under {engine.name} needs "
                f"every rank to run the {kind} tower on every micro-batch (its sharded weights are gathered "
                f"collectively), and mm-trainer cannot build a dummy input for it: {err}. Use data in which every row "
                "holds the same media, or train with DDP or DeepSpeed ZeRO-2 (no parameter sharding)."
            ) from err

    @property
    def towers(self) -> list[str]:
        """The towers this object feeds dummies to."""
        return list(self._extractors)

    def begin_micro_step(self, inputs: Mapping[str, Any]) -> None:
        """Arm the dummies this micro-batch needs (call before the model's forward, from `compute_loss`)."""
        present = batch_modalities(inputs)
        self._needed = [t for t in self._extractors if not present & set(_TOWER_MODALITIES[t])]
        for tower in self._extractors:
            self._real[tower] += tower not in self._needed

    def end_step(self, reduce: Any = None) -> list[str]:
        """At the end of an optimizer step's backward (before clipping and the optimizer): set back to `None` the
        gradients of each tower no rank saw real media of in this step (they are all zero; under DDP they would be
        `None` and AdamW would skip them). Every rank must call it (`reduce` sums across ranks).

        Returns:
            The towers whose gradients were dropped.
        """
        towers = list(self._real)
        counts = torch.tensor([float(self._real[t]) for t in towers])
        if reduce is not None:
            counts = reduce(counts)
        self._real = dict.fromkeys(towers, 0)
        idle = [t for t, c in zip(towers, counts.tolist()) if c == 0]
        for tower in idle:
            self.stats.idle_steps[tower] = self.stats.idle_steps.get(tower, 0) + 1
            for path in self._roots[tower]:
                for param in self.model.get_submodule(path).parameters():
                    param.grad = None
        return idle

    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
        if not self._needed:
            return None
        needed, self._needed = self._needed, []  # once per micro-batch (generation and nested calls stay untouched)
        fired_before = set(self.telemetry.fired) if self.telemetry is not None else None
        zero = None
        for tower in needed:
            extractor, inputs = self._extractors[tower]
            start = time.perf_counter()
            device = next((t.device for t in kwargs.values() if torch.is_tensor(t)), None)
            output = extractor(**{k: v.to(device) if device is not None else v for k, v in inputs.items()})
            for t in _tensors(_features(output)):
                term = (t * 0).sum()  # exact zeros (no overflow from summing first), still in the autograd graph
                zero = term if zero is None else zero + term
            self.stats.used[tower] = self.stats.used.get(tower, 0) + 1
            self.stats.forward_seconds[tower] = self.stats.forward_seconds.get(tower, 0.0) + (
                time.perf_counter() - start
            )
        if fired_before is not None and self.telemetry.fired - fired_before:
            # Only the dummy ran these adapters in this micro-batch: they have not fired on data.
            self.telemetry.fired.intersection_update(fired_before)
            self.telemetry.watch_forward()  # their fire-once hooks removed themselves: put them back
        embeds = kwargs.get("inputs_embeds")
        if zero is None or not torch.is_tensor(embeds):
            raise RuntimeError(
                "mm-trainer's dummy media needs the language model to be called with `inputs_embeds` (as transformers' "
                f"vision-language models do); {type(module).__name__} was called without. Use batches in which every "
                "row holds the same media, or train this model without FSDP / ZeRO-3."
            )
        kwargs["inputs_embeds"] = embeds + zero.to(embeds.dtype)
        return args, kwargs

    def remove(self) -> None:
        """Detach the hook."""
        self._hook.remove()
