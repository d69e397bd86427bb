"""Resuming: which checkpoint ``resume_from_checkpoint=True`` takes, unfinished / corrupt / mismatched checkpoints
refused with the fix, and the start-up checks of the trainer's inputs."""

from __future__ import annotations

import json
import logging
import shutil
import warnings

import pytest
from datasets import Dataset
from peft import IA3Config, LoraConfig

from mm_trainer import MMSFTConfig, MMSFTTrainer
from mm_trainer.core.resume import CheckpointStateError, ResumeMismatchError, check_settings, read_state
from mm_trainer.utils.checkpoints import (
    COMPLETE_MARKER,
    IncompleteCheckpointError,
    checkpoint_problem,
    resolve_resume_checkpoint,
    write_complete_marker,
)
from tests.kit import image_text_dataset, make_processor, make_tokenizer, text_dataset, tiny_model, training_args

SUFFIXES = ["q_proj", "v_proj", "down_proj"]


# ---------------------------------------------------------------------------------------------------------------------
# Which checkpoint is complete (files only, no training)
# ---------------------------------------------------------------------------------------------------------------------
def _checkpoint(root, step, *, state=True, marker=True, extra=None):
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(b"x" * 10)
    if state:
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    for name, content in (extra or {}).items():
        (folder / name).write_text(content)
    if marker:
        write_complete_marker(folder, step)
    return folder


def test_true_takes_the_newest_complete_checkpoint_and_logs_what_it_skips(tmp_path, caplog):
    _checkpoint(tmp_path, 2)
    _checkpoint(tmp_path, 4)
    _checkpoint(tmp_path, 6, state=False, marker=False)  # killed before trainer_state.json
    truncated = _checkpoint(tmp_path, 8, marker=False)
    (truncated / "trainer_state.json").write_text('{"global_step": 8, "log_hist')  # killed mid-write
    with caplog.at_level(logging.WARNING, logger="mm_trainer"):
        assert resolve_resume_checkpoint(True, tmp_path) == tmp_path / "checkpoint-4"
    skipped = [r.getMessage() for r in caplog.records if "Skipping" in r.getMessage()]
    assert len(skipped) == 2 and "checkpoint-8" in skipped[0] and "checkpoint-6" in skipped[1]
    assert "no trainer_state.json" in skipped[1] and "unreadable" in skipped[0]


def test_a_named_unfinished_checkpoint_is_refused_with_the_last_complete_one(tmp_path):
    _checkpoint(tmp_path, 2)
    _checkpoint(tmp_path, 4, state=False, marker=False)
    with pytest.raises(IncompleteCheckpointError, match=r"checkpoint-4: it is unfinished.*resume from .*checkpoint-2"):
        resolve_resume_checkpoint(str(tmp_path / "checkpoint-4"), tmp_path)
    assert resolve_resume_checkpoint(str(tmp_path / "checkpoint-2"), tmp_path) == tmp_path / "checkpoint-2"


def test_a_marked_checkpoint_whose_files_changed_is_unfinished(tmp_path):
    folder = _checkpoint(tmp_path, 2, extra={"mm_trainer_state.json": "{}"})
    assert checkpoint_problem(folder) is None
    (folder / "mm_trainer_state.json").write_text("{ }")  # another size than the marker lists
    assert "mm_trainer_state.json has 3 bytes" in checkpoint_problem(folder)
    (folder / "mm_trainer_state.json").unlink()
    assert checkpoint_problem(folder) == "mm_trainer_state.json is missing"


def test_unmarked_checkpoints_of_plain_transformers_count_when_their_trainer_state_is_whole(tmp_path):
    # Plain TRL / older mm-trainer / a kill between the rotation and the marker: no marker, trainer_state.json whole.
    _checkpoint(tmp_path, 3, marker=False)
    assert resolve_resume_checkpoint(True, tmp_path) == tmp_path / "checkpoint-3"


def test_no_complete_checkpoint_says_so(tmp_path):
    _checkpoint(tmp_path, 2, state=False, marker=False)
    with pytest.raises(ValueError, match=r"No complete checkpoint .*1 unfinished: checkpoint-2.*fresh run"):
        resolve_resume_checkpoint(True, tmp_path)


