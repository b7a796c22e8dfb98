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
    sets = ev.domain_prompt_sets("triangle", per_phrase=2)
    assert len(sets["word"]) == 2 and len(sets["synonyms"]) == 4 and len(sets["heldout"]) == 4
    assert all("triangle" in p for p in sets["word"])
    assert all("three" in p for p in sets["heldout"])
    prompts, labels = ev.retain_subset("triangle", 18)
    assert len(prompts) == 18 and all(lab["shape"] != "triangle" for lab in labels)
    assert prompts[0] == f"a {labels[0]['colour']} {labels[0]['texture']} {labels[0]['shape']}"
    prompts, labels = ev.retain_subset(("triangle", "red"), 18)
    assert len(prompts) == 18 and not any(lab["shape"] == "triangle" or lab["colour"] == "red" for lab in labels)
    with pytest.raises(ValueError, match="fewer than 2 retain prompts"):
        ev.retain_subset(("solid", "striped", "checkered"), 18)
