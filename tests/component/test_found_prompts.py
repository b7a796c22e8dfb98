"""The semantic-drift measurement of the self-check's found prompts on the bundled world."""

from __future__ import annotations

import pytest

from sage_dist.attack.prompt import build_attack_prompt
from sage_dist.config import StudyConfig
from sage_dist.eval.found_prompts import found_prompt_concept_rate
from sage_dist.models.load import load_pipeline
from sage_dist.models.text import TextConditioner
from sage_dist.train.step import FOUND_PROMPTS_KEPT, found_stride

TEMPLATES = ("a {} on a white background", "a picture of a {}", "a {} shape", "one {}")


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("world")


def test_found_stride_spreads_at_most_the_kept_number_over_training():
    cfg = StudyConfig().replace_flat({"optim.num_steps": 150, "erase.warmup_steps": 30})
    stride = found_stride(cfg)  # 121 attacks (steps 30..149 and the bound) -> every 4th -> 31 kept
    assert stride == 4 and -(-121 // stride) <= FOUND_PROMPTS_KEPT
    assert found_stride(StudyConfig().replace_flat({"optim.num_steps": 10, "erase.warmup_steps": 10})) == 1


def test_prompts_inside_the_domain_score_high_and_outside_it_low(pipe):
    conditioner = TextConditioner(pipe)
    inside = [build_attack_prompt(conditioner, "triangle", template=t) for t in TEMPLATES]
    outside = [build_attack_prompt(conditioner, "circle", template=t) for t in TEMPLATES]
    hit = found_prompt_concept_rate(pipe, conditioner, inside, concept="triangle", seed=0)
    miss = found_prompt_concept_rate(pipe, conditioner, outside, concept="triangle", seed=0)
    assert hit["found_prompt_concept_rate_n"] == 2 * len(TEMPLATES) and hit["found_prompts"] == len(TEMPLATES)
    assert hit["found_prompt_concept_rate"] >= 0.75 and miss["found_prompt_concept_rate"] <= 0.25
    low, high = hit["found_prompt_concept_rate_ci95"]
    assert low <= hit["found_prompt_concept_rate"] <= high
    # the same prompts and seed give the same images
    again = found_prompt_concept_rate(pipe, conditioner, inside, concept="triangle", seed=0)
    assert again == hit


def test_found_prompt_bad_input(pipe):
    conditioner = TextConditioner(pipe)
    with pytest.raises(ValueError, match="no found prompts"):
        found_prompt_concept_rate(pipe, conditioner, [], concept="triangle")
    with pytest.raises(ValueError, match="seeds_per_prompt"):
        found_prompt_concept_rate(pipe, conditioner, [build_attack_prompt(conditioner, "triangle", template="a {}")],
                                  concept="triangle", seeds_per_prompt=0)
