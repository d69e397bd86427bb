"""``mm-trainer compare``: one PNG with a curve per run, a table whose numbers match the runs' own logs."""

from __future__ import annotations

import json
import math
import statistics

import pytest
from peft import LoraConfig

from mm_trainer import MMSFTTrainer
from mm_trainer.audit.compare import RunDirError, compare, draw, load_runs
from mm_trainer.cli.main import main
from tests.kit import make_tokenizer, text_dataset, tiny_model, training_args


def _train(tmp_path, name, init, steps, logging_steps):
    out = tmp_path / name
    trainer = MMSFTTrainer(
        model=tiny_model("qwen2_5_vl"),
        args=training_args(out, max_steps=steps, logging_steps=logging_steps, learning_rate=5e-3, seed=1),
        train_dataset=text_dataset(24),
        processing_class=make_tokenizer("qwen2_5_vl"),
        peft_config=LoraConfig(r=4, target_modules="all-linear", init_lora_weights=init),
    )  # fmt: skip
    trainer.train()
    trainer.save_model()
    return out, [h for h in trainer.state.log_history if "loss" in h]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    return [_train(tmp, "lora", True, 6, 1), _train(tmp, "pissa", "pissa", 10, 2)]


def test_table_matches_the_runs_logs(runs, tmp_path):
    result = compare([p for p, _ in runs], tmp_path / "cmp.png")
    assert (tmp_path / "cmp.png").stat().st_size > 10_000
    rows = {r["run"]: r for r in result["runs"]}
    assert set(rows) == {"lora", "pissa"}
    for (path, logs), label in zip(runs, ("lora", "pissa")):
        row = rows[label]
        assert row["final_loss"] == pytest.approx(logs[-1]["loss"], rel=1e-9)
        assert row["min_loss"] == pytest.approx(min(h["loss"] for h in logs), rel=1e-9)
        warmup = math.ceil(0.1 * logs[-1]["step"])
        settled = [h["grad_norm"] for h in logs if h["step"] > warmup]
        assert row["grad_norm_median"] == pytest.approx(statistics.median(settled), rel=1e-9)
        assert row["peak_grad_norm"] == pytest.approx(max(h["grad_norm"] for h in logs), rel=1e-9)
        audit = json.loads((path / "audit.json").read_text())
        assert row["effective_trainable"] == audit["params"]["effective_trainable"] > 0
        assert row["verdict"] == audit["verdict"]
    assert rows["lora"]["steps"] == 6 and rows["pissa"]["steps"] == 10


def test_plot_has_one_curve_per_run_aligned_by_step(runs, tmp_path):
    loaded = load_runs([p for p, _ in runs])
    fig = draw(loaded, tmp_path / "cmp.png")
    loss_ax = fig.axes[0]
    lines = {line.get_label(): list(line.get_xdata()) for line in loss_ax.get_lines()}
    assert lines == {"lora": [1, 2, 3, 4, 5, 6], "pissa": [2, 4, 6, 8, 10]}
    titles = [ax.get_title() for ax in fig.axes]
    assert any("language tower" in t for t in titles)
    for ax in fig.axes[1:]:
        assert len(ax.get_lines()) == 2


def test_cli_json_and_table(runs, tmp_path, capsys):
    paths = [str(p) for p, _ in runs]
    assert main(["compare", *paths, "--out", str(tmp_path / "c.png"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [r["run"] for r in data["runs"]] == ["lora", "pissa"]
    assert main(["compare", *paths, "--out", str(tmp_path / "c.png")]) == 0
    out = capsys.readouterr().out
    assert "pissa" in out and "final loss" in out


def test_run_without_audit_is_named(tmp_path, runs, capsys):
    empty = tmp_path / "no-audit-here"
    empty.mkdir()
    with pytest.raises(RunDirError, match="no-audit-here: no audit.json"):
        load_runs([runs[0][0], empty])
    assert main(["compare", str(runs[0][0]), str(empty), "--out", str(tmp_path / "x.png")]) == 2
    assert "no-audit-here" in capsys.readouterr().err
