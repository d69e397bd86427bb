"""The init record's "moved": an adapter moved when A or B differs from init, bit for bit, on a real PEFT model."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model

from mm_trainer.audit.record import InitRecord
from mm_trainer.model.adapters import lora_adapters
from mm_trainer.model.towers import map_towers
from tests.kit import tiny_model


def test_moved_when_a_or_b_changes_and_only_then():
    base = tiny_model("causal_lm")
    tower_map = map_towers(base)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    adapters = lora_adapters(model, tower_map)
    assert len(adapters) >= 3
    record = InitRecord(adapters)
    only_a, only_b, untouched = adapters[0], adapters[1], adapters[2]
    with torch.no_grad():
        # The smallest change float32 can make to one element of A (B = 0 at init keeps A's gradient at zero for a
        # step, but weight decay still moves A alone).
        only_a.lora_A.view(-1)[0] = torch.nextafter(only_a.lora_A.view(-1)[0], torch.tensor(float("inf")))
        only_b.lora_B.view(-1)[0] = 1e-30
    movement = record.compare(adapters)
    assert (movement[only_a.name].moved_a, movement[only_a.name].moved_b) == (True, False)
    assert (movement[only_b.name].moved_a, movement[only_b.name].moved_b) == (False, True)
    assert movement[only_a.name].moved and movement[only_b.name].moved
    assert not movement[untouched.name].moved
