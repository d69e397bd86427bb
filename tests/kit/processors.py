"""Processors for the tiny models: real transformers processor classes over PIL image processors.

torchvision is not installed here, so no video processor can be built, and transformers 5.23 can't even type-check a
``None`` video processor: ``ProcessorMixin.check_argument_for_proper_class`` looks ``VideoProcessorMixin`` up in the
dummy ``VIDEO_PROCESSOR_MAPPING`` and fails with ``AttributeError: type object 'VIDEO_PROCESSOR_MAPPING' has no
attribute '_extra_content'``. The Qwen processors are therefore thin subclasses that drop ``video_processor`` from
their attributes: construction, ``__call__``, ``apply_chat_template``, ``save_pretrained`` and ``from_pretrained``
all run the stock transformers code, with images only. The subclasses are registered with ``AutoProcessor`` under
a kit-only key (no real model type is remapped), so ``AutoProcessor.from_pretrained`` finds them by the
``processor_class`` name written to ``processor_config.json``.
"""

from __future__ import annotations

from transformers import (
    AutoProcessor,
    CLIPImageProcessorPil,
    Gemma3ImageProcessorPil,
    Gemma3Processor,
    LlavaProcessor,
    MllamaImageProcessorPil,
    MllamaProcessor,
    ProcessorMixin,
    Qwen2_5_VLProcessor,
    Qwen2AudioProcessor,
    Qwen2VLImageProcessorPil,
    Qwen3VLProcessor,
    WhisperFeatureExtractor,
)

from . import models
from .tokenizer import make_tokenizer

PROCESSOR_FAMILIES: tuple[str, ...] = ("qwen2_5_vl", "qwen3_vl", "gemma3", "llava", "qwen2_audio", "mllama")
"""Families :func:`make_processor` can build a processor for."""

QWEN_IMAGE_SIDE = {"qwen2_5_vl": 56, "qwen3_vl": 64}
"""Every image is resized to this square side (2x2 merged patches: 4 placeholder tokens per image)."""


class _ImagesOnly:
    """Mixin for Qwen processors: no ``video_processor`` attribute (none can be built without torchvision)."""

    @classmethod
    def get_attributes(cls) -> list[str]:
        """The sub-processors, minus the video processor."""
        return [name for name in super().get_attributes() if name != "video_processor"]  # type: ignore[misc]


class KitQwen2_5_VLProcessor(_ImagesOnly, Qwen2_5_VLProcessor):
    """``Qwen2_5_VLProcessor`` without a video processor."""


class KitQwen3VLProcessor(_ImagesOnly, Qwen3VLProcessor):
    """``Qwen3VLProcessor`` without a video processor."""


for _cls in (KitQwen2_5_VLProcessor, KitQwen3VLProcessor):
    # A string key touches no real config -> processor mapping; it only makes the class findable by name.
    AutoProcessor.register(f"mm_trainer_kit.{_cls.__name__}", _cls, exist_ok=True)


def _qwen(family: str) -> ProcessorMixin:
    """Qwen2.5-VL / Qwen3-VL: images resized to one fixed square, 4 merged patches each."""
    tok = make_tokenizer(family)
    side = QWEN_IMAGE_SIDE[family]
    patch = models.QWEN_PATCH[family]
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": side * side, "longest_edge": side * side},
        patch_size=patch,
        temporal_patch_size=2,
        merge_size=2,
    )
    cls = KitQwen2_5_VLProcessor if family == "qwen2_5_vl" else KitQwen3VLProcessor
    return cls(image_processor=image_processor, tokenizer=tok, chat_template=tok.chat_template)


def _gemma3() -> ProcessorMixin:
    """Gemma3: fixed-size images, ``image_seq_length`` soft tokens between ``<start_of_image>`` and ``<end_of_image>``."""
    tok = make_tokenizer("gemma3")
    side = models.GEMMA3_IMAGE_SIZE
    image_processor = Gemma3ImageProcessorPil(size={"height": side, "width": side}, do_pan_and_scan=False)
    return Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tok,
        chat_template=tok.chat_template,
        image_seq_length=models.GEMMA3_TOKENS_PER_IMAGE,
    )


def _llava() -> ProcessorMixin:
    """LLaVA: CLIP preprocessing to 28x28 (2x2 patches + CLS, CLS dropped)."""
    tok = make_tokenizer("llava")
    side = models.LLAVA_IMAGE_SIZE
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=models.LLAVA_PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped again by the "default" strategy
        chat_template=tok.chat_template,
    )


def _mllama() -> ProcessorMixin:
    """Mllama: one 28x28 tile per image; the image token gates cross-attention instead of being expanded."""
    tok = make_tokenizer("mllama")
    side = models.MLLAMA_IMAGE_SIZE
    image_processor = MllamaImageProcessorPil(
        size={"height": side, "width": side}, max_image_tiles=models.MLLAMA_MAX_TILES
    )
    return MllamaProcessor(image_processor=image_processor, tokenizer=tok, chat_template=tok.chat_template)


def _qwen2_audio() -> ProcessorMixin:
    """Qwen2-Audio: Whisper log-mel features over a 1 s window (100 frames)."""
    tok = make_tokenizer("qwen2_audio")
    feature_extractor = WhisperFeatureExtractor(
        feature_size=models.AUDIO_MEL_BINS,
        sampling_rate=16000,
        chunk_length=models.AUDIO_CHUNK_SECONDS,
        return_attention_mask=True,
    )
    return Qwen2AudioProcessor(feature_extractor=feature_extractor, tokenizer=tok, chat_template=tok.chat_template)


def make_processor(family: str) -> ProcessorMixin:
    """A fresh processor for ``family`` whose placeholder expansion matches :func:`tiny_model`'s towers."""
    if family in QWEN_IMAGE_SIDE:
        return _qwen(family)
    builders = {"gemma3": _gemma3, "llava": _llava, "mllama": _mllama, "qwen2_audio": _qwen2_audio}
    if family not in builders:
        raise ValueError(f"No processor for family {family!r}; expected one of {PROCESSOR_FAMILIES}")
    return builders[family]()
