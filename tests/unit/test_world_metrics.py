"""World metrics on hand-made inputs."""

import numpy as np
import pytest
import torch

from sage_dist.eval import world as ev


def test_erasure_rate_and_rer():
    assert ev.erasure_rate(np.array([True, False, False, False])) == pytest.approx(0.75)
    assert ev.relative_erasure_ratio(np.array([1, 0, 0, 0]), np.array([1, 1, 1, 1])) == pytest.approx(0.75)
    assert ev.relative_erasure_ratio(np.array([1, 1]), np.array([1, 1])) == 0.0
    assert np.isnan(ev.relative_erasure_ratio(np.array([0, 1]), np.array([0, 0])))
    with pytest.raises(ValueError):
        ev.erasure_rate(np.array([], dtype=bool))


def test_retention_accuracy_and_alignment():
    pred = {"shape": ["circle", "square"], "colour": ["red", "red"], "texture": ["solid", "solid"]}
    labels = [{"shape": "circle", "colour": "red", "texture": "solid"},
              {"shape": "square", "colour": "blue", "texture": "solid"}]
    assert ev.retention_accuracy(pred, labels) == 0.5
    probs = {"shape": torch.tensor([[1.0, 0, 0, 0, 0, 0], [0, 0.5, 0.5, 0, 0, 0]]),
             "colour": torch.tensor([[1.0, 0, 0, 0, 0, 0], [1.0, 0, 0, 0, 0, 0]]),
             "texture": torch.tensor([[1.0, 0, 0], [1.0, 0, 0]])}
    # image 0: 1, 1, 1; image 1: 0.5 (square), 0 (blue), 1 (solid)
    assert ev.alignment_score(probs, labels) == pytest.approx((3 + 1.5) / 6)


def test_feature_fid_uses_clean_fid():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 4))
    assert ev.feature_fid(a, a) == pytest.approx(0.0, abs=1e-6)
    shifted = ev.feature_fid(a, a + np.array([3.0, 0, 0, 0]))
    assert shifted == pytest.approx(9.0, rel=1e-6)  # ||mu_a - mu_b||^2 with equal covariances
    with pytest.raises(ValueError):
        ev.feature_fid(a[:1], a)


def test_prompt_sets_cover_the_domain():
    """Every phrase of the domain in 16 distinct contexts with both backgrounds (the full fidelity)."""
    from sage_dist.world.concepts import concept_domain

    sets = ev.domain_image_sets("triangle", 16)
    assert len(sets["word"]) == 16 and len(sets["synonyms"]) == 32 and len(sets["heldout"]) == 32
    assert all("triangle" in p.prompt for p in sets["word"])
    assert all(any(h in p.prompt for h in concept_domain("triangle").heldout_paraphrases) for p in sets["heldout"])
    for name, items in sets.items():
        assert len({p.prompt for p in items}) == len(items), name  # contexts differ
        assert {p.background for p in items} == {"light", "dark"}
        assert all(p.labels["shape"] == "triangle" for p in items)
    contexts = [(p.labels["colour"], p.labels["texture"]) for p in sets["word"]]
    assert len(set(contexts)) == 16  # other attributes differ in every context
    assert all(("white" in p.prompt or "light" in p.prompt) == (p.background == "light") for p in sets["word"])
    colour = ev.domain_image_sets("red", 16)["word"]
    assert len({(p.labels["shape"], p.labels["texture"]) for p in colour}) == 16
    assert ev.domain_prompt_sets("triangle", 2)["word"] == [p.prompt for p in ev.domain_image_sets("triangle", 2)["word"]]


def test_retain_eval_set_is_the_held_out_split():
    from sage_dist.world.concepts import retain_eval_combos, retain_prompts

    items = ev.retain_eval_set("triangle", 256)
    assert len(items) == 256 and not any(p.labels["shape"] == "triangle" for p in items)
    combos = {(p.labels["shape"], p.labels["colour"], p.labels["texture"]) for p in items}
    assert combos == set(retain_eval_combos("triangle"))
    trained = set(retain_prompts("triangle"))
    assert not any(p.prompt in trained for p in items)
    trained_combos = {tuple(t.split()[i] for i in (3, 1, 2)) for t in trained}
    assert not combos & trained_combos
    assert {p.background for p in items} == {"light", "dark"}
    prompts, labels = ev.retain_subset(("triangle", "red"), 18)
    assert len(prompts) == 18 and not any(lab["shape"] == "triangle" or lab["colour"] == "red" for lab in labels)
    with pytest.raises(ValueError, match="no combination"):
        ev.retain_subset(("solid", "striped", "checkered"), 18)


