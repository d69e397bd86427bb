"""CI subset of the architecture zoo (``tests/benchmarks/zoo.py`` runs every architecture; its table is in README).

Text-only MMSFTTrainer, one step, ``all-linear`` and ``q_proj,v_proj,down_proj``: the kept adapters equal the
modules an independent hook-based reference sees fire with a non-zero input and get a non-zero gradient, on a tiny
model built from transformers' default config class, while plain TRL would leave dead adapters.
"""

from __future__ import annotations

import pytest

from tests.benchmarks.zoo import SPECS, run_architecture

# One per kind: a vision LM with a merger inside its tower (Qwen2.5-VL), an audio LM whose text-only forward reads its
# released audio tower (Qwen2-Audio), a model without vision encoder (Fuyu's linear patch embedding).
CI_SUBSET = {
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen2_audio": "Qwen2AudioForConditionalGeneration",
    "fuyu": "FuyuForCausalLM",
}


@pytest.mark.slow
@pytest.mark.parametrize("model_type", sorted(CI_SUBSET))
def test_kept_adapters_equal_the_reference(model_type, tmp_path):
    row = run_architecture(model_type, CI_SUBSET[model_type], tmp_path)
    assert row.status == "ok", (row.status, row.reason, row.results)
    assert set(row.results) == set(SPECS)
    trained = {k: r for k, r in row.results.items() if "kept" in r}
    assert trained["all-linear"]["kept"] == trained["all-linear"]["reference_reached"] > 0
    for key, result in trained.items():
        assert result["missing"] == [] and result["extra"] == [], (key, result)
    assert trained["all-linear"]["dead_plain_trl"] > 0  # plain TRL would train nothing on some of its adapters
    if model_type == "fuyu":  # its text model names none of q_proj / v_proj / down_proj: PEFT itself refuses
        assert "NoMatchingPeftModuleError" in row.results["qvd"]["skipped"]
