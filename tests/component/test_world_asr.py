"""ASR on the bundled world: the original model's held-out paraphrases succeed without attack."""

import pytest

pytest.importorskip("sage_dist.world.detector")


def test_original_world_model_has_high_pre_asr_and_attack_runs():
    from sage_dist.eval.world_asr import world_asr
    from sage_dist.models.load import load_pipeline

    pipe = load_pipeline("world")
    res = world_asr(pipe, pipe.text_encoder, concept="triangle", attack_steps=2, per_phrase=1)
    assert res["num_prompts"] == 2
    assert res["pre_ASR"] >= 0.5  # the world draws held-out paraphrases of a shape >= 85% of the time
    assert res["ASR"] == pytest.approx(res["pre_ASR"] + res["post_ASR"])
