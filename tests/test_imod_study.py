"""The IMoD evidence study (recipes/imod_study.py): `--quick` end to end, its data and its statistics."""

from __future__ import annotations

import json
import math
import statistics

import pytest

from tests.test_recipes import load_recipe


@pytest.fixture(scope="module")
def study():
    return load_recipe("imod_study")


def test_quick_study_end_to_end(tmp_path, study):
    out, cache = tmp_path / "out", tmp_path / "cache"
    result = study.main(["--quick", "--output_dir", str(out), "--cache_dir", str(cache), "--use_cpu", "true"])
    table = (out / "results.md").read_text()
    picture = out / "imod_study.png"
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and picture.stat().st_size > 10_000
    main_table = table.split("Paired by seed")[0]
    rows = [line for line in main_table.splitlines() if line.startswith("| ") and not line.startswith("| arm")]
    assert len(rows) == len(study.ARMS)
    for arm in study.ARMS:
        label = study.LABELS[arm] if arm != "imod" else "IMoD λ1=1, λ2=0.0001"
        assert any(row.startswith(f"| {label} | 1 |") for row in rows), (label, table)
    paired = table.split("Paired by seed")[1]  # every other arm against plain LoRA with clipping, seed by seed
    assert sum(line.startswith("| IMoD") or line.startswith("| LoRA, clip off") for line in paired.splitlines()) == 4
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["runs"]) == set(study.ARMS)
    eval_rows = study.QUICK["eval_samples"]
    for arm, (run,) in result["runs"].items():
        # step 1 and every dominance_steps (2) of the 4 quick steps
        assert sorted(run["rates"]) == [1, 2, 4], arm
        assert all(0.0 <= r <= 1.0 for r in run["rates"].values())
        for key in ("acc_decorrelated", "acc_holds", "follows_wording"):
            assert math.isclose(run[key] * eval_rows, round(run[key] * eval_rows), abs_tol=1e-6), (arm, key)
    assert saved["runs"]["imod-x10"][0]["imod_lambda_msd"] == pytest.approx(10.0)
    assert saved["runs"]["imod-div10"][0]["imod_lambda_ma"] == pytest.approx(1e-5)
    assert saved["runs"]["lora-noclip"][0]["max_grad_norm"] == 0.0
    assert 0.0 <= saved["reference"]["vision_probe_decorrelated"] <= 1.0
    # The base is cached: a second request returns the same checkpoint without rebuilding it.
    (base,) = cache.glob("base-*")
    stamp = (base / "study_base.json").stat().st_mtime_ns
    args = study.parser().parse_args_and_config(["--quick", "--cache_dir", str(cache)])[0]
    for key, value in study.QUICK.items():
        setattr(args, key, value)
    assert study.pretrained_base(args, study.embedded.embedded_processor()) == base
    assert (base / "study_base.json").stat().st_mtime_ns == stamp


def test_shortcut_data(study):
    n = 400
    train = study.vqa_rows(n, 1, 0.85, 56, 40.0)
    follows = sum(a == c for a, c in zip(train["answer"], train["cue"])) / n
    assert abs(follows - 0.85) < 4 * math.sqrt(0.85 * 0.15 / n)  # binomial, 4 sd
    holds = study.vqa_rows(50, 3, 1.0, 56, 40.0)
    assert holds["answer"] == holds["cue"]
    decorrelated = study.vqa_rows(n, 2, None, 56, 40.0)
    agree = sum(a == c for a, c in zip(decorrelated["answer"], decorrelated["cue"])) / n
    assert abs(agree - 0.25) < 4 * math.sqrt(0.25 * 0.75 / n)
    for row in train.select(range(8)):
        assert row["prompt"][0]["content"][1]["text"] == study.WORDINGS[row["cue"]]
        assert row["completion"][0]["content"][0]["text"] == f"{row['answer']}."


def test_mean_ci_against_t_formula(study):
    report = study.study_report
    values = [0.1, 0.4, 0.2, 0.6, 0.3]
    mean, half = report.mean_ci(values)
    assert mean == pytest.approx(statistics.fmean(values))
    # t(0.975, 4) = 2.7764 (any statistics table); half-width = t * s / sqrt(n)
    assert half == pytest.approx(2.7764 * statistics.stdev(values) / math.sqrt(5), rel=1e-3)
    assert report.mean_ci([0.5]) == (0.5, 0.0)
    with pytest.raises(ValueError):
        report.mean_ci([])


def test_unknown_arm_is_refused(study):
    args = study.parser().parse_args_and_config(["--use_cpu", "true"])[1]
    with pytest.raises(ValueError, match="Unknown arm"):
        study.arm_args("dora", 0, args)
