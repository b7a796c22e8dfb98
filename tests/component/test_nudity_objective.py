"""The main job on a real SD pipeline erasing nudity: trials and the re-scoring of the front are scored by the
nudity protocol (NudeNet on I2P prompts, Wilson intervals), wired end to end on the tiny random SD pipeline."""

from __future__ import annotations

import pytest

from sage_dist.eval import objective
from sage_dist.eval.objective import default_objectives, parse_objectives, produced_metrics
from tests.conftest import tiny_config

SD = "CompVis/stable-diffusion-v1-4"


def test_nudity_on_a_real_pipeline_is_searched_on_its_i2p_erasure_rate():
    assert default_objectives(SD, "sage", ("nudity",)).metrics == ["erasure_rate_i2p", "text_retention_drift"]
    assert default_objectives(SD, "sage", ("church",)).metrics == ["text_erasure", "text_retention_drift"]
    assert "erasure_rate_i2p" not in produced_metrics("world", "sage", ("nudity",))
    assert "erasure_rate_i2p" not in produced_metrics(SD, "sage", ("nudity", "church"))  # nudity alone only
    with pytest.raises(ValueError, match="does not report erasure_rate_i2p"):
        parse_objectives("erasure=erasure_rate_i2p,retention=text_retention_drift", SD, "sage", ("church",))
    with pytest.raises(ValueError, match="esd-x trains the UNet"):
        default_objectives(SD, "esd-x", ("nudity",))


def test_a_trial_and_its_rescoring_report_the_nudity_rate_with_intervals(tmp_path, monkeypatch):
    pytest.importorskip("nudenet")
    from sage_dist.train.loop import run_erasure

    monkeypatch.setenv("SAGE_DIST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(objective, "NUDITY_SEARCH_PROMPTS", 3)
    cfg = tiny_config(**{"erase.erase_concept": ("nudity",), "optim.num_steps": 2, "erase.warmup_steps": 1,
                         "erase.ddim_steps": 2})
    result = run_erasure(cfg, out_dir=tmp_path / "edit", progress=False)
    pipe = objective.frozen_pipeline(cfg)
    quick = objective.evaluate_trial(cfg, result, pipe=pipe, retain_prompts=objective.run_retain_prompts(cfg))
    assert quick["erasure_rate_i2p_n"] == 3 and quick["concept_rate_original_i2p_n"] == 3
    low, high = quick["erasure_rate_i2p_ci95_lo"], quick["erasure_rate_i2p_ci95_hi"]
    assert 0.0 <= low <= quick["erasure_rate_i2p"] <= high <= 1.0 and high - low > 0.2  # Wilson on 3 prompts
    assert {"text_erasure", "text_retention_drift"} <= set(quick)
    stored = len([p for p in objective.nudity_image_store().rglob("*") if p.is_file() and p.suffix == ".png"])
    assert stored == 6  # 3 original + 3 erased images, in the store keyed by what produced them

    objective.evaluate_trial(cfg, result, pipe=pipe, retain_prompts=objective.run_retain_prompts(cfg))
    assert len([p for p in objective.nudity_image_store().rglob("*") if p.is_file() and p.suffix == ".png"]) == stored

    monkeypatch.setattr(objective, "NUDITY_FULL_PROMPTS", 5)  # the whole set (931 prompts) on a GPU
    full, lineage = objective.evaluate_saved_edit(cfg, tmp_path / "edit")
    assert full["erasure_rate_i2p_n"] == 5 and lineage["fidelity"] == "nudity"
