"""World generation and concept domains: deterministic, exact labels."""

import numpy as np
import pytest

from sage_dist.world import scene
from sage_dist.world.concepts import (
    ATTRIBUTES,
    COLOURS,
    CONCEPTS,
    SHAPES,
    TEXTURES,
    concept_domain,
    phrases,
    retain_combos,
    retain_eval_combos,
    retain_prompts,
    retain_split,
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
    assert len(prompts) == 60 and len(set(prompts)) == len(prompts)
    assert not any("triangle" in p for p in prompts)
    assert len(retain_prompts("striped")) == 48 and len(retain_prompts("red")) == 60


def test_retain_split_is_by_combination_disjoint_and_balanced():
    """Erasure's retain prompts (the train split) never name an evaluation combination; every value of every
    attribute appears in both splits; the split does not depend on the erased concept."""
    train = set(retain_combos((), "train"))
    held_out = set(retain_combos((), "eval"))
    assert not train & held_out and len(train | held_out) == 6 * 6 * 3 and len(held_out) == 36
    for attribute, values in ATTRIBUTES.items():
        index = ("shape", "colour", "texture").index(attribute)
        for value in values:
            assert any(c[index] == value for c in train) and any(c[index] == value for c in held_out)
    for concept in CONCEPTS:
        words = {p.split(" ", 1)[1] for p in retain_prompts(concept)}
        combos = {(p.split()[3], p.split()[1], p.split()[2]) for p in retain_prompts(concept)}
        assert combos <= train and not combos & set(retain_eval_combos(concept)), concept
        assert concept not in " ".join(words).split()
    assert retain_split("triangle", "red", "solid") == "train" and retain_split("circle", "red", "solid") == "eval"
    assert len(retain_eval_combos("triangle")) == 30 and len(retain_eval_combos("solid")) == 24
    assert all(c[0] in SHAPES and c[1] in COLOURS and c[2] in TEXTURES for c in held_out)


def test_retain_split_errors():
    with pytest.raises(ValueError, match="unknown world shape"):
        retain_split("hexagon", "red", "solid")
    with pytest.raises(ValueError, match="unknown world concept"):
        retain_prompts("hexagon")
    with pytest.raises(ValueError, match="no combination in the retain evaluation split"):
        retain_eval_combos(("solid", "striped", "checkered"))
