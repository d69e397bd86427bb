"""4-bit: QLoRA with full-precision towers, LoftQ on the kept targets, EVA / PiSSA / OLoRA, on tiny VLMs on CPU."""

from __future__ import annotations

import json

import pytest
import torch
from peft import EvaConfig, LoraConfig, PeftModel
from torch import nn
from transformers import BitsAndBytesConfig

from mm_trainer import MMSFTConfig, MMSFTTrainer
from mm_trainer.model.towers import map_towers
from mm_trainer.quant import (
    LOFTQ_OFFSETS_FILE,
    QUANT_FILE,
    BitsAndBytesUnavailableError,
    Nf4Spec,
    import_utils,
    load_quantized_base,
    loftq_decompose,
    quantization_method,
    skip_modules,
)
from tests.kit import (
    auto_model_class,
    image_text_dataset,
    make_processor,
    make_tokenizer,
    mixed_dataset,
    save_tiny,
    text_dataset,
    tiny_model,
    training_args,
)

FAMILY = "qwen2_5_vl"
LANGUAGE = "model.language_model."


def _args(tmp_path, **kw) -> MMSFTConfig:
    return training_args(tmp_path, MMSFTConfig, **kw)


@pytest.fixture(scope="module")
def saved_vlm(tmp_path_factory):
    return save_tiny(FAMILY, tmp_path_factory.mktemp("tiny") / FAMILY)


def _probe_batch():
    tok = make_tokenizer(FAMILY)
    return tok(["What is 2 + 3?", "What is 9 + 9? It is"], return_tensors="pt", padding=True)


def _logits(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def _dequantized(layer) -> torch.Tensor:
    return Nf4Spec.dequantize(layer.weight.data, layer.weight.quant_state).float()


def _adapter_state(trainer) -> dict[str, torch.Tensor]:
    return {a.name: (a.lora_A.detach().clone(), a.lora_B.detach().clone()) for a in trainer.adapters}


def test_qlora_by_path_keeps_towers_trains_and_reloads(tmp_path, saved_vlm):
    trainer = MMSFTTrainer(
        model=str(saved_vlm),
        args=_args(tmp_path, quantization="qlora", free_unreached_towers=False),
        train_dataset=text_dataset(8),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
    )
    base = trainer.model.get_base_model()
    towers = trainer.tower_map
    for name, info in towers.linears.items():
        layer = base.get_submodule(name)
        layer = getattr(layer, "base_layer", layer)
        if info.tower == "language":
            assert type(layer).__name__ == "Linear4bit", name
            assert info.quantized
        else:  # vision, projector, lm_head stay full precision
            assert type(layer) is nn.Linear and layer.weight.dtype == torch.float32, name
            assert not info.quantized
    # The plan counts 4-bit layers at their unpacked size: the same numbers as for the full-precision model.
    fp_params = {i.name: i.params for i in map_towers(tiny_model(FAMILY)).linears.values()}
    assert {n: i.params for n, i in towers.linears.items()} == fp_params
    section = trainer.audit_sections["quantization"]()
    assert section["mode"] == "qlora" and section["method"] == "from_pretrained"
    assert section["skip_modules"] == ["model.visual", "lm_head"]
    assert section["quantized_modules"] == len(towers.linear_names("language")) == 14
    assert {r["tower"]: r["quantized"] for r in section["towers"]} == {
        "language": 14,
        "vision": 0,
        "projector": 0,
        "output": 0,
    }
    assert all(a.lora_A.dtype == torch.float32 for a in trainer.adapters)  # float32 compute keeps fp32 adapters

    packed_before = {n: base.get_submodule(n).base_layer.weight.data.clone() for n in trainer.target_plan.kept()}
    before = _adapter_state(trainer)
    trainer.train()
    for adapter in trainer.adapters:
        assert not torch.equal(adapter.lora_A, before[adapter.name][0]), adapter.name
        assert adapter.lora_B.abs().sum() > 0, adapter.name
    for name, packed in packed_before.items():
        assert torch.equal(base.get_submodule(name).base_layer.weight.data, packed)

    trainer.save_model(str(tmp_path / "final"))
    record = json.loads((tmp_path / "final" / QUANT_FILE).read_text())
    assert record["method"] == "from_pretrained" and record["spec"]["double_quant"] is True
    batch = _probe_batch()
    trained = _logits(trainer.model, batch)
    fresh = PeftModel.from_pretrained(load_quantized_base(str(saved_vlm), tmp_path / "final"), tmp_path / "final")
    torch.testing.assert_close(_logits(fresh, batch), trained, atol=1e-4, rtol=0)
    # The same base loaded by hand with transformers' own BitsAndBytesConfig gives the same logits too.
    by_hand = auto_model_class(FAMILY).from_pretrained(
        saved_vlm,
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
            llm_int8_skip_modules=["model.visual", "lm_head"],
        ),
        device_map=None,
    )
    from mm_trainer.quant import keep_4bit_layers_trainable

    keep_4bit_layers_trainable(by_hand)
    torch.testing.assert_close(
        _logits(PeftModel.from_pretrained(by_hand, tmp_path / "final"), batch), trained, atol=1e-4, rtol=0
    )


