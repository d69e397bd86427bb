"""One definition of each parameter figure (mm_trainer/model/figures.py): the start-up plan, the audit, AUDIT.md,
the model card and `mm-trainer plan` show the same "base params" per tower, counted independently here."""

from __future__ import annotations

import json

import pytest
from peft import LoraConfig

from mm_trainer import MMSFTConfig, MMSFTTrainer
from mm_trainer.model.plan_report import human
from tests.kit import image_text_dataset, make_processor, make_tokenizer, text_dataset, tiny_model, training_args

FAMILY = "qwen2_5_vl"


def _independent_base_params(model) -> dict[str, int]:
    """Parameters per tower of the untouched model, by the known roots of the tiny Qwen2.5-VL."""
    counts: dict[str, int] = {}
    for name, param in model.named_parameters():  # tied parameters once
        if name.startswith("model.visual.merger."):
            tower = "projector"
        elif name.startswith("model.visual."):
            tower = "vision"
        elif name.startswith("lm_head."):
            tower = "output"
        else:
            tower = "language"
        counts[tower] = counts.get(tower, 0) + param.numel()
    return counts


@pytest.mark.parametrize("data", ["text", "image"])
def test_plan_audit_card_and_cli_show_the_same_base_params(tmp_path, data):
    expected = _independent_base_params(tiny_model(FAMILY))
    text = data == "text"
    trainer = MMSFTTrainer(
        model=tiny_model(FAMILY),
        args=training_args(tmp_path, MMSFTConfig, max_steps=1),
        train_dataset=text_dataset(4) if text else image_text_dataset(4, family=FAMILY),
        processing_class=make_tokenizer(FAMILY) if text else make_processor(FAMILY),
        peft_config=LoraConfig(r=4, target_modules="all-linear"),
    )
    if text:  # the unreached vision tower was released: its base params still count at the size they had
        assert [r.tower for r in trainer.released_towers] == ["vision"]
    plan_rows = {row["tower"]: row["base_params"] for row in trainer.target_plan.tower_rows()}
    assert plan_rows == {t: n for t, n in expected.items() if t in plan_rows}
    assert set(plan_rows) >= {"language", "vision", "projector"}
    trainer.train()
    trainer.save_model()
    audit = json.loads((tmp_path / "audit.json").read_text())
    per_tower = {t: row["base_params"] for t, row in audit["params"]["per_tower"].items()}
    assert per_tower == expected
    assert audit["params"]["base_params"] == sum(expected.values())
    assert audit["targets"]["towers"] == trainer.target_plan.to_dict()["towers"]  # the plan, as the audit keeps it
    card = (tmp_path / "AUDIT.md").read_text()
    for tower, n in expected.items():
        assert f"| {tower} |" in card and f"| {human(n)} |" in card


def test_cli_plan_counts_base_params_as_the_trainer_does(tmp_path, capsys):
    from mm_trainer.cli.main import main
    from tests.kit import tiny_config

    tiny_config(FAMILY).save_pretrained(tmp_path / "model")
    assert main(["plan", str(tmp_path / "model"), "--json"]) == 0
    rows = {row["tower"]: row["base_params"] for row in json.loads(capsys.readouterr().out)["towers"]}
    expected = _independent_base_params(tiny_model(FAMILY))
    assert rows == {t: n for t, n in expected.items() if t in rows} and {"language", "vision"} <= set(rows)
