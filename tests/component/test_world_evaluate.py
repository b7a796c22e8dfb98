"""evaluate_world on the shipped world, at the quick fidelity and 6 denoising steps: the null test, a degraded
encoder, a scrambled encoder, a UNet edit, several concepts, the paired comparison, and bad input refused before
any image is generated."""

import argparse
import copy
import dataclasses

import numpy as np
import pytest
import torch

from sage_dist.cli.world import register
from sage_dist.eval import world as ev
from sage_dist.eval.world import compare_world, evaluate_world
from sage_dist.models.load import load_pipeline
from sage_dist.presets import WORLD_EVAL_QUICK
from tests.component.world_helpers import scrambled_text_encoder

STEPS = 6


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("world")


@pytest.fixture(autouse=True)
def image_cache(tmp_path_factory, monkeypatch):
    """One image cache per test module: the original model's images are drawn once, never in ~/.cache."""
    monkeypatch.setenv("SAGE_DIST_CACHE", str(tmp_path_factory.getbasetemp() / "world_eval_cache"))


def _contains_zero(result, key):
    low, high = result[f"{key}_ci95"]
    return low <= 0.0 <= high


def test_null_test_original_against_itself_on_other_seeds(pipe):
    """The original model against itself on other noise: every RER interval and the KID difference's interval
    contain 0; on the same noise everything is exactly 0."""
    same = evaluate_world(pipe, None, concept="triangle", quick=True, num_inference_steps=STEPS)
    for key in ("RER_word", "RER_synonyms", "RER_heldout", "RER_domain", "retention_drop", "KID_delta"):
        assert same[key] == 0.0 and same[f"{key}_ci95"] == [0.0, 0.0]
    assert same["fidelity"] == "quick" and same["RER_domain_n"] == WORLD_EVAL_QUICK.domain_images
    assert same["concept_rate_original"] >= 0.8 and same["retention_acc_n"] == WORLD_EVAL_QUICK.retain_images
    null = evaluate_world(pipe, None, concept="triangle", quick=True, num_inference_steps=STEPS, edited_seed=1)
    for key in ("RER_word", "RER_synonyms", "RER_heldout", "RER_domain", "retention_drop", "KID_delta"):
        assert _contains_zero(null, key), (key, null[key], null[f"{key}_ci95"])
    # two independent estimates of the same rate: their 95 % intervals overlap (one point need not lie inside the
    # other's interval; the paired retention_drop above is the sharper null check)
    assert null["retention_acc_ci95"][0] <= same["retention_acc_ci95"][1]
    assert same["retention_acc_ci95"][0] <= null["retention_acc_ci95"][1]
    assert null["prompt_sets"]["retain_eval"]["edited_seeds"] != same["prompt_sets"]["retain_eval"]["seeds"]


def test_degraded_encoder_retention_below_the_originals_interval(pipe):
    """Gaussian noise on every text-encoder weight (std 1.0 x the tensor's own std) loses retention: the
    degraded model's retention_acc lies below the original's 95 % interval, and KID sees the damage."""
    degraded = copy.deepcopy(pipe.text_encoder)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in degraded.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * param.std().nan_to_num(0.0))
    res = evaluate_world(pipe, degraded, concept="triangle", quick=True, num_inference_steps=STEPS)
    assert res["retention_acc"] < res["retention_acc_original_ci95"][0]
    assert res["retention_drop_ci95"][0] > 0 and res["KID_delta_ci95"][0] > 0


def test_scrambled_encoder_erases_the_concept(pipe):
    res = evaluate_world(pipe, scrambled_text_encoder(pipe), concept="triangle", quick=True, num_inference_steps=STEPS)
    assert res["RER_domain"] > 0.5 and res["RER_domain_ci95"][0] > 0.3
    assert res["retention_acc"] < res["retention_acc_original"]
    assert set(res["neighbours"]) == {"circle", "square", "diamond", "cross", "star"}
    for value in res["neighbours"]:
        assert f"neighbour_acc_{value}_ci95" in res and res[f"neighbour_acc_{value}_n"] >= ev.MIN_RATE_IMAGES
    sets = res["prompt_sets"]
    assert set(sets) == {"word", "synonyms", "heldout", "retain_eval"}
    assert len(sets["retain_eval"]["seeds"]) == WORLD_EVAL_QUICK.retain_images