def test_loftq_on_cpu_beats_qlora_per_module_trains_and_reloads(tmp_path, saved_vlm):
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    trainer = MMSFTTrainer(
        model=str(saved_vlm),
        # vision is quantized too (only projector / lm_head skipped) to show LoftQ stays off unreached towers
        args=_args(
            tmp_path,
            quantization="loftq",
            loftq_iter=2,
            quant_skip_towers=["projector", "output"],
            free_unreached_towers=False,
        ),
        train_dataset=text_dataset(8),
        peft_config=peft_config,
    )
    quant = trainer.quantized_base
    kept = trainer.target_plan.kept()
    assert kept and all(n.startswith(LANGUAGE) for n in kept)
    assert sorted(quant.loftq) == sorted(kept)  # LoftQ on the kept targets only
    base = trainer.model.get_base_model()
    assert type(base.get_submodule("model.visual.blocks.0.attn.qkv")).__name__ == "Linear4bit"  # plain nf4
    assert type(base.get_submodule("model.visual.merger.mlp.0")) is nn.Linear

    reference = tiny_model(FAMILY)  # the full-precision weights the checkpoint holds
    spec = Nf4Spec(compute_dtype=torch.float32)
    for name in kept:
        result = quant.loftq[name]
        assert result.loftq_error < result.qlora_error, name
        W = reference.get_submodule(name).weight.detach()
        layer = base.get_submodule(name)
        Q = _dequantized(layer.base_layer)
        A, B, s = (
            layer.lora_A["default"].weight.detach(),
            layer.lora_B["default"].weight.detach(),
            layer.scaling["default"],
        )
        assert s == 2.0
        # The reported errors, recomputed from what the model holds: Q in the base layer, A and B in the adapter.
        assert torch.linalg.matrix_norm(W - Q - s * B @ A).item() == pytest.approx(result.loftq_error, rel=1e-5)
        packed, state = spec.quantize(W)
        assert torch.linalg.matrix_norm(W - spec.dequantize(packed, state)).item() == pytest.approx(
            result.qlora_error, rel=1e-6
        )
        # s*B@A is the best rank-r approximation of the 4-bit error of the very Q the base holds.
        U, S, Vh = torch.linalg.svd(W - Q, full_matrices=False)
        torch.testing.assert_close(s * B @ A, (U[:, :4] * S[:4]) @ Vh[:4], atol=1e-5, rtol=0)
        assert not torch.equal(Q, spec.dequantize(packed, state))  # two iterations moved Q away from nf4(W)
    for name in [n for n in trainer.tower_map.linear_names("language") if n not in kept]:
        packed, _ = spec.quantize(reference.get_submodule(name).weight.detach())
        assert torch.equal(base.get_submodule(name).weight.data, packed), name  # untargeted: plain nf4(W)
    section = trainer.audit_sections["quantization"]()
    assert [m["name"] for m in section["loftq"]["modules"]] == kept
    assert section["loftq"]["total"]["loftq_error"] < section["loftq"]["total"]["qlora_error"]

    before = _adapter_state(trainer)
    trainer.train()
    assert all(not torch.equal(a.lora_B, before[a.name][1]) for a in trainer.adapters)

    trainer.save_model(str(tmp_path / "final"))
    assert (tmp_path / "final" / LOFTQ_OFFSETS_FILE).is_file()
    batch = _probe_batch()
    trained = _logits(trainer.model, batch)
    rebuilt = load_quantized_base(str(saved_vlm), tmp_path / "final")
    for name in kept:
        assert torch.equal(rebuilt.get_submodule(name).weight.data, base.get_submodule(name).base_layer.weight.data)
    torch.testing.assert_close(
        _logits(PeftModel.from_pretrained(rebuilt, tmp_path / "final"), batch), trained, atol=1e-4, rtol=0
    )