# ---------------------------------------------------------------------------------------------------------------------
# mm_trainer_state.json: corrupt files named, with the fix
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("content", "detail"),
    [
        ('{"kept_targets": ["a"], "telemetry": {"hist', "JSONDecodeError"),
        ("", "JSONDecodeError"),
        ("[1, 2]", "a JSON list, not an object"),
        ('{"audit_init": "lost"}', "`audit_init` is a str"),
        ('{"telemetry": {"history": 5}}', "`telemetry.history` is a int"),
        ('{"audit_init": {"format": 1, "adapters": {"m": [{}]}}}', "not a map of [A, B] fingerprints"),
        ('{"kept_targets": [1, 2]}', "other than module names"),
        ("[" * 100_000 + "]" * 100_000, "RecursionError"),
    ],
    ids=["truncated", "empty", "list", "record_str", "history_int", "record_shape", "targets_int", "deep"],
)
def test_corrupt_state_file_is_named_with_the_fix(tmp_path, content, detail):
    (tmp_path / "mm_trainer_state.json").write_text(content)
    with pytest.raises(CheckpointStateError) as err:
        read_state(tmp_path)
    message = str(err.value)
    assert str(tmp_path / "mm_trainer_state.json") in message and detail in message
    assert "Resume from an earlier checkpoint, or start a fresh run" in message


def test_settings_mismatch_is_one_sentence_with_the_fix(tmp_path):
    saved = {"adapter": {"peft_type": "LORA", "r": 4, "lora_alpha": 8}, "imod": False, "quantization": None}
    check_settings(tmp_path, saved, json.loads(json.dumps(saved)))  # same: no error
    current = {"adapter": {"peft_type": "LORA", "r": 8, "lora_alpha": 8}, "imod": True, "quantization": None}
    with pytest.raises(ResumeMismatchError) as err:
        check_settings(tmp_path, saved, current)
    message = str(err.value)
    assert message.count(". ") == 0 and message.endswith("output_dir.")
    assert "checkpoint r=4, this run r=8" in message and "checkpoint without IMoD, this run with IMoD" in message
    assert "resume with the checkpoint's settings (r=4, without IMoD)" in message


# ---------------------------------------------------------------------------------------------------------------------
# With real trainers
# ---------------------------------------------------------------------------------------------------------------------
def _text_trainer(out, lora=None, **kw):
    return MMSFTTrainer(
        model=tiny_model("qwen2_5_vl"),
        args=training_args(out, **kw),
        train_dataset=text_dataset(12),
        processing_class=make_tokenizer("qwen2_5_vl"),
        peft_config=lora or LoraConfig(r=4, target_modules=SUFFIXES),
    )


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory):
    """A 2-step run saved at step 2 (its checkpoint is copied per test)."""
    out = tmp_path_factory.mktemp("ckpt")
    _text_trainer(out, max_steps=2, save_strategy="steps", save_steps=2).train()
    return out / "checkpoint-2"


def _copy(checkpointed, tmp_path):
    shutil.copytree(checkpointed, tmp_path / "checkpoint-2")
    return tmp_path / "checkpoint-2"


def test_resume_with_another_rank_is_refused_before_peft(checkpointed, tmp_path):
    _copy(checkpointed, tmp_path)
    other = _text_trainer(tmp_path, LoraConfig(r=8, target_modules=SUFFIXES), max_steps=3)
    with pytest.raises(ResumeMismatchError, match=r"checkpoint r=4, this run r=8.*\(r=4\)"):
        other.train(resume_from_checkpoint=True)


def test_resume_with_imod_switched_on_is_refused(tmp_path):
    def trainer(imod, steps, **kw):
        args = training_args(tmp_path, MMSFTConfig, imod=imod, gradient_checkpointing=False, max_length=None, **kw)
        return MMSFTTrainer(
            model=tiny_model("qwen2_5_vl"),
            args=args,
            train_dataset=image_text_dataset(8, family="qwen2_5_vl"),
            processing_class=make_processor("qwen2_5_vl"),
            peft_config=LoraConfig(r=4, target_modules=SUFFIXES),
        )

    trainer(False, 1, max_steps=1, save_strategy="steps", save_steps=1).train()
    # An older checkpoint without the recorded settings: IMoD off is read from its modality_balance entry.
    state_file = tmp_path / "checkpoint-1" / "mm_trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["run_settings"]
    state_file.write_text(json.dumps(state))
    write_complete_marker(tmp_path / "checkpoint-1", 1)
    with pytest.raises(ResumeMismatchError, match="checkpoint without IMoD, this run with IMoD"):
        trainer(True, 2, max_steps=2).train(resume_from_checkpoint=True)


