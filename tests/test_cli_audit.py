"""``mm-trainer audit PATH`` on adapters saved without training: dead/trained/unverified from the files alone, and
exit code 2 with a message for every kind of unusable input."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model

from mm_trainer.audit.offline import audit_adapter_dir
from mm_trainer.cli.main import main
from tests.kit import tiny_model


def _save(tmp_path, lora: LoraConfig, touch=None, family="causal_lm"):
    model = get_peft_model(tiny_model(family), lora)
    if touch is not None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if touch(name):
                    p.add_(0.01)
    model.save_pretrained(tmp_path)
    return tmp_path


def test_untrained_adapter_is_all_dead(tmp_path, capsys):
    path = _save(tmp_path, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert main(["audit", str(path), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert len(report["dead"]) == 4 and report["params"]["effective"] == 0
    assert report["towers"]["language"]["dead"] == 4


def test_partly_trained_adapter_by_tower(tmp_path, capsys):
    # Only the language adapters' B moved: the vision ones are dead, named by tower from their paths alone.
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"])
    path = _save(tmp_path, lora, touch=lambda n: "lora_B" in n and "language_model" in n, family="qwen2_5_vl")
    report = audit_adapter_dir(path)
    assert sorted(report["dead"]) == ["model.visual.blocks.0.mlp.down_proj", "model.visual.blocks.1.mlp.down_proj"]
    assert set(report["towers"]) == {"language", "vision"}
    assert report["towers"]["vision"]["effective"] == 0
    assert report["towers"]["language"]["dead"] == 0
    assert main(["audit", str(path / "adapter_config.json")]) == 1  # a file in the folder works too
    assert "vision: model.visual.blocks.*.mlp.down_proj x2" in capsys.readouterr().out


def test_embedding_lora_is_dead_while_a_is_zero(tmp_path):
    # PEFT starts embedding LoRA with A = 0 (and B random): "B is still zero" would call it trained.
    lora = LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"], modules_to_save=["lm_head"])
    path = _save(tmp_path / "fresh", lora)
    report = audit_adapter_dir(path)
    assert "model.embed_tokens" in report["dead"]
    embed = tiny_model("causal_lm").get_input_embeddings().weight.numel()
    head = tiny_model("causal_lm").lm_head.weight.numel()
    # The embedding's base weight PEFT saves along is no trainable parameter; the lm_head copy is.
    assert report["params"]["saved_base"] == embed and report["params"]["other"] == head
    assert report["params"]["nominal"] == report["params"]["lora_nominal"] + head
    path = _save(tmp_path / "moved", LoraConfig(r=4, target_modules=["embed_tokens"]), touch=lambda n: "lora" in n)
    assert audit_adapter_dir(path)["clean"]


def test_non_zero_start_without_training_audit_is_unverified(tmp_path, capsys):
    path = _save(tmp_path, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa"))
    assert main(["audit", str(path)]) == 0
    out = capsys.readouterr().out
    assert "cannot be verified" in out and "no dead adapters" in out


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing", "does not exist"),
        ("empty", "no adapter_config.json"),
        ("checkpoints", "pass one of them"),
        ("ia3", "LoRA adapters only"),
        ("bad_json", "not readable JSON"),
        ("no_weights", "no adapter_model.safetensors"),
        ("corrupt", "cannot be read"),
        ("no_lora", "no LoRA tensors"),
    ],
)
def test_unusable_input_exits_2(tmp_path, capsys, setup, message):
    from safetensors.torch import save_file

    path = tmp_path / "adapter"
    if setup != "missing":
        path.mkdir()
    lora_config = json.dumps({"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]})
    if setup == "checkpoints":
        (path / "checkpoint-10").mkdir()
    elif setup == "ia3":
        (path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    elif setup == "bad_json":
        (path / "adapter_config.json").write_text("{not json")
    elif setup in ("no_weights", "corrupt", "no_lora"):
        (path / "adapter_config.json").write_text(lora_config)
        if setup == "corrupt":
            (path / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00garbage")
        elif setup == "no_lora":
            save_file({"lm_head.weight": torch.zeros(2, 2)}, str(path / "adapter_model.safetensors"))
    assert main(["audit", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mm-trainer audit: ") and message in err
