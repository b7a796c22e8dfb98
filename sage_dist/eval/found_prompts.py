"""Semantic drift of the prompts SAGE's self-check found during training (docs/METHOD.md "Self-check").

The inside-out attack optimises template tokens so that the original encoder still reads the prompt as the
concept (H1) while the edited encoder has not erased it (H2). Without H1 (the H2-only ablation) nothing keeps
the prompt in the concept's domain: the attack may find prompts that the *original* model no longer renders as
the concept, and erasure then trains on prompts outside the domain ("semantic drift", the paper's failure mode
of H2-only). The measurement: each kept prompt (:attr:`sage_dist.train.step.ConceptState.found`) is encoded by
the original text encoder τ_o, rendered by the original model from ``seeds_per_prompt`` noise seeds, and judged
by the world's detector. ``found_prompt_concept_rate`` is the share of those images that show the concept (a
Wilson interval over images); a low rate means the attack left the domain.

Bundled world only (the detector is the judge); the noise seeds are offset from every other evaluation's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from sage_dist.attack.prompt import AttackPrompt
from sage_dist.eval.metrics import wilson_interval
from sage_dist.eval.world import image_seeds, read_images, render, shows
from sage_dist.models.registry import sampling_defaults
from sage_dist.models.text import TextConditioner
from sage_dist.world.concepts import concept_domain
from sage_dist.world.detector import load_detector

FOUND_PROMPT_SEED_OFFSET = 700_000
"""Noise-seed offset of the found-prompt renders (:func:`sage_dist.eval.world.image_seeds`), apart from the
domain (0), red-team and retain images."""


@torch.no_grad()
def found_prompt_concept_rate(pipe, conditioner: TextConditioner, prompts: Sequence[AttackPrompt], *, concept: str,
                              seed: int = 0, seeds_per_prompt: int = 2, detector=None) -> dict[str, Any]:
    """Concept rate of the original model on the attack's found prompts (module docstring).

    Args:
        pipe: the original world SD pipeline (its UNet renders; ``conditioner`` holds its text encoder τ_o).
        conditioner: the erasure's :class:`~sage_dist.models.text.TextConditioner` (the prompts' token tables).
        prompts: found attack prompts, each ``ids [77]``, ``tokens [m, D]`` float (attack/prompt.py).
        concept: the erased concept (its attribute's detector head judges).
        seed: the trial seed (noise seeds ``image_seeds(seed, ..., FOUND_PROMPT_SEED_OFFSET)``).
        seeds_per_prompt: images per prompt.
    Returns:
        ``found_prompt_concept_rate`` (float in [0, 1]), ``_ci95`` (Wilson, over images), ``_n`` (images),
        ``_k`` (images that show the concept), ``found_prompts`` (prompts judged).
    Raises:
        ValueError: no prompts, ``seeds_per_prompt < 1``, or an unknown concept.
    """
    concept_domain(concept)
    if not prompts:
        raise ValueError("found_prompt_concept_rate: no found prompts (the method ran no inside-out attack)")
    if seeds_per_prompt < 1:
        raise ValueError(f"seeds_per_prompt={seeds_per_prompt}: must be >= 1")
    detector = detector if detector is not None else load_detector()
    embeds = torch.cat([conditioner.condition(p.assemble(conditioner), trained=False).encoder_hidden_states
                        for p in prompts])
    embeds = embeds.repeat_interleave(seeds_per_prompt, dim=0)
    negative = conditioner.uncond(1).encoder_hidden_states
    defaults = sampling_defaults(pipe)
    seeds = image_seeds(seed, embeds.shape[0], FOUND_PROMPT_SEED_OFFSET)
    images = render(pipe, seeds=seeds, guidance=defaults.guidance, num_inference_steps=defaults.num_inference_steps,
                    prompt_embeds=embeds.float(), negative_prompt_embeds=negative.float())
    hits = shows(read_images(detector, images), concept)
    k, n = int(hits.sum()), int(hits.size)
    return {"found_prompt_concept_rate": k / n, "found_prompt_concept_rate_ci95": list(wilson_interval(k, n)),
            "found_prompt_concept_rate_n": n, "found_prompt_concept_rate_k": k, "found_prompts": len(prompts)}