def test_corrupt_state_on_resume_names_the_file(checkpointed, tmp_path):
    folder = _copy(checkpointed, tmp_path)
    state = json.loads((folder / "mm_trainer_state.json").read_text())
    name = next(iter(state["audit_init"]["adapters"]))
    state["audit_init"]["adapters"][name] = [{"digest": "x"}, {"digest": "y"}]  # fingerprints missing fields
    (folder / "mm_trainer_state.json").write_text(json.dumps(state))
    with pytest.raises(IncompleteCheckpointError, match="mm_trainer_state.json has"):  # the marker saw the change
        resolve_resume_checkpoint(str(folder), tmp_path)
    (folder / COMPLETE_MARKER).unlink()  # as in a checkpoint of an older mm-trainer: the state file itself is read
    trainer = _text_trainer(tmp_path, max_steps=3)
    with pytest.raises(CheckpointStateError, match=r"mm_trainer_state.json is unreadable \(TypeError"):
        trainer.train(resume_from_checkpoint=str(folder))


def test_partial_init_record_warns(checkpointed, tmp_path):
    folder = _copy(checkpointed, tmp_path)
    state = json.loads((folder / "mm_trainer_state.json").read_text())
    names = sorted(state["audit_init"]["adapters"])
    for name in names[:3]:
        del state["audit_init"]["adapters"][name]
    (folder / "mm_trainer_state.json").write_text(json.dumps(state))
    (folder / COMPLETE_MARKER).unlink()  # edited by hand: the unmarked checkpoint counts by its trainer_state.json
    trainer = _text_trainer(tmp_path, max_steps=3)
    trainer.train(resume_from_checkpoint=True)
    audit = trainer.auditor.report()
    partial = [r for r in audit["reasons"] if r["code"] == "init_record_partial"]
    assert audit["verdict"] == "warn" and len(partial) == 1
    assert f"covers {len(names) - 3} of {len(names)} adapters" in partial[0]["message"]


# ---------------------------------------------------------------------------------------------------------------------
# Start-up input checks
# ---------------------------------------------------------------------------------------------------------------------
def test_missing_model_path_is_named(tmp_path):
    missing = str(tmp_path / "does" / "not" / "exist")
    with pytest.raises(FileNotFoundError, match=r"does not exist \(neither a local directory nor a Hub id\)"):
        MMSFTTrainer(model=missing, args=training_args(tmp_path), train_dataset=text_dataset(4))


def test_dataset_without_a_text_column_is_refused_before_trl(tmp_path):
    data = Dataset.from_list([{"foo": f"bar {i}"} for i in range(4)])
    with pytest.raises(ValueError, match=r"columns are \['foo'\].*dataset_text_field.*formatting_func"):
        MMSFTTrainer(
            model=tiny_model("qwen2_5_vl"),
            args=training_args(tmp_path),
            train_dataset=data,
            processing_class=make_tokenizer("qwen2_5_vl"),
            peft_config=LoraConfig(r=4, target_modules=SUFFIXES),
        )
    # Named as the text field, the same column trains.
    trainer = MMSFTTrainer(
        model=tiny_model("qwen2_5_vl"),
        args=training_args(tmp_path, dataset_text_field="foo", max_steps=1),
        train_dataset=data,
        processing_class=make_tokenizer("qwen2_5_vl"),
        peft_config=LoraConfig(r=4, target_modules=SUFFIXES),
    )
    trainer.train()


def test_non_lora_method_is_announced_as_not_audited(tmp_path, capsys):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = _text_trainer(
            tmp_path, IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
        )
    assert trainer.auditor is None
    assert any("this IA3 run is NOT audited" in str(w.message) for w in caught)
    assert "target plan (IA3; parameter columns estimated as LoRA r=8)" in capsys.readouterr().out
