"""Every ``mm-trainer`` command on hostile input: exit code 2 with one line on stderr that says why, never a traceback
(exit 1 is ``audit``'s "dead adapters found"); and ``mm-trainer audit`` on incomplete or non-finite adapters."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

from mm_trainer.cli.main import main
from tests.kit import tiny_config, tiny_model

LORA_CONFIG = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
DEEP = "[" * 200_000 + "]" * 200_000  # valid JSON that Python's parser cannot nest
HUGE = 300 * 2**20  # bytes of a sparse file: larger than any limit, written instantly


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PICKLE_RAN",))


def _sparse(path: Path, size: int = HUGE) -> None:
    with open(path, "wb") as f:
        f.truncate(size)


def _loop(path: Path) -> None:
    os.symlink(path, path)  # a link to itself: stat() fails with ELOOP


def _valid_adapter(path: Path) -> Path:
    model = get_peft_model(tiny_model("causal_lm"), LoraConfig(r=4, target_modules=["q_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(0.01)
    model.save_pretrained(path)
    return path


def _audit_case(tmp: Path, case: str) -> list[str]:
    path = tmp / "adapter"
    if case == "missing_dir":
        return [str(path)]
    if case == "symlink_loop_dir":
        _loop(path)
        return [str(path)]
    path.mkdir()
    config, weights = path / "adapter_config.json", path / "adapter_model.safetensors"
    if case == "config_wrong_type":
        config.write_text(json.dumps([LORA_CONFIG]))
    elif case == "config_deeply_nested":
        config.write_text(DEEP)
    elif case == "config_huge":
        _sparse(config)
    elif case == "config_symlink_loop":
        _loop(config)
    elif case == "config_not_utf8":
        config.write_bytes(b"\xff\xfe{\x00")
    else:
        config.write_text(json.dumps(LORA_CONFIG))
    if case == "weights_pickle":
        torch.save({"x": _Payload()}, path / "adapter_model.bin")  # torch.save pickles the payload
    elif case == "weights_wrong_type_bin":
        torch.save([torch.zeros(2)], path / "adapter_model.bin")
    elif case == "weights_huge_header":
        weights.write_bytes((2**62).to_bytes(8, "little") + b"{}")
    elif case == "weights_truncated":
        save_file({"q_proj.lora_A.weight": torch.ones(4, 8)}, str(weights))
        weights.write_bytes(weights.read_bytes()[:-7])
    elif case == "weights_symlink_loop":
        _loop(weights)
    elif case == "weights_dir":
        weights.mkdir()
    return [str(path)]


AUDIT_CASES = [
    ("missing_dir", "does not exist"),
    ("symlink_loop_dir", "looping symbolic link"),
    ("config_wrong_type", "does not hold a JSON object"),
    ("config_deeply_nested", "nested too deeply"),
    ("config_huge", "too large"),
    ("config_symlink_loop", "adapter_config.json"),
    ("config_not_utf8", "not readable JSON"),
    ("weights_pickle", "cannot be read"),
    ("weights_wrong_type_bin", "not a map of tensor names"),
    ("weights_huge_header", "cannot be read"),
    ("weights_truncated", "cannot be read"),
    ("weights_symlink_loop", "no adapter_model.safetensors"),
    ("weights_dir", "no adapter_model.safetensors"),
]


def _plan_case(tmp: Path, case: str) -> list[str]:
    folder = tmp / "model"
    if case == "missing_local_dir":
        return [str(folder / "no" / "such")]
    if case == "symlink_loop":
        _loop(folder)
        return [str(folder)]
    tiny_config("qwen2_5_vl").save_pretrained(folder)
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    if case == "zero_heads":
        config["text_config"]["num_attention_heads"] = 0
    elif case == "negative_layers":
        config["text_config"]["num_hidden_layers"] = -3
    elif case == "heads_wrong_type":
        config["text_config"]["num_attention_heads"] = "many"
    elif case == "config_list":
        config = [config]
    config_file.write_text(json.dumps(config))
    if case == "deeply_nested":
        config_file.write_text(DEEP)
    elif case == "huge":
        _sparse(config_file)
    return [str(folder)]


PLAN_CASES = [
    ("missing_local_dir", "does not exist (neither a local directory nor a Hub id)"),
    ("symlink_loop", "does not exist"),
    ("zero_heads", "mm-trainer plan:"),
    ("negative_layers", "mm-trainer plan:"),
    ("heads_wrong_type", "mm-trainer plan:"),
    ("config_list", "mm-trainer plan:"),
    ("deeply_nested", "mm-trainer plan:"),
    ("huge", "too large"),
]

GOOD_AUDIT = {
    "kind": "training",
    "verdict": "pass",
    "global_step": 2,
    "params": {"effective_trainable": 10, "nominal_trainable": 10},
    "dynamics": {"series": {"loss": [[1, 2.0], [2, 1.5]], "grad_norm": [[1, 0.5], [2, 0.7]]}, "spikes": []},
}


def _compare_case(tmp: Path, case: str) -> list[str]:
    run = tmp / "run"
    if case == "missing_dir":
        return [str(run)]
    run.mkdir()
    file = run / "audit.json"
    audit: object = json.loads(json.dumps(GOOD_AUDIT))
    if case == "audit_list":
        audit = [GOOD_AUDIT]
    elif case == "dynamics_string":
        audit["dynamics"] = "fast"
    elif case == "series_not_object":
        audit["dynamics"]["series"] = [1, 2]
    elif case == "point_wrong_shape":
        audit["dynamics"]["series"]["loss"] = [[1]]
    elif case == "point_wrong_type":
        audit["dynamics"]["series"]["grad_norm"] = [["one", {}]]
    elif case == "params_wrong_type":
        audit["params"] = 7
    elif case == "training_wrong_type":
        audit["training"] = "qlora"
    file.write_text(json.dumps(audit))
    if case == "deeply_nested":
        file.write_text(DEEP)
    elif case == "huge":
        _sparse(file)
    elif case == "symlink_loop":
        file.unlink()
        _loop(file)
    elif case == "not_json":
        file.write_bytes(pickle.dumps(_Payload()))
    if case == "out_missing_folder":
        return [str(run), "--out", str(tmp / "no" / "such" / "cmp.png")]
    if case == "out_is_dir":
        return [str(run), "--out", str(tmp)]
    return [str(run), "--out", str(tmp / "cmp.png")]


COMPARE_CASES = [
    ("missing_dir", "not a directory"),
    ("audit_list", "not an audit object"),
    ("dynamics_string", "`dynamics` is a str"),
    ("series_not_object", "dynamics.series is a list"),
    ("point_wrong_shape", "not [step, value]"),
    ("point_wrong_type", "not [step, value]"),
    ("params_wrong_type", "`params` is a int"),
    ("training_wrong_type", "`training` is a str"),
    ("deeply_nested", "unreadable"),
    ("huge", "too large"),
    ("symlink_loop", "no audit.json"),
    ("not_json", "unreadable"),
    ("out_missing_folder", "does not exist"),
    ("out_is_dir", "is a directory"),
]


def _check_unusable(argv: list[str], command: str, message: str, capsys) -> None:
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"mm-trainer {command}: ") and message in lines[0], lines[0]
    assert "Traceback" not in captured.err + captured.out


@pytest.mark.parametrize(("case", "message"), AUDIT_CASES, ids=[c for c, _ in AUDIT_CASES])
def test_audit_hostile_input_exits_2(tmp_path, monkeypatch, capsys, case, message):
    monkeypatch.chdir(tmp_path)
    _check_unusable(["audit", *_audit_case(tmp_path, case)], "audit", message, capsys)
    assert not (tmp_path / "PICKLE_RAN").exists()


@pytest.mark.parametrize(("case", "message"), PLAN_CASES, ids=[c for c, _ in PLAN_CASES])
def test_plan_hostile_input_exits_2(tmp_path, capsys, case, message):
    _check_unusable(["plan", *_plan_case(tmp_path, case)], "plan", message, capsys)


@pytest.mark.parametrize(("case", "message"), COMPARE_CASES, ids=[c for c, _ in COMPARE_CASES])
def test_compare_hostile_input_exits_2(tmp_path, monkeypatch, capsys, case, message):
    monkeypatch.chdir(tmp_path)
    _check_unusable(["compare", *_compare_case(tmp_path, case)], "compare", message, capsys)
    assert not (tmp_path / "PICKLE_RAN").exists()


def test_compare_accepts_the_good_audit_of_the_hostile_table(tmp_path, capsys):
    # The table's cases differ from this valid audit in one thing each.
    assert main(["compare", *_compare_case(tmp_path, "valid"), "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["runs"][0]
    assert row["final_loss"] == 1.5 and row["peak_grad_norm"] == 0.7


def test_console_script_gives_one_line_and_no_traceback(tmp_path):
    # Through the real entry point, in its own process: what a CI script sees.
    folder = tmp_path / "model"
    _plan_case(tmp_path, "zero_heads")
    proc = subprocess.run(
        [sys.executable, "-m", "mm_trainer.cli.main", "plan", str(folder)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------------------------------
# Incomplete, non-finite and overflowing adapters; audit.json beside them
# ---------------------------------------------------------------------------------------------------------------------
def _rewrite(path: Path, change) -> None:
    tensors = load_file(str(path / "adapter_model.safetensors"))
    save_file(change(tensors), str(path / "adapter_model.safetensors"))


def test_adapter_without_b_is_missing_and_dead(tmp_path, capsys):
    path = _valid_adapter(tmp_path)
    assert main(["audit", str(path)]) == 0
    capsys.readouterr()
    _rewrite(path, lambda t: {k: v for k, v in t.items() if "lora_B" not in k})
    assert main(["audit", str(path), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    layers = tiny_config("causal_lm").num_hidden_layers
    assert len(report["missing"]) == layers and report["dead"] == report["missing"]
    assert report["params"]["effective"] == 0 and not report["clean"]
    assert all("no lora_B" in m["reason"] for m in report["modules"])


def test_adapter_without_a_is_missing(tmp_path, capsys):
    path = _valid_adapter(tmp_path)
    first = sorted(load_file(str(path / "adapter_model.safetensors")))[0]  # one lora_A key
    assert "lora_A" in first
    _rewrite(path, lambda t: {k: v for k, v in t.items() if k != first})
    assert main(["audit", str(path), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    (missing,) = [m for m in report["modules"] if m["status"] == "missing"]
    assert report["missing"] == [missing["name"]] and missing["dead"] and "no lora_A" in missing["reason"]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_adapter_fails_naming_it(tmp_path, capsys, bad):
    path = _valid_adapter(tmp_path)
    key = next(k for k in sorted(load_file(str(path / "adapter_model.safetensors"))) if "lora_B" in k)
    _rewrite(path, lambda t: {k: (torch.full_like(v, bad) if k == key else v) for k, v in t.items()})
    assert main(["audit", str(path)]) == 1
    out = capsys.readouterr().out
    assert "NaN or infinity: 1" in out
    module = key.removeprefix("base_model.model.").split(".lora_B")[0]
    assert module in out


def test_huge_finite_weights_are_not_called_non_finite(tmp_path, capsys):
    # |B| = 1e30: finite, and its float32 squared norm would overflow; the float64 norm does not.
    path = _valid_adapter(tmp_path)
    _rewrite(path, lambda t: {k: (torch.full_like(v, 1e30) if "lora_B" in k else v) for k, v in t.items()})
    assert main(["audit", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["non_finite"] == []
    b = load_file(str(path / "adapter_model.safetensors"))
    numel = next(v.numel() for k, v in b.items() if "lora_B" in k)
    assert report["modules"][0]["norm_b"] == pytest.approx(1e30 * numel**0.5, rel=1e-6)


@pytest.mark.parametrize(
    ("content", "note"),
    [
        ('{"kind": "training", "modules": ', "not readable JSON"),
        ('{"kind": "training", "modules": [1, 2, 3]}', "no valid `modules` list"),
        (DEEP, "nested too deeply"),
        ("[1]", "not an mm-trainer training audit"),
    ],
    ids=["truncated", "modules_wrong_type", "deeply_nested", "not_an_audit"],
)
def test_unreadable_audit_json_is_reported_and_the_weights_decide(tmp_path, capsys, content, note):
    path = _valid_adapter(tmp_path)
    (path / "audit.json").write_text(content)
    assert main(["audit", str(path)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"note: {path / 'audit.json'}" in out and note in out