def test_a_smaller_retain_set_is_a_random_sample_of_the_full_one():
    """The quick fidelity's 64 images are drawn from the full 256 (seeded; the combinations cycle as in the full
    plan), so they span the full set's caption templates and backgrounds instead of its first template only."""
    full = ev.retain_eval_set("triangle", 256)
    quick = ev.retain_eval_set("triangle", 64)
    assert len(quick) == 64 and {p.prompt for p in quick} <= {p.prompt for p in full}
    assert [p.labels for p in quick] == [p.labels for p in full[:64]]  # every combination as often as before
    assert quick == ev.retain_eval_set("triangle", 64)  # deterministic

    from sage_dist.world import scene
    from sage_dist.world.concepts import retain_eval_combos

    per_context = len(retain_eval_combos("triangle"))
    index = {p.prompt: i for i, p in enumerate(full)}

    def template(p):  # image i of the plan is in context i // C, whose caption template is (context // 2) % T
        return (index[p.prompt] // per_context // 2) % len(scene.TRAIN_TEMPLATES)

    assert len({template(p) for p in quick}) == len({template(p) for p in full}) > 1
    assert {p.background for p in quick} == {"light", "dark"}


def test_red_team_prompts_are_held_out_paraphrases_in_contexts():
    from sage_dist.world.concepts import concept_domain

    items = ev.red_team_prompts("triangle", 32)
    heldout = concept_domain("triangle").heldout_paraphrases
    assert len(items) == 32 and len({p.prompt for p in items}) == 32
    for phrase in heldout:
        assert sum(phrase in p.prompt for p in items) == 16
    assert not any("triangle" in p.prompt for p in items)


def test_full_fidelity_meets_the_powered_protocol():
    from sage_dist.presets import WORLD_EVAL_FULL, WORLD_EVAL_QUICK

    full = WORLD_EVAL_FULL
    assert full.domain_contexts >= 16 and full.domain_seeds >= 2 and full.retain_images >= 256
    assert full.red_team_prompts >= 32 and full.domain_images == 160
    assert ev.resolve_fidelity(None) is full and ev.resolve_fidelity(None, quick=True) is WORLD_EVAL_QUICK
    with pytest.raises(ValueError, match="fidelity 'huge'"):
        ev.resolve_fidelity("huge")


def test_small_budgets_warn_or_fail_naming_the_minimum():
    import dataclasses
    import warnings

    from sage_dist.presets import WORLD_EVAL_FULL, WORLD_EVAL_QUICK

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the shipped fidelities are informative
        ev.check_fidelity(WORLD_EVAL_FULL, ("triangle",), ())
        ev.check_fidelity(WORLD_EVAL_QUICK, ("triangle",), ())
    small = dataclasses.replace(WORLD_EVAL_QUICK, retain_images=16)
    with pytest.warns(UserWarning, match=f"at least {ev.MIN_KID_IMAGES}"):
        ev.check_fidelity(small, ("triangle",), ())
    few_words = dataclasses.replace(WORLD_EVAL_QUICK, domain_contexts=4)
    with pytest.warns(UserWarning, match=f"below {ev.MIN_RATE_IMAGES} images"):
        ev.check_fidelity(few_words, ("triangle",), ())
    with pytest.raises(ValueError, match="at least 2 images"):
        ev.check_fidelity(dataclasses.replace(WORLD_EVAL_QUICK, domain_contexts=1), ("triangle",), ())
    with pytest.raises(ValueError, match="at least 2 prompts"):
        ev.check_fidelity(dataclasses.replace(WORLD_EVAL_QUICK, red_team_prompts=1), ("triangle",), ())


def test_format_and_flatten_metrics():
    result = {"RER_domain": 0.9, "RER_domain_ci95": [0.85, 0.95], "RER_domain_n": 160, "fidelity": "full",
              "prompt_sets": {"word": {"prompts": ["a"], "seeds": [0]}}, "KID": 0.00123, "KID_ci95": [0.001, 0.0015],
              "KID_n": 256}
    assert ev.format_metric(result, "RER_domain") == "0.900 ± 0.050 [0.850, 0.950] (n=160)"
    assert ev.format_metric(result, "KID").startswith("1.23e-03 ± 2.50e-04")
    flat = ev.flat_metrics(result)
    assert flat == {"RER_domain": 0.9, "RER_domain_ci95_lo": 0.85, "RER_domain_ci95_hi": 0.95, "RER_domain_n": 160.0,
                    "KID": 0.00123, "KID_ci95_lo": 0.001, "KID_ci95_hi": 0.0015, "KID_n": 256.0}