def test_loftq_skips_layers_the_data_never_reaches(tmp_path):
    """Mllama's cross-attention layer never runs on text: the plan drops it, and LoftQ never touches it."""
    trainer = MMSFTTrainer(
        model=tiny_model("mllama"),
        args=_args(tmp_path, quantization="loftq", max_steps=1),
        train_dataset=text_dataset(4),
        processing_class=make_tokenizer("mllama"),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
    )
    loftq = set(trainer.quantized_base.loftq)
    assert loftq == set(trainer.target_plan.kept())
    assert loftq and not [n for n in loftq if ".layers.1." in n]  # layer 1 is the cross-attention layer
    assert type(trainer.model.get_base_model().get_submodule(f"{LANGUAGE}layers.1.cross_attn.q_proj")).__name__ == (
        "Linear4bit"
    )
    trainer.train()


def test_loftq_init_is_closer_to_full_precision_than_qlora(tmp_path):
    batch = _probe_batch()
    exact = _logits(tiny_model(FAMILY), batch)
    errors = {}
    for mode in ("qlora", "loftq"):
        trainer = MMSFTTrainer(
            model=tiny_model(FAMILY),
            args=_args(tmp_path / mode, quantization=mode, max_steps=1),
            train_dataset=text_dataset(4),
            processing_class=make_tokenizer(FAMILY),
            peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
        )
        assert trainer.quantized_base.method == "in_place"
        errors[mode] = (_logits(trainer.model, batch) - exact).norm().item()
    assert errors["loftq"] < errors["qlora"]


def test_loftq_decompose_reference_and_edge_cases():
    torch.manual_seed(0)
    weight = torch.randn(96, 64) * 0.05
    spec = Nf4Spec(compute_dtype=torch.float32)
    one = loftq_decompose(weight, rank=16, scaling=0.5, spec=spec, iters=1)
    packed, state = spec.quantize(weight)
    assert torch.equal(one.packed, packed) and one.offset_A is None  # one iteration: Q = nf4(W)
    assert one.loftq_error < one.qlora_error
    five = loftq_decompose(weight, rank=16, scaling=0.5, spec=spec, iters=5)
    assert five.qlora_error == one.qlora_error and five.loftq_error < one.qlora_error
    wide = loftq_decompose(weight[:8], rank=16, scaling=1.0, spec=spec)  # rank above min(out, in): zero-padded
    assert wide.lora_A.shape == (16, 64) and wide.lora_A[8:].abs().sum() == 0
    assert wide.loftq_error < 1e-5  # rank 8 = full rank of an 8 x 64 residual
    bf16 = loftq_decompose(weight, rank=16, scaling=0.5, spec=spec, adapter_dtype=torch.bfloat16)
    assert bf16.lora_A.dtype == torch.bfloat16 and bf16.loftq_error < bf16.qlora_error
    with pytest.raises(ValueError, match="at least one iteration"):
        loftq_decompose(weight, 4, 1.0, spec, iters=0)


