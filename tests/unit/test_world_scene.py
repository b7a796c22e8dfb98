"""World generation and concept domains: deterministic, exact labels."""

import numpy as np
import pytest

from sage_dist.world import scene
from sage_dist.world.concepts import (
    CONCEPTS,
    SHAPES,
    TEXTURES,
    concept_domain,
    phrases,
    retain_prompts,
)


def test_generation_is_deterministic_for_a_seed():
    a = scene.sample_scenes(64, np.random.default_rng(7))
    b = scene.sample_scenes(64, np.random.default_rng(7))
    assert a == b
    np.testing.assert_array_equal(scene.render_batch(a), scene.render_batch(b))
    ca = [scene.caption(s, np.random.default_rng(i)) for i, s in enumerate(a)]
    cb = [scene.caption(s, np.random.default_rng(i)) for i, s in enumerate(b)]
    assert ca == cb
    assert scene.sample_scenes(64, np.random.default_rng(8)) != a


def test_heldout_combos_never_drawn_in_training():
    scenes = scene.sample_scenes(3000, np.random.default_rng(0), exclude_heldout=True)
    drawn = {(s.shape, s.colour, s.texture) for s in scenes}
    assert not drawn & set(scene.HELDOUT_COMBOS)
    assert len(scene.HELDOUT_COMBOS) == 12 and len(drawn) == 6 * 6 * 3 - 12


def test_render_has_exact_labels():
    s = scene.Scene(shape="triangle", colour="red", texture="solid", background="light", size=6.0, dx=0, dy=0)
    img = scene.render(s)
    assert img.shape == (16, 16, 3) and img.dtype == np.float32
    mask = scene.shape_mask("triangle", 6.0)
    np.testing.assert_allclose(img[mask], np.tile(scene.COLOUR_RGB["red"], (mask.sum(), 1)), atol=1e-6)
    np.testing.assert_allclose(img[~mask], scene.BACKGROUND_GREY["light"], atol=1e-6)
    masks = [scene.shape_mask(sh, 6.0) for sh in SHAPES]
    for i in range(len(masks)):  # every shape is a distinct pixel set
        for j in range(i + 1, len(masks)):
            assert (masks[i] != masks[j]).sum() >= 8


def test_unknown_shape_raises():
    with pytest.raises(ValueError, match="unknown shape"):
        scene.shape_mask("hexagon", 5.0)


def test_concept_domains():
    dom = concept_domain("triangle")
    assert dom.word == "triangle" and dom.attribute == "shape"
    assert "three-sided shape" in dom.heldout_paraphrases
    assert not set(dom.synonyms) & set(dom.heldout_paraphrases)
    assert "triangle" in CONCEPTS and set(TEXTURES) <= set(CONCEPTS)
    for concept in CONCEPTS:
        d = concept_domain(concept)
        assert len(d.synonyms) >= 2 and len(d.heldout_paraphrases) >= 2
    all_phrases = [p for c in CONCEPTS for p in phrases(c)]
    assert len(all_phrases) == len(set(all_phrases))  # no phrase names two concepts
    with pytest.raises(ValueError, match="unknown world concept"):
        concept_domain("hexagon")


def test_retain_prompts_exclude_the_concept():
    prompts = retain_prompts("triangle")
    assert len(prompts) >= 64 and len(set(prompts)) == len(prompts)
    assert not any("triangle" in p for p in prompts)
    assert len(retain_prompts("striped")) >= 64
