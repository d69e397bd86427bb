"""Text-only runs on a VLM given by path never materialize the unreached towers (issue 16).

Each test saves the kit's tiny Qwen2.5-VL to disk (``tests.kit.save_tiny``) and compares a path load against the same
checkpoint loaded in full (or given to the trainer as an instance, which loads everything and releases afterwards).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, PeftModel
from transformers import AutoConfig
from trl.trainer.utils import create_model_from_path

from mm_trainer import MMSFTTrainer
from mm_trainer.model.loading import device_map_without, load_without, plan_unloaded, single_device
from mm_trainer.model.model_class import meta_model
from mm_trainer.model.plan_report import PEAK_DTYPES
from mm_trainer.quant import bitsandbytes_available
from tests.kit import auto_model_class, image_text_dataset, make_processor, save_tiny, text_dataset, training_args

FAMILY = "qwen2_5_vl"
TOWER = "model.visual"


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return str(save_tiny(FAMILY, tmp_path_factory.mktemp("tiny") / FAMILY))


def _lora() -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")


def _tensors(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    return list(module.named_parameters()) + list(module.named_buffers())


def test_load_without_leaves_the_tower_on_meta_and_loads_the_rest_as_a_full_load(tiny_path):
    full = auto_model_class(FAMILY).from_pretrained(tiny_path)
    plan, reason = plan_unloaded(
        meta_model(AutoConfig.from_pretrained(tiny_path)), None, reached={"language"}, selected=set()
    )
    assert reason is None and plan.roots == [(TOWER, "vision")]

    model = load_without(create_model_from_path, tiny_path, {}, plan)

    tower_params = [p for n, p in model.named_parameters() if n.startswith(TOWER + ".")]
    assert tower_params and all(p.is_meta for p in tower_params)
    expected = full.state_dict()
    rest = {n: t for n, t in model.state_dict().items() if not n.startswith(TOWER + ".")}
    assert rest.keys() == {n for n in expected if not n.startswith(TOWER + ".")}
    for name, tensor in rest.items():
        assert tensor.device.type == "cpu" and torch.equal(tensor, expected[name]), name
    # Nothing of the disk placement is left: no accelerate hooks, no device map, no wrapped `.to`.
    assert not any(hasattr(m, "_hf_hook") for m in model.modules())
    assert not hasattr(model, "hf_device_map") and "to" not in model.__dict__


def test_device_map_covers_every_module_but_the_tower():
    meta = meta_model_from_kit()
    mapping = device_map_without(meta, [TOWER], "cpu")
    assert mapping[TOWER] == "disk" and "" not in mapping
    for name, _ in meta.named_parameters():
        owners = [k for k in mapping if name == k or name.startswith(k + ".")]
        assert len(owners) == 1, name
        assert (mapping[owners[0]] == "disk") == name.startswith(TOWER + ".")


def meta_model_from_kit():
    from tests.kit import tiny_config

    with torch.device("meta"):
        return auto_model_class(FAMILY).from_config(tiny_config(FAMILY))


def test_only_single_device_maps_leave_towers_out():
    assert single_device(None) == "cpu"
    assert single_device({"": "cpu"}) == "cpu"
    assert single_device({"model.language_model": 0, "lm_head": 1}) is None
    plan, reason = plan_unloaded(meta_model_from_kit(), {"a": 0, "b": 1}, reached={"language"}, selected=set())
    assert plan is None and "several devices" in reason
    plan, reason = plan_unloaded(meta_model_from_kit(), None, reached={"language", "vision"}, selected=set())
    assert plan is None and reason is None  # image data reaches the tower: nothing to leave out


def _trainer(model, out, **overrides):
    return MMSFTTrainer(
        model=model,
        args=training_args(out, **overrides),
        train_dataset=text_dataset(8),
        processing_class=make_processor(FAMILY),
        peft_config=_lora(),
    )


def test_path_load_ends_as_release_after_a_full_load(tiny_path, tmp_path):
    """A path skips the tower; an instance loads it and releases it. Everything after the load is the same."""
    by_path = _trainer(tiny_path, tmp_path / "path")
    instance = auto_model_class(FAMILY).from_pretrained(tiny_path)
    by_instance = _trainer(instance, tmp_path / "instance")
    del instance

    assert [r.to_dict() for r in by_path.released_towers] == [r.to_dict() for r in by_instance.released_towers]
    assert by_path.released_towers[0].params == sum(
        p.numel() for p in auto_model_class(FAMILY).from_pretrained(tiny_path).model.visual.parameters()
    )
    assert by_path.target_plan.tower_rows() == by_instance.target_plan.tower_rows()
    assert by_path.target_plan.kept() == by_instance.target_plan.kept()
    path_tower = by_path.model.get_base_model().model.visual
    instance_tower = by_instance.model.get_base_model().model.visual
    assert [(n, t.shape, t.dtype, t.device) for n, t in _tensors(path_tower)] == [
        (n, t.shape, t.dtype, t.device) for n, t in _tensors(instance_tower)
    ]
    assert all(t.numel() == 0 for _, t in _tensors(path_tower))

    by_path.train()
    by_instance.train()
    trained = {n: p for n, p in by_instance.model.named_parameters() if p.requires_grad}
    for name, param in by_path.model.named_parameters():
        if param.requires_grad:
            # Same weights, data, seed and float32 ops: the two runs compute the same numbers.
            torch.testing.assert_close(param, trained[name], rtol=0, atol=0)
    assert by_path.mm_state()["released_towers"] == by_instance.mm_state()["released_towers"]


def test_saved_adapter_loads_onto_the_full_model_with_the_same_logits(tiny_path, tmp_path):
    trainer = _trainer(tiny_path, tmp_path / "run")
    trainer.train()
    trainer.save_model(str(tmp_path / "adapter"))
    audit = json.loads((tmp_path / "adapter" / "audit.json").read_text())
    assert audit["verdict"] == "pass"

    full = PeftModel.from_pretrained(auto_model_class(FAMILY).from_pretrained(tiny_path), str(tmp_path / "adapter"))
    full.eval()
    trainer.model.eval()
    processor = make_processor(FAMILY)
    batch = processor.apply_chat_template(
        [text_dataset(2)[1]["messages"]], tokenize=True, return_dict=True, return_tensors="pt"
    )
    with torch.no_grad():
        ours = trainer.model(**batch).logits
        theirs = full(**batch).logits
    # float32 throughout, the same modules and weights on the text path: equal up to float32 rounding of |logits|~1.
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)

    # The full model still takes images, with the adapter on its language model.
    row = image_text_dataset(1, family=FAMILY)[0]
    inputs = processor.apply_chat_template(
        [row["messages"]], images=[row["images"]], tokenize=True, return_dict=True, return_tensors="pt"
    )
    with torch.no_grad():
        logits = full(**inputs).logits
    assert torch.isfinite(logits).all()


@pytest.mark.skipif(not bitsandbytes_available("cpu"), reason="bitsandbytes cannot quantize on this CPU")
@pytest.mark.parametrize("quantization", ["qlora", "loftq"])
def test_4bit_path_loads_leave_the_tower_out(tiny_path, tmp_path, quantization):
    skipped = _trainer(tiny_path, tmp_path / "skip", quantization=quantization, max_steps=1)
    loaded = _trainer(
        tiny_path, tmp_path / "keep", quantization=quantization, max_steps=1, free_unreached_towers=False
    )

    assert [r.path for r in skipped.released_towers] == [TOWER] and loaded.released_towers == []
    assert skipped.quantized_base.quantized == loaded.quantized_base.quantized  # the same 4-bit language linears
    assert skipped.quantized_base.spec == loaded.quantized_base.spec
    if quantization == "qlora":  # quantized at load: the load's CPU-offload switch does not outlive it
        assert skipped.model.get_base_model().config.quantization_config.llm_int8_enable_fp32_cpu_offload is False
    assert all(t.numel() == 0 for _, t in _tensors(skipped.model.get_base_model().model.visual))
    skipped.train()
    assert skipped.state.global_step == 1


def test_image_data_loads_the_tower(tiny_path, tmp_path):
    trainer = MMSFTTrainer(
        model=tiny_path,
        args=training_args(tmp_path, max_steps=1),
        train_dataset=image_text_dataset(4, family=FAMILY),
        processing_class=make_processor(FAMILY),
        peft_config=_lora(),
    )
    assert trainer.released_towers == []
    assert all(p.numel() > 0 for p in trainer.model.get_base_model().model.visual.parameters())


def test_an_instance_says_once_how_to_avoid_the_peak(tiny_path, tmp_path, caplog):
    import mm_trainer.core.planning as planning

    planning._PEAK_WARNED = False
    with caplog.at_level(logging.WARNING, logger="mm_trainer.core.planning"):
        for i in range(2):
            _trainer(auto_model_class(FAMILY).from_pretrained(tiny_path), tmp_path / str(i))
        _trainer(tiny_path, tmp_path / "path")
    notes = [r.getMessage() for r in caplog.records if "peak memory still held" in r.getMessage()]
    assert len(notes) == 1 and tiny_path in notes[0] and "path or Hub id" in notes[0]


def test_plan_reports_the_peak_parameter_memory_per_dtype(tiny_path):
    out = subprocess.run(
        [sys.executable, "-m", "mm_trainer.cli.main", "plan", tiny_path, "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    memory = json.loads(out.stdout)["param_memory"]
    full = auto_model_class(FAMILY).from_pretrained(tiny_path)
    total = sum(p.numel() for p in full.parameters())
    tower = sum(p.numel() for p in full.model.visual.parameters())
    assert memory["released_roots"] == [TOWER]
    for dtype, size in PEAK_DTYPES.items():
        assert memory["peak_bytes"][dtype] == {"full": total * size, "path_load": (total - tower) * size}
    table = subprocess.run(
        [sys.executable, "-m", "mm_trainer.cli.main", "plan", tiny_path], capture_output=True, text=True, check=True
    ).stdout
    assert table.count("note: a model instance") == 1
