"""The world red team: pre-ASR on the original, a no-op attack reproduces the pre-attack image bit for bit,
saved adversarial prompts reload to the same image, the Ring-A-Bell direction never sees an evaluation prompt."""

import dataclasses
import json

import pytest
import torch

from sage_dist.eval import world as ev
from sage_dist.eval.red_team import (
    direction_pairs,
    red_team_world,
    replay_attack,
    saved_images,
)
from sage_dist.eval.world_asr import world_asr
from sage_dist.models.load import load_pipeline
from sage_dist.presets import WORLD_EVAL_FULL
from tests.component.world_helpers import scrambled_text_encoder

STEPS = 6
SMALL = dataclasses.replace(WORLD_EVAL_FULL, name="test", red_team_prompts=6, prefix_timesteps=1,
                            prefix_attack_steps=2, inside_out_steps=2, ring_strengths=(0.0, 2.0))


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("world")


@pytest.fixture(autouse=True)
def image_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SAGE_DIST_CACHE", str(tmp_path_factory.getbasetemp() / "world_asr_cache"))


@pytest.fixture(scope="module")
def scrambled(pipe):
    """An encoder that no longer draws triangles (its token embeddings permuted): every prompt is attacked."""
    return scrambled_text_encoder(pipe)


def test_original_world_model_has_high_pre_asr_and_attack_runs(pipe):
    res = world_asr(pipe, pipe.text_encoder, concept="triangle", attack_steps=2, per_phrase=1,
                    num_inference_steps=STEPS)
    assert res["num_prompts"] == 2 and res["pre_ASR_n"] == 2
    assert res["pre_ASR"] >= 0.5  # the world draws held-out paraphrases of a shape >= 85% of the time
    assert res["ASR"] == pytest.approx(res["pre_ASR"] + res["post_ASR"])
    low, high = res["ASR_ci95"]
    assert low <= res["ASR"] <= high


def test_no_op_attack_reproduces_the_pre_attack_image_bit_for_bit(pipe, scrambled, tmp_path):
    """Ring-A-Bell at strength 0 hands back the prompt's own conditioning: its post-attack image, rendered only
    for the attacked rows, must equal the pre-attack image (same latents), so a post success is the attack's."""
    res = red_team_world(pipe, scrambled, concept="triangle", fidelity=SMALL, attacks=("ring",), ring_strengths=(0.0,),
                         num_inference_steps=STEPS, out_dir=tmp_path)
    saved = saved_images(tmp_path / "ring_0.json")
    assert len(res["red_team"]["attacked_rows"]) >= 3 and saved["images"].shape[0] == len(res["red_team"]["attacked_rows"])
    assert torch.equal(saved["images"], saved["pre_images"])
    assert res["post_ASR_ring_0"] == 0.0 and res["ASR_ring_0"] == res["pre_ASR"]


def test_every_adversarial_prompt_is_saved_and_reloads_to_the_same_image(pipe, scrambled, tmp_path):
    res = red_team_world(pipe, scrambled, concept="triangle", fidelity=SMALL, num_inference_steps=STEPS,
                         out_dir=tmp_path)
    assert res["ASR"] == pytest.approx(res["pre_ASR"] + res["post_ASR"])
    assert res["ASR"] >= max(res["ASR_prefix"], res["ASR_ring_max"]) - 1e-12
    assert "trains against" in res["red_team"]["attacks"]["inside_out"]["label"]
    for name in ("prefix", "ring_2", "inside_out"):
        record = json.loads((tmp_path / f"{name}.json").read_text())
        assert record["model_hash"] == res["red_team"]["model_hash"] and record["prompts"]
        assert all(p["seed"] in res["red_team"]["seeds"] for p in record["prompts"])
        assert torch.equal(replay_attack(pipe, tmp_path / f"{name}.json", text_encoder=scrambled),
                           saved_images(tmp_path / f"{name}.json")["images"])
    with pytest.raises(ValueError, match="found on model"):
        replay_attack(pipe, tmp_path / "prefix.json")  # the original encoder is another model


def test_ring_direction_is_fitted_on_train_captions_only(pipe):
    pairs = direction_pairs("triangle", pipe.tokenizer)
    fitted = {p for pair in pairs for p in pair}
    evaluated = {p.prompt for items in ev.domain_image_sets("triangle", 16).values() for p in items}
    evaluated |= {p.prompt for p in ev.retain_eval_set("triangle", 256)}
    evaluated |= {p.prompt for p in ev.red_team_prompts("triangle", 32)}
    assert pairs and not fitted & evaluated
    assert not any(h in p for p in fitted for h in ("three-sided", "three-cornered"))


def test_red_team_bad_input(pipe):
    with pytest.raises(ValueError, match="unknown world concept"):
        red_team_world(pipe, None, concept="hexagon")
    with pytest.raises(ValueError, match="unknown red-team attack"):
        red_team_world(pipe, None, concept="triangle", attacks=("gcg",))
    with pytest.raises(ValueError, match="red_team_prompts=0"):
        red_team_world(pipe, None, concept="triangle", fidelity="quick")
