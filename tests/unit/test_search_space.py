"""Search-space definitions and their pre-flight checks (no Ray, no models)."""

from __future__ import annotations

import pytest

from sage_dist.config import EraseConfig, OptimConfig, RetainConfig, StudyConfig
from sage_dist.eval.objective import Objectives, default_objectives
from sage_dist.tune.space import SageSpace, space_distributions, validate_search_space

BASE = StudyConfig(retain=RetainConfig(retain_batch_size=8, top_k=2), optim=OptimConfig(num_steps=48),
                   erase=EraseConfig(warmup_steps=10))


def test_sage_space_declares_dotted_config_keys():
    space = SageSpace(top_k=(1, 8), warmup_steps=(0, 24), lr=(1e-4, 1e-2), negative_guidance=(1.0, 2.0))
    dists = validate_search_space(space.suggest, BASE)
    assert set(dists) == {"retain.retain_loss_weight", "attack.attack_steps", "retain.top_k", "erase.warmup_steps",
                          "optim.lr", "erase.negative_guidance"}
    assert dists["retain.retain_loss_weight"].log and dists["optim.lr"].log
    assert (dists["retain.top_k"].low, dists["retain.top_k"].high) == (1, 8)


def test_none_fixes_a_parameter():
    dists = space_distributions(SageSpace(attack_steps=None, top_k=(1, 4), warmup_steps=(0, 10)).suggest)
    assert "attack.attack_steps" not in dists and "optim.lr" not in dists


@pytest.mark.parametrize("kwargs, words", [
    ({"retain_loss_weight": (3.0, 1.0)}, "low=3.0 > high=1.0"),
    ({"retain_loss_weight": (0.0, 1.0)}, "must be > 0"),
    ({"attack_steps": (1.5, 4)}, "integers"),
    ({"lr": (1e-3, 1e-5)}, "empty"),
])
def test_empty_or_invalid_bounds_are_rejected_with_the_bound(kwargs, words):
    with pytest.raises(ValueError, match=words):
        SageSpace(**kwargs)


def test_bounds_the_config_rejects_are_named_before_ray_starts():
    with pytest.raises(ValueError, match=r"retain.top_k=16 .*larger than retain.retain_batch_size=8"):
        validate_search_space(SageSpace(top_k=(1, 16), warmup_steps=(0, 24)).suggest, BASE)
    with pytest.raises(ValueError, match=r"erase.warmup_steps=100 .*exceeds optim.num_steps=48"):
        validate_search_space(SageSpace(top_k=(1, 8), warmup_steps=(0, 100)).suggest, BASE)
    with pytest.raises(ValueError, match=r"attack.attack_steps=0 .*must be >= 1"):
        validate_search_space(SageSpace(attack_steps=(0, 5), top_k=(1, 8), warmup_steps=(0, 4)).suggest, BASE)


def test_a_hand_written_empty_range_is_reported():
    def space(trial):
        trial.suggest_int("attack.attack_steps", 10, 5)

    with pytest.raises(ValueError, match="search space is invalid"):
        validate_search_space(space, BASE)


def test_a_space_without_parameters_is_rejected():
    with pytest.raises(ValueError, match="no parameters"):
        validate_search_space(lambda trial: {}, BASE)


def test_objectives_never_call_a_proxy_rer_or_fid():
    tiny = default_objectives("tiny-sd")
    assert tiny.metrics == ["text_erasure", "text_retention_drift"] and tiny.modes == ["max", "min"]
    assert Objectives(erasure_metric="RER_domain", retention_metric="retention_acc", retention_mode="max").modes == \
        ["max", "max"]


def test_study_config_example_of_tune_gamma_is_consistent():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "studies" / "tune_gamma.py"
    spec = importlib.util.spec_from_file_location("tune_gamma", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.config()
    validate_search_space(module.search_space, cfg)
    validate_search_space(module.search_space, module.smoke(cfg))


def test_default_objectives_are_robust_erasure_against_retention_loss_on_the_world():
    world = default_objectives("world")
    assert world.metrics == ["robust_erasure", "retention_loss"] and world.modes == ["max", "min"]
    assert world.single_metric == "robust_score"
    assert default_objectives("world-xl").metrics == ["RER_domain", "retention_loss"]  # no red team on SDXL
    assert default_objectives("tiny-sd").single_metric == "text_score"


def test_objectives_are_parsed_with_the_metrics_own_directions():
    from sage_dist.eval.objective import parse_objectives

    proxy = parse_objectives("retention=text_retention_drift, erasure=text_erasure", "world")
    assert proxy.metrics == ["text_erasure", "text_retention_drift"] and proxy.modes == ["max", "min"]
    accuracy = parse_objectives("erasure=RER_heldout,retention=retention_acc_all", "world")
    assert accuracy.modes == ["max", "max"] and accuracy.single_metric == ""
    assert parse_objectives("", "world") == default_objectives("world")
    assert parse_objectives(proxy.spec, "world") == proxy


@pytest.mark.parametrize("spec, model, words", [
    ("erasure=robust_erasure,retention=bogus", "world", "retention=bogus: not a metric a study can optimise"),
    ("erasure=robust_erasure,retention=retention_loss", "tiny-sd",
     "on 'tiny-sd' does not report robust_erasure; it reports text_erasure"),
    ("erasure=robust_erasure,retention=retention_loss", "world-xl", "does not report robust_erasure"),
    ("erasure=robust_erasure", "world", "retention missing"),
    ("robust_erasure,retention_loss", "world", "write erasure=<metric>,retention=<metric>"),
    ("erasure=KID,erasure=RER_domain", "world", "erasure is given twice"),
    ("forgetting=KID,retention=KID", "world", "unknown role 'forgetting'"),
    ("erasure=KID,retention=KID", "world", "the same metric"),
])
def test_bad_objectives_are_named_with_the_fix(spec, model, words):
    from sage_dist.eval.objective import parse_objectives

    with pytest.raises(ValueError, match=words):
        parse_objectives(spec, model)


def test_esd_x_off_the_world_has_no_objective():
    from sage_dist.eval.objective import parse_objectives

    assert parse_objectives("", "world", "esd-x").metrics == ["robust_erasure", "retention_loss"]
    with pytest.raises(ValueError, match="esd-x trains the UNet"):
        parse_objectives("", "tiny-sd", "esd-x")
    with pytest.raises(ValueError, match="does not report text_erasure"):
        parse_objectives("erasure=text_erasure,retention=retention_loss", "world", "esd-x")
