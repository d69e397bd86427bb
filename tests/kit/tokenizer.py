"""Tiny deterministic BPE tokenizers with the special tokens and chat template each model family needs."""

from __future__ import annotations

import copy
import functools

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

FAMILIES: tuple[str, ...] = ("qwen2_5_vl", "qwen3_vl", "gemma3", "llava", "qwen2_audio", "mllama", "causal_lm")
"""Every model family the kit can build."""

VLM_FAMILIES: tuple[str, ...] = ("qwen2_5_vl", "qwen3_vl", "gemma3", "llava", "mllama")
"""Families with an image tower."""

AUDIO_FAMILIES: tuple[str, ...] = ("qwen2_audio",)
"""Families with an audio tower."""

VOCAB_SIZE = 640
"""Target size of the trained BPE vocabulary (special tokens included)."""

BASE_SPECIAL_TOKENS: tuple[str, ...] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

_QWEN_VISION = {
    "vision_start_token": "<|vision_start|>",
    "vision_end_token": "<|vision_end|>",
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
}

FAMILY_SPECIAL_TOKENS: dict[str, dict[str, str]] = {
    "qwen2_5_vl": dict(_QWEN_VISION),
    "qwen3_vl": dict(_QWEN_VISION),
    "gemma3": {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"},
    "llava": {"image_token": "<image>"},
    "qwen2_audio": {
        "audio_bos_token": "<|audio_bos|>",
        "audio_token": "<|AUDIO|>",
        "audio_eos_token": "<|audio_eos|>",
    },
    "mllama": {"image_token": "<|image|>", "python_token": "<|python_tag|>"},
    "causal_lm": {},
}
"""Named model-specific special tokens per family (name -> token), set as tokenizer attributes."""

FAMILY_BOS: dict[str, str] = {"mllama": "<|begin_of_text|>"}
"""Families whose processor needs a beginning-of-text token (the others have none, like Qwen)."""

_QWEN_PLACEHOLDERS = {
    "image": "<|vision_start|><|image_pad|><|vision_end|>",
    "video": "<|vision_start|><|video_pad|><|vision_end|>",
}

CHAT_PLACEHOLDERS: dict[str, dict[str, str]] = {
    "qwen2_5_vl": _QWEN_PLACEHOLDERS,
    "qwen3_vl": _QWEN_PLACEHOLDERS,
    "gemma3": {"image": "<start_of_image>"},
    "llava": {"image": "<image>"},
    "qwen2_audio": {"audio": "<|audio_bos|><|AUDIO|><|audio_eos|>"},
    "mllama": {"image": "<|image|>"},
    "causal_lm": {},
}
"""What the chat template writes for a non-text content part, per family and part type (before processor expansion)."""

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A small red square sits next to a big blue circle.
What color is this square? The square is red. The square is green. The square is blue. The square is yellow.
What color is this picture? It is white. It is black. It is purple. It is orange. It is gray. It is a gradient.
What is two plus three? Two plus three is five. What is one plus one? The answer is two.
What is 7 + 5? 12. What is 3 + 4? 7. What is 9 + 8? 17. What is 6 + 6? 12. What is 10 + 21? 31.
Compute the sum of the numbers 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 and add them.
You are a helpful assistant. Answer the question in one word. Describe the image in detail please.
What sound is this? It is a sine wave. The tone is high. The tone is low. Listen to the audio clip.
system user assistant tool image video audio text content role message messages prompt completion
Training a model on a small dataset is fast when the model is tiny and the batch is small.
Language models predict the next token. Vision models look at pixels and patches of the image.
She sells sea shells by the sea shore. Peter picked a peck of pickled peppers for the people.
Hello world! How are you today? I am fine, thank you. Good morning, good evening, good night.
This is a test. That was a test too. These are tests, and those were tests as well; all of them pass.
"""


PRETOKENIZE_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
"""Qwen2's pre-tokenizer split (single digits). The kit uses Qwen2's exact pipeline because ``AutoTokenizer`` reloads
a saved ``model_type: qwen2`` checkpoint as ``Qwen2Tokenizer``, which rebuilds that pipeline around the saved
vocab and merges regardless of the ``tokenizer_class`` written to ``tokenizer_config.json``."""


def _chat_template(family: str) -> str:
    """A ChatML template that renders string or list content and marks assistant turns for loss masking."""
    placeholders = CHAT_PLACEHOLDERS[family]
    parts = "".join(f"{{%- elif part['type'] == '{kind}' -%}}{text}" for kind, text in sorted(placeholders.items()))
    return (
        "{%- macro render(content) -%}"
        "{%- if content is string -%}{{ content }}"
        "{%- elif content is not none -%}"
        "{%- for part in content -%}"
        "{%- if part['type'] == 'text' -%}{{ part['text'] }}"
        f"{parts}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- endif -%}"
        "{%- endmacro -%}"
        "{%- if bos_token is defined and bos_token -%}{{ bos_token }}{%- endif -%}"
        "{%- for message in messages -%}"
        "{{ '<|im_start|>' + message['role'] + '\\n' }}"
        "{%- if message['role'] == 'assistant' -%}"
        "{% generation %}{{ render(message['content']) }}{{ '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
        "{%- else -%}"
        "{{ render(message['content']) }}{{ '<|im_end|>\\n' }}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
    )


def special_tokens(family: str) -> list[str]:
    """All special tokens of ``family`` in id order: ChatML tokens first, then the family's own."""
    if family not in FAMILIES:
        raise ValueError(f"Unknown family {family!r}; expected one of {FAMILIES}")
    bos = [FAMILY_BOS[family]] if family in FAMILY_BOS else []
    return [*BASE_SPECIAL_TOKENS, *bos, *FAMILY_SPECIAL_TOKENS[family].values()]


@functools.cache
def _build(family: str) -> PreTrainedTokenizerFast:
    """Train the family's BPE on the built-in corpus (a few milliseconds) and wrap it; cached, never handed out."""
    specials = special_tokens(family)
    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=FAMILY_BOS.get(family),
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=dict(FAMILY_SPECIAL_TOKENS[family]) or None,
        chat_template=_chat_template(family),
        model_max_length=2048,
        padding_side="right",
    )


def make_tokenizer(family: str) -> PreTrainedTokenizerFast:
    """A fresh copy of the tiny tokenizer for ``family`` (the trained original is cached and never handed out)."""
    return copy.deepcopy(_build(family))