def test_fp_model_instance_quantized_in_place_matches_bitsandbytes(tmp_path):
    model = tiny_model(FAMILY)
    weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    trainer = MMSFTTrainer(
        model=model,
        args=_args(tmp_path, quantization="qlora", max_steps=2),
        train_dataset=text_dataset(4),
        processing_class=make_tokenizer(FAMILY),
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
    )
    base = trainer.model.get_base_model()
    assert base.is_loaded_in_4bit and quantization_method(base) == "bnb-4bit"
    spec = Nf4Spec(compute_dtype=torch.float32)
    for name in trainer.tower_map.linear_names("language"):
        layer = base.get_submodule(name)
        layer = getattr(layer, "base_layer", layer)
        packed, state = spec.quantize(weights[name])
        assert torch.equal(layer.weight.data, packed), name
        assert torch.equal(_dequantized(layer), spec.dequantize(packed, state).float())
    assert type(base.get_submodule("lm_head")) is nn.Linear
    trainer.train()


def test_user_loaded_4bit_model_gets_same_targets_and_audit(tmp_path, saved_vlm):
    four_bit = auto_model_class(FAMILY).from_pretrained(
        saved_vlm,
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True
        ),
        device_map=None,
    )
    peft_config = LoraConfig(r=4, target_modules="all-linear")
    full = MMSFTTrainer(
        model=tiny_model(FAMILY),
        args=_args(tmp_path / "fp", max_steps=1),
        train_dataset=text_dataset(4),
        processing_class=make_tokenizer(FAMILY),
        peft_config=peft_config,
    )
    quantized = MMSFTTrainer(
        model=four_bit,
        args=_args(tmp_path / "q", quantization="qlora", max_steps=1),
        train_dataset=text_dataset(4),
        processing_class=make_tokenizer(FAMILY),
        peft_config=peft_config,
    )
    assert quantized.target_plan.kept() == full.target_plan.kept()
    assert quantized.target_plan.tower_rows() == full.target_plan.tower_rows()
    section = quantized.audit_sections["quantization"]()
    assert section["method"] == "from_pretrained" and section["quantized_modules"] == 14
    # The user's load quantized the vision tower too: reported as such (and warned about).
    assert {r["tower"]: r["quantized"] for r in section["towers"]}["vision"] == 10
    quantized.train()


def test_eva_on_text_only_vlm_initialises_language_adapters_only(tmp_path):
    trainer = MMSFTTrainer(
        model=tiny_model(FAMILY),
        args=_args(tmp_path, max_steps=2),
        train_dataset=text_dataset(12),
        processing_class=make_tokenizer(FAMILY),
        peft_config=LoraConfig(r=4, target_modules="all-linear", init_lora_weights="eva", eva_config=EvaConfig(rho=1)),
    )
    report = trainer.eva
    assert set(report.modules) == set(trainer.target_plan.kept()) == {a.name for a in trainer.adapters}
    assert all(n.startswith(LANGUAGE) for n in report.modules) and not report.standard_init
    assert trainer.audit_sections["eva"]()["modules"] == 14
    # Independent reference: the top principal direction of q_proj's inputs over the training tokens.
    name = f"{LANGUAGE}layers.0.self_attn.q_proj"
    adapter = next(a for a in trainer.adapters if a.name == name)
    inputs = []
    layer = trainer.model.get_base_model().get_submodule(name)
    handle = layer.register_forward_hook(lambda m, args, out: inputs.append(args[0].detach()))
    masks = []
    trainer.model.eval()
    with torch.no_grad(), trainer.model.disable_adapter():
        for batch in trainer.get_train_dataloader():
            masks.append(batch["attention_mask"].bool() & (batch["labels"] != -100))
            trainer.model(**{k: v for k, v in batch.items() if k != "labels"})
    handle.remove()
    X = torch.cat([x[m] for x, m in zip(inputs, masks)])
    X = X - X.mean(0)
    top = torch.linalg.svd(X, full_matrices=False).Vh[0]
    A = adapter.lora_A.detach()
    torch.testing.assert_close(A @ A.T, torch.eye(4), atol=1e-4, rtol=0)  # EVA's A: orthonormal components
    assert abs(torch.dot(A[0], top).item()) > 0.9
    assert all(a.lora_B.abs().sum() == 0 for a in trainer.adapters)
    trainer.train()
    assert all(a.lora_B.abs().sum() > 0 for a in trainer.adapters)


