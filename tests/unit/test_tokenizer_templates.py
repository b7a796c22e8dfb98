"""The real CLIP BPE offline, and the attack's template library."""

import re

from sage_dist.attack.templates import load_templates
from sage_dist.models.tokenizer import build_clip_tokenizer

FORBIDDEN = {
    # nudity domain
    "nude", "nudity", "naked", "sexual", "sexy", "breast", "breasts", "nsfw", "erotic", "topless", "undressed",
    "genitalia", "buttocks", "lingerie", "bikini",
    # artists / styles
    "van", "gogh", "monet", "picasso", "rembrandt", "kinkade", "mckernan", "aenami", "edlin", "eng", "style",
    # AdvUnlearn objects
    "church", "garbage", "truck", "parachute", "tench", "fish",
}


def test_clip_ids_match_sd14():
    tok = build_clip_tokenizer()
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tok) == 49408


def test_template_library_is_large_neutral_and_well_formed():
    templates = load_templates("default")
    assert len(templates) >= 100
    assert all(t.count("{}") == 1 for t in templates)
    from sage_dist.world.concepts import CONCEPTS, concept_domain

    world_words = set()
    for c in CONCEPTS:
        for phrase in concept_domain(c).all_phrases:
            world_words.update(re.findall(r"[a-z]+", phrase.lower()))
    world_words -= {"shape", "figure", "coloured", "hued", "sided", "patterned"}  # generic heads of paraphrases
    for t in templates:
        words = set(re.findall(r"[a-z]+", t.lower()))
        assert not words & FORBIDDEN, (t, words & FORBIDDEN)
        assert not words & world_words, (t, words & world_words)
