"""The audit at save time on real tiny runs: statuses for every way an adapter can die, verdicts, checkpoints and
resume, model card, Hub push (network boundary replaced), serving-clean save, and a save that survives a failed audit.
"""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi
from huggingface_hub.utils import filter_repo_objects
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file
from trl import SFTConfig, SFTTrainer

from mm_trainer import MMSFTConfig, MMSFTTrainer
from mm_trainer.audit import AUDIT_ERROR, AuditFailedError
from mm_trainer.audit.card import CARD_BEGIN, CARD_END
from mm_trainer.cli.main import main
from mm_trainer.model.towers import map_towers
from tests.kit import (
    NO_GRADIENT_BY_DESIGN,
    image_text_dataset,
    make_processor,
    make_tokenizer,
    save_tiny,
    text_dataset,
    tiny_model,
    training_args,
)

SUFFIXES = ["q_proj", "v_proj", "down_proj"]
REPO_ROOT = Path(__file__).resolve().parents[1]


def _args(cls, out, **kw):
    return training_args(out, cls, **kw)


def _audit(path) -> dict:
    return json.loads((Path(path) / "audit.json").read_text())


def _by_status(audit) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for m in audit["modules"]:
        out.setdefault(m["status"], set()).add(m["name"])
    return out


def _lora_params(family: str, names, r: int = 4) -> int:
    """Independent reference: r * (in + out) per adapted linear, from the base model's tower map."""
    linears = map_towers(tiny_model(family)).linears
    return sum(linears[n].lora_params(r) for n in names)


def _vlm_text_trainer(tmp_path, trainer_cls=MMSFTTrainer, config_cls=MMSFTConfig, lora=None, **kw):
    return trainer_cls(
        model=tiny_model("qwen2_5_vl"),
        args=_args(config_cls, tmp_path, **kw),
        train_dataset=text_dataset(12),
        processing_class=make_tokenizer("qwen2_5_vl"),
        peft_config=lora or LoraConfig(r=4, target_modules=SUFFIXES),
    )