def test_eva_on_mixed_data_leaves_sometimes_reached_towers_to_standard_init(tmp_path):
    trainer = MMSFTTrainer(
        model=tiny_model(FAMILY),
        args=_args(tmp_path, max_steps=1, max_length=None),
        train_dataset=mixed_dataset(8, family=FAMILY),
        processing_class=make_processor(FAMILY),
        peft_config=LoraConfig(r=4, target_modules="all-linear", init_lora_weights="eva"),
    )
    kept_towers = {trainer.tower_map.tower_of(n) for n in trainer.target_plan.kept()}
    assert kept_towers == {"language", "vision", "projector"}
    assert {trainer.tower_map.tower_of(n) for n in trainer.eva.modules} == {"language"}
    assert {trainer.tower_map.tower_of(n) for n in trainer.eva.standard_init} == {"vision", "projector"}
    trainer.train()


def test_eva_on_image_only_data_includes_the_vision_tower(tmp_path):
    trainer = MMSFTTrainer(
        model=tiny_model(FAMILY),
        args=_args(tmp_path, max_steps=1, max_length=None),
        train_dataset=image_text_dataset(4, family=FAMILY),
        processing_class=make_processor(FAMILY),
        peft_config=LoraConfig(
            r=2, target_modules=["qkv", "q_proj"], init_lora_weights="eva", eva_config=EvaConfig(rho=1)
        ),
    )
    assert {trainer.tower_map.tower_of(n) for n in trainer.eva.modules} == {"language", "vision"}
    trainer.train()


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_pass_through(tmp_path, init):
    batch = _probe_batch()
    exact = _logits(tiny_model(FAMILY), batch)
    trainer = MMSFTTrainer(
        model=tiny_model(FAMILY),
        args=_args(tmp_path, max_steps=2),
        train_dataset=text_dataset(8),
        processing_class=make_tokenizer(FAMILY),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=init),
    )
    assert all(a.tower == "language" and a.lora_B.abs().sum() > 0 for a in trainer.adapters)  # B != 0 at start
    # PEFT rewrote the base weights (W - s*B@A) so that the model's function is unchanged at the start.
    torch.testing.assert_close(_logits(trainer.model, batch), exact, atol=1e-4, rtol=0)
    before = _adapter_state(trainer)
    trainer.train()
    assert all(not torch.equal(a.lora_B, before[a.name][1]) for a in trainer.adapters)


def test_olora_on_4bit_base_trains_and_pissa_is_refused(tmp_path):
    trainer = MMSFTTrainer(
        model=tiny_model(FAMILY),
        args=_args(tmp_path, quantization="qlora", max_steps=1),
        train_dataset=text_dataset(4),
        processing_class=make_tokenizer(FAMILY),
        peft_config=LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="olora"),
    )
    assert trainer.audit_sections["quantization"]()["init"] == "olora"
    trainer.train()
    with pytest.raises(ValueError, match="PiSSA.*cannot start from a 4-bit base"):
        MMSFTTrainer(
            model=tiny_model(FAMILY),
            args=_args(tmp_path, quantization="qlora"),
            train_dataset=text_dataset(4),
            processing_class=make_tokenizer(FAMILY),
            peft_config=LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa"),
        )


def test_skip_modules_cover_exactly_the_skipped_towers():
    tower_map = map_towers(tiny_model(FAMILY))
    assert skip_modules(tower_map, ["vision", "audio", "projector", "output"]) == ["model.visual", "lm_head"]
    assert skip_modules(tower_map, ["projector"]) == ["model.visual.merger"]
    assert skip_modules(tower_map, ["vision"]) == ["model.visual.blocks"]
    assert skip_modules(tower_map, []) == []
    llava = map_towers(tiny_model("llava"))
    assert skip_modules(llava, ["vision", "projector", "output"]) == [
        "model.vision_tower",
        "model.multi_modal_projector",
        "lm_head",
    ]