def test_several_concepts_and_a_unet_edit(pipe):
    """Two concepts at once (per-concept keys, retain images naming neither) and a UNet edit: a UNet whose
    text pathways (cross-attention K/V) are zeroed cannot draw the prompted shape."""
    same = evaluate_world(pipe, None, concept=("triangle", "red"), quick=True, num_inference_steps=STEPS)
    assert same["triangle/RER_domain"] == 0.0 and same["red/RER_domain"] == 0.0 and same["RER_domain"] == 0.0
    assert same["RER_domain_ci95"] == [0.0, 0.0] and "neighbour_acc_blue" in same and "neighbour_acc_star" in same
    blind = copy.deepcopy(pipe.unet)
    with torch.no_grad():
        for name, param in blind.named_parameters():
            if ".attn2.to_k." in name or ".attn2.to_v." in name or name.startswith("add_embedding."):
                param.zero_()
    edited = evaluate_world(pipe, None, concept="triangle", unet=blind, quick=True, num_inference_steps=STEPS)
    assert edited["RER_domain"] > 0.5 and edited["retention_acc"] < edited["retention_acc_original"]


def test_paired_comparison_on_identical_noise(pipe):
    scrambled = scrambled_text_encoder(pipe)
    cmp = compare_world(pipe, scrambled, None, concept="triangle", fidelity="quick", num_inference_steps=STEPS)
    assert cmp["delta_RER_domain"] == pytest.approx(cmp["a"]["RER_domain"] - cmp["b"]["RER_domain"])
    assert cmp["delta_RER_domain_ci95"][0] > 0.3 and cmp["delta_retention_acc_ci95"][1] < 0
    assert cmp["delta_KID"] == pytest.approx(cmp["a"]["KID"] - cmp["b"]["KID"])
    self_cmp = compare_world(pipe, None, None, concept="triangle", fidelity="quick", num_inference_steps=STEPS)
    for key in ("delta_RER_domain", "delta_retention_acc", "delta_KID", "delta_neighbour_acc_diamond"):
        assert self_cmp[key] == 0.0 and self_cmp[f"{key}_ci95"] == [0.0, 0.0]


def test_original_images_are_cached_on_disk(pipe, tmp_path, monkeypatch):
    monkeypatch.setenv("SAGE_DIST_CACHE", str(tmp_path))
    prompts, seeds = ["a red solid circle", "a blue striped star"], [3, 4]
    first = ev.original_images(pipe, prompts, seeds, guidance=3.0, num_inference_steps=2)
    files = list((tmp_path / "world_images").glob("*.safetensors"))
    assert len(files) == 1
    calls = []
    monkeypatch.setattr(ev, "render", lambda *a, **k: calls.append(1))
    assert torch.equal(ev.original_images(pipe, prompts, seeds, guidance=3.0, num_inference_steps=2), first)
    assert not calls  # served from disk
    other = copy.copy(pipe)
    other.text_encoder = scrambled_text_encoder(pipe)
    assert ev.pipeline_hash(other) != ev.pipeline_hash(pipe)  # another model never reads these images


def test_an_image_depends_only_on_its_own_prompt_and_seed(pipe):
    """Rendered alone or inside a batch, an image is bit-for-bit the same (fixed-size padded pipeline calls)."""
    prompts = [f"a red solid {s}" for s in ("circle", "square", "triangle", "star")] * 5
    seeds = list(range(20))
    batch = ev.render(pipe, prompts=prompts, seeds=seeds, guidance=3.0, num_inference_steps=2)
    alone = ev.render(pipe, prompts=prompts[17:18], seeds=seeds[17:18], guidance=3.0, num_inference_steps=2)
    assert torch.equal(batch[17:18], alone)


def test_bad_input_fails_before_any_image(pipe, monkeypatch):
    def no_images(*args, **kwargs):
        raise AssertionError("an image was generated before the input was checked")

    monkeypatch.setattr(ev, "render", no_images)
    monkeypatch.setattr(ev, "original_images", no_images)
    with pytest.raises(ValueError, match="unknown world concept 'hexagon'"):
        evaluate_world(pipe, None, concept="hexagon")
    with pytest.raises(ValueError, match="at least 2 images"):
        evaluate_world(pipe, None, concept="triangle", fidelity=dataclasses.replace(WORLD_EVAL_QUICK, domain_contexts=1))
    with pytest.warns(UserWarning, match=f"at least {ev.MIN_KID_IMAGES}"), pytest.raises(AssertionError):
        evaluate_world(pipe, None, concept="triangle", fidelity=dataclasses.replace(WORLD_EVAL_QUICK, retain_images=16))
    with pytest.raises(ValueError, match="no combination in the retain evaluation split"):
        evaluate_world(pipe, None, concept="solid", exclude=("solid", "striped", "checkered"))


