"""The probe on image batches of real tiny VLMs, against an independent reference: nudge one module's output and see
whether the loss moves (finite differences, no autograd). Includes models whose zero-initialised connections leave
modules that fire but get an exactly-zero gradient (Gemma3's image projection, Mllama's cross-attention gates)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mm_trainer.model.probe import probe_reachability
from mm_trainer.training.sft_probe_batch import build_probe_batch
from tests.kit import image_text_dataset, make_processor, tiny_model


def _loss(model: nn.Module, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).loss


def moved_by_a_nudge(model: nn.Module, batch, names: list[str]) -> dict[str, bool]:
    """Per module: does adding a random nudge to its output change the loss at all? (Reached modules move it; a
    module whose output is unused or multiplied by an exact zero leaves it bit-identical.)"""
    base = _loss(model, batch)
    generator = torch.Generator().manual_seed(0)
    moved = {}
    for name in names:

        def nudge(_module, _inputs, output):
            noise = torch.randn(output.shape, generator=generator, dtype=output.dtype)
            return output + 0.5 * output.detach().abs().mean().clamp_min(1e-3) * noise

        handle = model.get_submodule(name).register_forward_hook(nudge)
        try:
            moved[name] = not torch.equal(_loss(model, batch), base)
        finally:
            handle.remove()
    return moved


CASES = [("llava", True), ("gemma3", True), ("gemma3", False), ("mllama", False)]


@pytest.mark.parametrize(
    ("family", "open_connections"), CASES, ids=[f"{f}-{'open' if o else 'zero-init'}" for f, o in CASES]
)
def test_image_probe_equals_the_finite_difference_reference(family, open_connections):
    model = tiny_model(family, open_connections=open_connections)
    batch = build_probe_batch(list(image_text_dataset(2, family=family)), make_processor(family))
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    result = probe_reachability(model, batch, names)
    reference = moved_by_a_nudge(model, batch, names)
    assert {n: result.status(n) == "reached" for n in names} == reference
    statuses = {result.status(n) for n in names}
    vision = [n for n in names if ".vision_" in n or ".visual." in n]
    assert any(reference[n] for n in vision) == open_connections
    if not open_connections:
        # Modules that ran on the image but whose gradient is exactly zero: the probe must not call them reached.
        assert "zero_grad" in statuses