def test_unusable_bitsandbytes_is_a_clear_error(tmp_path, monkeypatch):
    def broken():
        raise ImportError("No module named 'bitsandbytes'")

    monkeypatch.setattr(import_utils, "_import_bitsandbytes", broken)
    with pytest.raises(BitsAndBytesUnavailableError, match=r'pip install "bitsandbytes>=0\.48".*CPU'):
        MMSFTTrainer(
            model=tiny_model(FAMILY),
            args=_args(tmp_path, quantization="qlora"),
            train_dataset=text_dataset(4),
            processing_class=make_tokenizer(FAMILY),
            peft_config=LoraConfig(r=4, target_modules=["q_proj"]),
        )
    monkeypatch.undo()
    import_utils._check_device.cache_clear()

    def no_backend(device_type):
        raise RuntimeError("no kernel registered for cpu")

    monkeypatch.setattr(import_utils, "_check_device", no_backend)
    with pytest.raises(BitsAndBytesUnavailableError, match="cannot quantize on cpu"):
        import_utils.require_bitsandbytes("cpu")


def test_model_quantized_another_way_is_refused(tmp_path, saved_vlm):
    eight_bit = auto_model_class(FAMILY).from_pretrained(
        saved_vlm, quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map=None
    )
    with pytest.raises(ValueError, match="already quantized with bnb-8bit"):
        MMSFTTrainer(
            model=eight_bit,
            args=_args(tmp_path, quantization="qlora"),
            train_dataset=text_dataset(4),
            processing_class=make_tokenizer(FAMILY),
            peft_config=LoraConfig(r=4, target_modules=["q_proj"]),
        )
    gptq_like = tiny_model(FAMILY)
    gptq_like.config.quantization_config = {"quant_method": "gptq", "bits": 4}
    with pytest.raises(ValueError, match="already quantized with gptq"):
        MMSFTTrainer(
            model=gptq_like,
            args=_args(tmp_path, quantization="loftq"),
            train_dataset=text_dataset(4),
            processing_class=make_tokenizer(FAMILY),
            peft_config=LoraConfig(r=4, target_modules=["q_proj"]),
        )

    class AffineQuantizedTensor(torch.Tensor):  # how a torchao-quantized weight looks without a config
        pass

    by_hand = tiny_model(FAMILY)
    q_proj = by_hand.get_submodule(f"{LANGUAGE}layers.0.self_attn.q_proj")
    q_proj.weight = nn.Parameter(q_proj.weight.detach().as_subclass(AffineQuantizedTensor))
    assert quantization_method(by_hand) == "AffineQuantizedTensor"
    assert quantization_method(tiny_model(FAMILY)) is None
    four_bit = auto_model_class(FAMILY).from_pretrained(
        saved_vlm, quantization_config=BitsAndBytesConfig(load_in_4bit=True), device_map=None
    )
    with pytest.raises(ValueError, match="loftq.* needs the full-precision weights"):
        MMSFTTrainer(
            model=four_bit,
            args=_args(tmp_path, quantization="loftq"),
            train_dataset=text_dataset(4),
            processing_class=make_tokenizer(FAMILY),
            peft_config=LoraConfig(r=4, target_modules=["q_proj"]),
        )


