"""Video rows in the reachability probe, without a video processor.

No video processor can be built beside the CPU torch wheel (torchvision is absent), and decoding clips for a probe
is costly anyway. The probe only needs a batch that runs the vision tower the way a video does, so this builds one
directly from the model config, for models that take Qwen-style video input: `pixel_values_videos` (one row of
`channels x temporal_patch x patch x patch` values per patch, seeded random), `video_grid_thw` and, per video
row, the video placeholder tokens (one per merged patch) in front of the row's text tokens, marked `2` in
`mm_token_type_ids` where the model wants that mask.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .modality import row_modalities

GRID = (1, 2, 2)
"""Video grid of the probe clip, in merged patches (frames, height, width)."""


def video_inputs(config: Any) -> tuple[int, int, dict[str, Any]] | None:
    """`(video_token_id, tokens_per_clip, features)` for one probe clip of a model, or `None` when the config
    does not describe Qwen-style video input (a video placeholder id and a vision config with patch sizes)."""
    token_id = getattr(config, "video_token_id", None)
    if token_id is None:
        token_id = getattr(config, "video_token_index", None)
    vision = getattr(config, "vision_config", None)
    patch = getattr(vision, "patch_size", None)
    if not isinstance(token_id, int) or not isinstance(patch, int):
        return None
    temporal = int(getattr(vision, "temporal_patch_size", 1) or 1)
    merge = int(getattr(vision, "spatial_merge_size", 1) or 1)
    channels = int(getattr(vision, "in_channels", getattr(vision, "num_channels", 3)) or 3)
    t, h, w = GRID[0], GRID[1] * merge, GRID[2] * merge
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(t * h * w, channels * temporal * patch * patch, generator=generator)
    features = {"pixel_values_videos": pixels, "video_grid_thw": torch.tensor([[t, h, w]])}
    return token_id, t * h * w // (merge * merge), features


def add_video(batch: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], config: Any) -> dict[str, Any]:
    """`batch` (a text batch of `rows`) with one probe clip for each row that holds a video.

    Raises:
        NotImplementedError: The model config does not describe Qwen-style video input.
    """
    spec = video_inputs(config)
    if spec is None:
        raise NotImplementedError(
            f"Cannot build a video probe batch for {type(config).__name__}: its config names no video placeholder "
            "token and vision patch size. Set `target_probe=False` to map by structure only."
        )
    token_id, count, features = spec
    with_video = [i for i, row in enumerate(rows) if "video" in row_modalities(row)]
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    sequences, label_rows = [], []
    for i in range(ids.shape[0]):
        keep = mask[i].bool()
        prefix = torch.full((count if i in with_video else 0,), token_id, dtype=ids.dtype)
        sequences.append(torch.cat([prefix, ids[i][keep]]))
        label_rows.append(torch.cat([torch.full_like(prefix, -100), labels[i][keep]]))
    width = max(len(s) for s in sequences)
    pad = batch.get("pad_token_id", 0)
    out_ids = torch.full((len(sequences), width), int(pad), dtype=ids.dtype)
    out_mask = torch.zeros((len(sequences), width), dtype=mask.dtype)
    out_labels = torch.full((len(sequences), width), -100, dtype=labels.dtype)
    for i, (seq, lab) in enumerate(zip(sequences, label_rows)):
        out_ids[i, : len(seq)], out_mask[i, : len(seq)], out_labels[i, : len(seq)] = seq, 1, lab
    clips = len(with_video)
    result = {"input_ids": out_ids, "attention_mask": out_mask, "labels": out_labels}
    result["pixel_values_videos"] = features["pixel_values_videos"].repeat(clips, 1)
    result["video_grid_thw"] = features["video_grid_thw"].repeat(clips, 1)
    result["mm_token_type_ids"] = (out_ids == token_id).long() * 2  # 0 text, 1 image, 2 video (Qwen's rope index)
    return result