def test_world_command_registers_subcommands():
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["world", "quality", "--guidance", "2", "3"])
    assert args.guidance == [2.0, 3.0]
    args = parser.parse_args(["world", "train", "--seed", "1", "--out", "x", "--minutes", "2", "--resume"])
    assert args.resume and args.minutes == 2.0


def test_edited_pipeline_never_casts_the_callers_module(pipe):
    """An fp32 trained encoder put into an fp16 pipeline is converted as a copy; the caller's stays fp32."""
    from sage_dist.models.load import edited_pipeline

    half = copy.copy(pipe)
    half.text_encoder = copy.deepcopy(pipe.text_encoder).to(torch.float16)
    trained = copy.deepcopy(pipe.text_encoder)
    edited = edited_pipeline(half, trained)
    assert next(trained.parameters()).dtype == torch.float32
    assert next(edited.text_encoder.parameters()).dtype == torch.float16
    assert edited_pipeline(pipe, trained).text_encoder is trained and half.text_encoder is not edited.text_encoder


def test_kid_features_have_norm_sqrt_d():
    f = np.abs(np.random.default_rng(0).normal(size=(5, 128))) * np.arange(1, 6)[:, None]
    np.testing.assert_allclose(np.linalg.norm(ev.kid_features(f), axis=1), np.sqrt(128))


def test_objective_entry_points_pass_the_unet_and_rename_the_heldout_rate(pipe, monkeypatch):
    """``world_metrics`` hands a trial's UNet (ESD-x) to the world evaluation and returns floats with interval
    bounds; ``evaluate_edit`` reports ``concept_rate_heldout`` (no attack is run, so it is not an ASR)."""
    from types import SimpleNamespace

    from sage_dist.config import StudyConfig
    from sage_dist.eval import objective

    seen = {}

    def fake_evaluate_world(pipe_, text_encoder, *, unet=None, **kwargs):
        seen.update(text_encoder=text_encoder, unet=unet, fidelity=kwargs["fidelity"])
        return {"RER_domain": 0.5, "RER_domain_ci95": [0.4, 0.6], "RER_domain_n": 50, "erasure_rate_heldout": 0.25,
                "erasure_rate_heldout_ci95": [0.1, 0.4], "erasure_rate_heldout_n": 20, "fidelity": kwargs["fidelity"],
                "prompt_sets": {}, "seconds": 1.0}

    def fake_compare_world(pipe_, text_encoder, other, *, unet_a=None, **kwargs):
        result = fake_evaluate_world(pipe_, text_encoder, unet=unet_a, fidelity=kwargs["fidelity"].name)
        return {"a": result, "delta_retention_acc_all": 0.0, "delta_retention_acc_all_ci95": [-0.1, 0.1],
                "delta_retention_acc_all_n": 64}

    monkeypatch.setattr(objective, "evaluate_world", fake_evaluate_world)
    monkeypatch.setattr(objective, "compare_world", fake_compare_world)
    monkeypatch.setattr(objective, "red_team_world", lambda *args, **kwargs: {
        "ASR_prefix": 0.5, "ASR_prefix_ci95": [0.3, 0.7], "ASR_prefix_n": 16})
    cfg = StudyConfig().replace_flat({"model.model_id": "world", "erase.erase_concept": ("triangle",)})
    marker = torch.nn.Linear(1, 1)
    metrics = objective.world_metrics(cfg, SimpleNamespace(text_encoders={}, unet=marker), pipe)
    assert seen == {"text_encoder": None, "unet": marker, "fidelity": "search"}
    assert metrics["RER_domain_ci95_lo"] == 0.4 and "seconds" not in metrics
    edit = objective.evaluate_edit("world", concepts=("triangle",))
    assert edit["concept_rate_heldout"] == 0.75 and "ASR_heldout" not in edit
    assert (edit["concept_rate_heldout_ci95_lo"], edit["concept_rate_heldout_ci95_hi"]) == pytest.approx((0.6, 0.9))
    assert objective.default_objectives("world").retention_metric == "retention_loss"