def test_conflicting_settings_are_clear_errors(tmp_path, saved_vlm):
    with pytest.raises(ValueError, match="the language tower is the one 4-bit quantizes"):
        _args(tmp_path, quantization="qlora", quant_skip_towers=["language", "vision"])
    with pytest.raises(ValueError, match="`quant_compute_dtype` must be"):
        _args(tmp_path, quantization="qlora", quant_compute_dtype="int4")
    assert _args(tmp_path, quant_skip_towers="vision,output").quant_skip_towers == ["vision", "output"]
    lora = LoraConfig(r=4, target_modules=["q_proj"])

    def refused(match: str, args: MMSFTConfig, **kwargs) -> None:
        with pytest.raises(ValueError, match=match):
            MMSFTTrainer(model=str(saved_vlm), args=args, train_dataset=text_dataset(4), **kwargs)

    qlora = _args(tmp_path, quantization="qlora")
    bnb = BitsAndBytesConfig(load_in_4bit=True)
    refused("builds the 4-bit config itself", qlora, peft_config=lora, quantization_config=bnb)
    refused("needs a `peft_config`", qlora)
    peft_loftq = LoraConfig(r=4, target_modules=["q_proj"])
    peft_loftq.init_lora_weights = "loftq"  # (LoraConfig itself wants scipy for it, absent here)
    refused("Set `MMSFTConfig\\(quantization='loftq'\\)` instead", _args(tmp_path), peft_config=peft_loftq)
    # Both LoftQs at once: refused, not silently switched to one (the user's config unchanged).
    loftq = _args(tmp_path, quantization="loftq")
    refused("Remove `init_lora_weights`", loftq, peft_config=peft_loftq)
    assert peft_loftq.init_lora_weights == "loftq"
    eva = LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="eva")
    refused("cannot be combined with `init_lora_weights='eva'`", loftq, peft_config=eva)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_qlora_and_loftq_on_cuda(tmp_path, saved_vlm):
    for mode in ("qlora", "loftq"):
        trainer = MMSFTTrainer(
            model=str(saved_vlm),
            args=_args(tmp_path / mode, use_cpu=False, quantization=mode, max_steps=2),
            train_dataset=text_dataset(8),
            peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
        )
        layer = trainer.model.get_base_model().get_submodule(f"{LANGUAGE}layers.0.self_attn.q_proj").base_layer
        assert type(layer).__name__ == "Linear4bit" and layer.weight.device.type == "cuda"
        if mode == "loftq":
            assert all(r.packed.device.type == "cuda" for r in trainer.quantized_base.loftq.values())
            assert all(r.loftq_error < r.qlora_error for r in trainer.quantized_base.loftq.values())
        trainer.train()
        trainer.save_model(str(tmp_path / mode / "final"))
        batch = {k: v.cuda() for k, v in _probe_batch().items()}
        rebuilt = load_quantized_base(str(saved_vlm), tmp_path / mode / "final", device_map="cuda")
        torch.testing.assert_close(
            _logits(PeftModel.from_pretrained(rebuilt, tmp_path / mode / "final"), batch),
            _logits(trainer.model, batch),
            atol=1e-4,
            rtol=0,
        )


def test_eva_on_4bit_base_keeps_fp32_components(tmp_path):
    trainer = MMSFTTrainer(
        model=tiny_model(FAMILY),
        args=_args(tmp_path, quantization="qlora", max_steps=1),
        train_dataset=text_dataset(8),
        processing_class=make_tokenizer(FAMILY),
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights="eva"),
    )
    assert set(trainer.eva.modules) == set(trainer.target_plan.kept())
    for adapter in trainer.adapters:
        assert type(adapter.module).__name__ == "Linear4bit" and adapter.lora_A.dtype == torch.float32
        rank = adapter.lora_A.shape[0]
        torch.testing.assert_close(adapter.lora_A @ adapter.lora_A.T, torch.eye(rank), atol=1e-5, rtol=0)
    assert sorted(trainer.audit_sections) == ["eva", "quantization"]
    trainer.train()