# ------------------------------------------------------------------------------------------------------------------
# The gradient-sink bug: SFTTrainer vs MMSFTTrainer
# ------------------------------------------------------------------------------------------------------------------
def test_sft_trainer_vision_sink_found_by_cli(tmp_path, capsys):
    trainer = _vlm_text_trainer(tmp_path / "sft", trainer_cls=SFTTrainer, config_cls=SFTConfig)
    trainer.train()
    trainer.save_model()
    capsys.readouterr()
    visual_down = sorted(
        n
        for n in map_towers(tiny_model("qwen2_5_vl")).linears
        if n.startswith("model.visual.blocks.") and n.endswith(".mlp.down_proj")
    )
    assert len(visual_down) == 2

    assert main(["audit", str(tmp_path / "sft")]) == 1
    text = capsys.readouterr().out
    assert "vision: model.visual.blocks.*.mlp.down_proj x2" in text
    assert all(n in text for n in visual_down)

    assert main(["audit", str(tmp_path / "sft"), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["source"] == "weights" and sorted(report["dead"]) == visual_down
    assert report["dead_groups"] == {"vision": [["model.visual.blocks.*.mlp.down_proj", 2]]}
    assert report["params"]["dead"] == _lora_params("qwen2_5_vl", visual_down)
    assert report["params"]["nominal"] - report["params"]["effective"] == report["params"]["dead"]

    # The console script as a user runs it: exit code 1 through the real entry point.
    proc = subprocess.run(
        [sys.executable, "-m", "mm_trainer.cli.main", "audit", str(tmp_path / "sft")],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 1, proc.stderr
    assert "model.visual.blocks.*.mlp.down_proj" in proc.stdout


def test_mm_trainer_same_setup_passes_with_default_settings(tmp_path, capsys):
    # Default MMSFTConfig (bf16 autocast, lr 2e-5, gradient checkpointing) apart from what CPU tests need.
    args = MMSFTConfig(output_dir=str(tmp_path), use_cpu=True, max_steps=3, report_to="none", disable_tqdm=True)
    trainer = MMSFTTrainer(
        model=tiny_model("qwen2_5_vl"),
        args=args,
        train_dataset=text_dataset(12),
        processing_class=make_tokenizer("qwen2_5_vl"),
        peft_config=LoraConfig(r=4, target_modules=SUFFIXES),
    )
    trainer.train()
    assert "mm-trainer audit: PASS - 6 of 6 adapters trained" in capsys.readouterr().out  # end-of-training summary
    trainer.save_model()
    audit = _audit(tmp_path)
    assert audit["verdict"] == "pass" and audit["reasons"] == []
    kept = trainer.target_plan.kept()
    assert _by_status(audit) == {"trained": set(kept)}
    params = audit["params"]
    assert params["effective_trainable"] == params["nominal_trainable"] == _lora_params("qwen2_5_vl", kept)
    assert params["nominal_trainable"] == sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    assert all(m["moved_b"] and m["b_zero_at_init"] and m["nonzero_steps"] == 3 for m in audit["modules"])
    capsys.readouterr()
    assert main(["audit", str(tmp_path)]) == 0
    assert "no dead adapters" in capsys.readouterr().out
    # Without the training audit the weights alone tell the same under the default init.
    (tmp_path / "audit.json").unlink()
    assert main(["audit", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["source"] == "weights"


# ------------------------------------------------------------------------------------------------------------------
# Statuses
# ------------------------------------------------------------------------------------------------------------------
def test_forced_vision_never_fires_tracked_without_telemetry_logs(tmp_path):
    trainer = _vlm_text_trainer(tmp_path, target_towers=["language", "vision"], tower_telemetry=False)
    trainer.train()
    assert not any(k.startswith(("grad_norm/", "active_adapters/")) for h in trainer.state.log_history for k in h)
    trainer.save_model()
    audit = _audit(tmp_path)
    visual = {n for n in trainer.target_plan.kept() if n.startswith("model.visual.")}
    assert len(visual) == 2
    statuses = _by_status(audit)
    assert statuses["never_fired"] == visual
    assert statuses["trained"] == set(trainer.target_plan.kept()) - visual
    assert audit["verdict"] == "warn"
    assert [r["code"] for r in audit["reasons"]] == ["dead_adapters"]
    for m in audit["modules"]:
        if m["name"] in visual:
            assert (m["fired"], m["nonzero_steps"], m["moved_a"], m["moved_b"]) == (False, 0, False, False)
    params = audit["params"]
    assert params["nominal_trainable"] - params["effective_trainable"] == _lora_params("qwen2_5_vl", visual)
    assert params["per_tower"]["vision"]["effective_trainable"] == 0
    # The dynamics still come from the (unlogged) telemetry.
    assert audit["dynamics"]["grad_norm"]["per_tower"]["vision"]["max"] == 0.0
    assert audit["dynamics"]["grad_norm"]["per_tower"]["language"]["min"] > 0


def test_pissa_start_is_judged_by_movement_not_by_zero_b(tmp_path, capsys):
    lora = LoraConfig(r=4, target_modules=SUFFIXES, init_lora_weights="pissa")
    trainer = _vlm_text_trainer(tmp_path, lora=lora)
    trainer.train()
    trainer.save_model()
    audit = _audit(tmp_path)
    assert audit["verdict"] == "pass"
    assert _by_status(audit) == {"trained": set(trainer.target_plan.kept())}
    assert not any(m["b_zero_at_init"] for m in audit["modules"])  # the "B is still zero" rule cannot apply
    capsys.readouterr()
    assert main(["audit", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["source"] == "training_audit" and not report["dead"]
    # Without the training audit, a PiSSA adapter cannot be judged from its weights: unverified, not dead.
    (tmp_path / "audit.json").unlink()
    assert main(["audit", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert sorted(report["unverified"]) == sorted(trainer.target_plan.kept()) and not report["dead"]


def test_weight_decay_on_zero_gradient_module_is_decay_only(tmp_path):
    # Gemma3 with its zero-init image projection: vision adapters run and get zero-filled gradients; AdamW decays A.
    trainer = MMSFTTrainer(
        model=tiny_model("gemma3", open_connections=False),
        args=_args(MMSFTConfig, tmp_path, weight_decay=0.1, target_towers=["language", "vision"], max_length=None),
        train_dataset=image_text_dataset(8, family="gemma3"),
        processing_class=make_processor("gemma3"),
        peft_config=LoraConfig(r=4, target_modules="all-linear"),
    )
    trainer.train()
    trainer.save_model()
    audit = _audit(tmp_path)
    vision = {a.name for a in trainer.adapters if a.tower == "vision"}
    assert vision and _by_status(audit)["decay_only"] == vision
    for m in audit["modules"]:
        if m["name"] in vision:
            assert m["fired"] and m["nonzero_steps"] == 0 and m["moved_a"] and not m["moved_b"]
            assert m["norm_a"] < m["norm_a_init"]  # decayed towards zero
    assert audit["verdict"] == "warn" and "decay_only" in [r["code"] for r in audit["reasons"]]


def test_module_outside_the_loss_graph_is_zero_grad_even_with_weight_decay(tmp_path):
    # LLaVA reads CLIP's second-to-last layer: the last one runs, its grad stays None, AdamW never touches it.
    trainer = MMSFTTrainer(
        model=tiny_model("llava"),
        args=_args(MMSFTConfig, tmp_path, weight_decay=0.1, dead_targets="warn", max_length=None),
        train_dataset=image_text_dataset(8, family="llava"),
        processing_class=make_processor("llava"),
        peft_config=LoraConfig(r=4, target_modules="all-linear"),
    )
    trainer.train()
    trainer.save_model()
    audit = _audit(tmp_path)
    unused = {a.name for a in trainer.adapters if a.name.startswith(NO_GRADIENT_BY_DESIGN["llava"][0] + ".")}
    assert len(unused) == 6
    statuses = _by_status(audit)
    assert statuses["zero_grad"] == unused
    assert statuses["trained"] == {a.name for a in trainer.adapters} - unused
    for m in audit["modules"]:
        if m["name"] in unused:
            assert m["fired"] and not m["moved_a"] and not m["moved_b"]


# ------------------------------------------------------------------------------------------------------------------
# Checkpoints and resume
# ------------------------------------------------------------------------------------------------------------------
def test_checkpoints_carry_the_audit_and_resume_keeps_the_init_record(tmp_path):
    def make(max_steps, seed):
        return _vlm_text_trainer(
            tmp_path,
            target_towers=["language", "vision"],
            max_steps=max_steps,
            seed=seed,
            save_strategy="steps",
            save_steps=2,
        )

    make(2, seed=7).train()
    ckpt = tmp_path / "checkpoint-2"
    for name in ("audit.json", "AUDIT.md", "audit_loss.png", "audit_grad_norm.png", "adapter_model.safetensors"):
        assert (ckpt / name).is_file(), name
    assert _audit(ckpt)["global_step"] == 2

    # Another seed gives other fresh adapters: only the restored record can still see that vision never moved.
    second = make(4, seed=123)
    second.train(resume_from_checkpoint=True)
    audit = _audit(tmp_path / "checkpoint-4")
    assert audit["init_record"]["restored_on_resume"] is True
    visual = [m for m in audit["modules"] if m["tower"] == "vision"]
    assert visual and all(m["status"] == "never_fired" and not m["moved_a"] for m in visual)
    assert all(m["nonzero_steps"] == 4 for m in audit["modules"] if m["tower"] == "language")

    # A checkpoint without the record: statuses fall back on gradient counts, and the audit says so.
    (tmp_path / "checkpoint-4" / "mm_trainer_state.json").unlink()
    (tmp_path / "checkpoint-4" / "mm_trainer_complete.json").unlink()  # as an older mm-trainer wrote it: no marker
    third = make(6, seed=7)
    third.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    audit = _audit(tmp_path / "checkpoint-6")
    assert "init_record_lost" in [r["code"] for r in audit["reasons"]]
    assert {m["status"] for m in audit["modules"] if m["tower"] == "language"} == {"trained"}


# ------------------------------------------------------------------------------------------------------------------
# Model card and Hub push (network boundary replaced)
# ------------------------------------------------------------------------------------------------------------------
class _FakeHub:
    def __init__(self, monkeypatch):
        self.uploads: list[dict] = []
        self.repos: list[str] = []
        hub = self

        def create_repo(api, repo_id, **kw):
            hub.repos.append(repo_id)

            class Url(str):
                pass

            url = Url(f"https://hub.invalid/{repo_id}")
            url.repo_id = repo_id
            return url

        def upload_folder(api, *, repo_id, folder_path, ignore_patterns=None, allow_patterns=None, **kw):
            root = Path(folder_path)
            files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
            chosen = list(filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns))
            hub.uploads.append(
                {
                    "repo_id": repo_id,
                    "files": chosen,
                    "readme": (root / "README.md").read_text() if "README.md" in chosen else None,
                    "audit": json.loads((root / "audit.json").read_text()) if "audit.json" in chosen else None,
                }
            )
            if kw.get("run_as_future"):
                done: Future = Future()
                done.set_result(f"https://hub.invalid/{repo_id}/commit/0")
                return done
            return f"https://hub.invalid/{repo_id}/commit/0"

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "upload_folder", upload_folder)


def test_push_uploads_adapter_audit_and_card(tmp_path, monkeypatch):
    hub = _FakeHub(monkeypatch)
    trainer = _vlm_text_trainer(tmp_path, push_to_hub=True, hub_model_id="me/tiny-audited")
    trainer.train()
    trainer.push_to_hub()
    assert len(hub.uploads) == 1
    upload = hub.uploads[0]
    assert upload["repo_id"] == "me/tiny-audited"
    expected = {
        "adapter_config.json",
        "adapter_model.safetensors",
        "audit.json",
        "AUDIT.md",
        "audit_loss.png",
        "audit_grad_norm.png",
        "README.md",
    }
    assert expected <= set(upload["files"])
    assert not any(Path(f).name.startswith("_") for f in upload["files"])
    assert upload["audit"]["verdict"] == "pass"
    readme = upload["readme"]
    assert "trl" in readme and readme.count(CARD_BEGIN) == 1 and readme.count(CARD_END) == 1
    assert "**Verdict: pass**" in readme and "| language |" in readme


def test_push_refused_before_any_upload_when_verdict_fails(tmp_path, monkeypatch):
    hub = _FakeHub(monkeypatch)
    # learning_rate 0: every adapter gets gradients, none moves -> nothing trained -> fail.
    trainer = _vlm_text_trainer(tmp_path, push_to_hub=True, hub_model_id="me/tiny-dead", learning_rate=0.0)
    trainer.train()
    repos_before = list(hub.repos)
    with pytest.raises(AuditFailedError, match="nothing was uploaded") as err:
        trainer.push_to_hub()
    assert "audit_block_failed_push=False" in str(err.value)
    assert hub.uploads == [] and hub.repos == repos_before
    # The run is kept locally: adapter, audit with the reasons, card.
    audit = _audit(tmp_path)
    assert audit["verdict"] == "fail" and audit["reasons"][0]["code"] == "nothing_trained"
    assert _by_status(audit) == {"zero_grad": set(trainer.target_plan.kept())}
    assert load_file(tmp_path / "adapter_model.safetensors")
    # save_model with push_to_hub=True saves, then refuses the push it would do.
    with pytest.raises(AuditFailedError):
        trainer.save_model(str(tmp_path / "final"))
    assert (tmp_path / "final" / "adapter_model.safetensors").is_file() and hub.uploads == []
    # The switch lets it through.
    trainer.args.audit_block_failed_push = False
    trainer.push_to_hub()
    assert len(hub.uploads) == 1 and hub.uploads[0]["audit"]["verdict"] == "fail"


def test_checkpoint_pushes_carry_the_audit_and_skip_failed_ones(tmp_path, monkeypatch):
    hub = _FakeHub(monkeypatch)
    common = dict(push_to_hub=True, hub_strategy="every_save", save_strategy="steps", save_steps=2, max_steps=2)
    _vlm_text_trainer(tmp_path / "ok", hub_model_id="me/ok", **common).train()
    assert [u["repo_id"] for u in hub.uploads] == ["me/ok"]
    assert {"audit.json", "AUDIT.md", "adapter_model.safetensors"} <= set(hub.uploads[0]["files"])
    assert hub.uploads[0]["audit"]["global_step"] == 2 and CARD_BEGIN in hub.uploads[0]["readme"]

    with pytest.warns(RuntimeWarning, match='checkpoint-2 is "fail": its push to the Hub is skipped'):
        _vlm_text_trainer(tmp_path / "dead", hub_model_id="me/dead", learning_rate=0.0, **common).train()
    assert [u["repo_id"] for u in hub.uploads] == ["me/ok"]
    assert _audit(tmp_path / "dead" / "checkpoint-2")["verdict"] == "fail"


# ------------------------------------------------------------------------------------------------------------------
# Failure while auditing; serving-clean save; 4-bit counts
# ------------------------------------------------------------------------------------------------------------------
def test_save_survives_a_failing_audit(tmp_path, monkeypatch):
    trainer = _vlm_text_trainer(tmp_path)
    trainer.train()
    out = tmp_path / "final"
    trainer.save_model(str(out))
    assert (out / "audit.json").is_file()

    def boom(*args, **kwargs):
        raise RuntimeError("injected audit failure")

    monkeypatch.setattr("mm_trainer.audit.auditor.build_audit", boom)
    trainer.auditor._cache = None
    with pytest.warns(RuntimeWarning, match="could not write the audit"):
        trainer.save_model(str(out))
    assert "injected audit failure" in (out / AUDIT_ERROR).read_text()
    assert not (out / "audit.json").exists() and not (out / "AUDIT.md").exists()  # no stale audit left behind
    assert "The audit could not be built" in (out / "README.md").read_text()
    loaded = PeftModel.from_pretrained(tiny_model("qwen2_5_vl"), out)
    saved = load_file(out / "adapter_model.safetensors")
    assert saved and all(
        torch.equal(v, loaded.state_dict()[k.replace(".weight", ".default.weight")]) for k, v in saved.items()
    )


def test_serving_clean_save_strips_never_trained_adapters(tmp_path):
    trainer = _vlm_text_trainer(tmp_path, target_towers=["language", "vision"], serving_clean_save=True, save_steps=3)
    trainer.train()
    out = tmp_path / "final"
    trainer.save_model(str(out))
    audit = _audit(out)
    trained = sorted(m["name"] for m in audit["modules"] if m["status"] == "trained")
    assert audit["serving_clean"]["stripped"] == [
        "model.visual.blocks.0.mlp.down_proj",
        "model.visual.blocks.1.mlp.down_proj",
    ]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_modules"] == trained
    keys = load_file(out / "adapter_model.safetensors").keys()
    assert keys and not [k for k in keys if ".visual." in k]

    tok = make_tokenizer("qwen2_5_vl")
    batch = tok(["What is 2 + 3?", "What is 9 + 9? It is"], return_tensors="pt", padding=True)
    trainer.model.eval()
    with torch.no_grad():
        before = trainer.model(**batch).logits
    loaded = PeftModel.from_pretrained(tiny_model("qwen2_5_vl"), out)
    report = loaded.load_adapter(out, adapter_name="check")
    assert not report.missing_keys and not report.unexpected_keys
    assert not any("visual" in n and "lora_A" in n for n, _ in loaded.named_modules())
    loaded.set_adapter("default")
    with torch.no_grad():
        after = loaded(**batch).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)


def test_4bit_base_counted_unpacked(tmp_path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    path = save_tiny("causal_lm", tmp_path / "model")
    model = AutoModelForCausalLM.from_pretrained(
        path,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32),
        device_map="cpu",
    )
    trainer = MMSFTTrainer(
        model=model,
        args=_args(MMSFTConfig, tmp_path / "out", gradient_checkpointing=False),
        train_dataset=text_dataset(12),
        processing_class=make_tokenizer("causal_lm"),
        peft_config=LoraConfig(r=4, target_modules=SUFFIXES, modules_to_save=["lm_head"]),
    )
    trainer.train()
    trainer.save_model()
    audit = _audit(tmp_path / "out")
    assert audit["verdict"] == "pass"
    # The full lm_head copy PEFT trains counts as trainable, in the output tower, and it moved.
    params = audit["params"]
    head = tiny_model("causal_lm").lm_head.weight.numel()
    assert params["other_trainable"] == [
        {"name": "lm_head.modules_to_save.default.weight", "tower": "output", "params": head, "moved": True}
    ]
    assert params["nominal_trainable"] == params["effective_trainable"] == params["lora_nominal"] + head
    assert params["nominal_trainable"] == sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    reference = tiny_model("causal_lm")
    quantized = sum(
        m.weight.numel() for n, m in reference.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"
    )
    language = audit["params"]["per_tower"]["language"]
    assert language["base_params_4bit"] == quantized
    full = sum(p.numel() for n, p in reference.named_parameters() if not n.startswith("lm_head"))
    assert language["base_params"] == full