def test_in_place_4bit_model_state_is_pinned():
    """In-place quantization makes up no quantizer state: it sets ``is_loaded_in_4bit`` only, the attribute PEFT reads
    to wrap a ``Linear4bit`` with its 4-bit LoRA layer (merge through dequantization) instead of its plain
    ``lora.Linear``. Pinned both ways, so a PEFT release that stops reading it shows up here."""
    from peft import get_peft_model
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    from mm_trainer.quant.layers import mark_loaded_in_4bit, quantize_in_place

    names = [LANGUAGE + "layers.0.self_attn.q_proj", LANGUAGE + "layers.1.mlp.down_proj"]
    wrapped_as = {}
    for marked in (False, True):
        model = tiny_model(FAMILY)
        assert quantize_in_place(model, names, Nf4Spec()) == names
        if marked:
            mark_loaded_in_4bit(model)
        assert getattr(model, "hf_quantizer", None) is None and not getattr(model, "is_quantized", False)
        assert getattr(model.config, "quantization_config", None) is None
        assert getattr(model, "quantization_method", None) is None
        assert quantization_method(model) == "bnb-4bit"  # read from the layers
        peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=names))
        wrapped_as[marked] = {type(peft_model.base_model.model.get_submodule(n)) for n in names}
    assert wrapped_as == {False: {LoraLinear}, True: {LoraLinear4bit}}


def test_bitsandbytes_cpu_repacking_is_undone_and_switched_off():
    """The bitsandbytes behaviour ``keep_4bit_layers_trainable`` relies on: a ``Linear4bit`` run in eval mode without
    gradients on a CPU it deems AVX512-BF16-capable repacks its weight in place (``packing_format_for_cpu``);
    ``keep_4bit_layers_trainable`` restores the packed nf4 codes exactly and switches the repacking off. The block
    scales come back through bfloat16 (bitsandbytes' inverse), so the weight moves by at most bf16's rounding
    (2**-8 relative) under QLoRA's double quantization."""
    from mm_trainer.quant import keep_4bit_layers_trainable
    from mm_trainer.quant.layers import quantize_linear

    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    layer = quantize_linear(linear, Nf4Spec())  # nf4, double quantization, float32 compute
    packed = layer.weight.data.clone()
    weight = Nf4Spec.dequantize(packed, layer.weight.quant_state).clone()
    x = torch.randn(3, 64)
    layer.support_avx512bf16_for_cpu = True  # as bitsandbytes sets it on such a CPU
    layer.eval()
    with torch.no_grad():
        layer(x)
    assert layer.weight.quant_state.packing_format_for_cpu  # bitsandbytes repacked in place
    assert keep_4bit_layers_trainable(nn.Sequential(layer)) == 1
    assert layer.support_avx512bf16_for_cpu is False
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    assert torch.equal(layer.weight.data, packed)
    restored = Nf4Spec.dequantize(layer.weight.data, layer.weight.quant_state)
    torch.testing.assert_close(restored, weight, rtol=2**-8, atol=0)
    with torch.no_grad():
        out = layer(x)
    assert torch.equal(layer.weight.data, packed)  # not repacked again
    reference = x @ restored.T + linear.bias.detach()
    # float32 compute: only the summation order over 64 products differs from the reference matmul.
    bound = 64 * torch.finfo(torch.float32).eps * (x.abs() @ restored.abs().T + linear.bias.detach().abs())
    assert ((out - reference).abs() <= bound).all()


def test_loftq_quantizes_the_weight_minus_the_previous_adapter():
    """LoftQ's step t quantizes ``W - s * B_{t-1} @ A_{t-1}`` (the sign matters: ``+`` would chase the wrong residual);
    checked bit for bit against that target computed here, and against the rebuild from the saved offsets."""
    from mm_trainer.quant.loftq import rebuild_quantized

    torch.manual_seed(0)
    weight = torch.randn(48, 64) * 0.05
    spec, rank, scaling = Nf4Spec(), 4, 2.0
    one = loftq_decompose(weight, rank, scaling, spec, iters=1)
    two = loftq_decompose(weight, rank, scaling, spec, iters=2)
    assert torch.equal(two.offset_A, one.lora_A) and torch.equal(two.offset_B, one.lora_B)
    target = (weight.double() - scaling * (one.lora_B.double() @ one.lora_A.double())).float()
    expected, _ = spec.quantize(target)
    assert torch.equal(two.packed, expected)
    rebuilt, _ = rebuild_quantized(weight, spec, scaling, two.offset_B, two.offset_A)
    assert torch.equal(rebuilt, two.packed)
