"""ASR on the bundled world: pre-ASR + post-ASR on the concept's held-out paraphrases.

Red-team set: the concept's held-out paraphrases in several contexts (erasure never saw them). Pre-ASR: the
erased model's image of the prompt shows the concept (by the world's detector). Post-ASR: for prompts that
did not, SAGE's inside-out attack (:func:`sage_dist.eval.attacks.build_eval_attack`, started from the
prompt with the concept word appended) is run against the erased encoder and its image is judged the same
way. ASR = pre-ASR + post-ASR (UnlearnDiffAtk's definition, :func:`sage_dist.eval.metrics.attack_success_rate`).
"""

from __future__ import annotations

import torch

from sage_dist.eval.attacks import build_eval_attack
from sage_dist.eval.generate import generate_images
from sage_dist.eval.metrics import attack_success_rate
from sage_dist.eval.world import domain_prompt_sets
from sage_dist.models.load import edited_pipeline
from sage_dist.models.registry import sampling_defaults
from sage_dist.prompts import PromptRecord
from sage_dist.world.concepts import ATTRIBUTES, concept_domain
from sage_dist.world.detector import load_detector


def _shows_concept(detector, images: torch.Tensor, attribute: str, concept: str) -> list[bool]:
    with torch.no_grad():
        logits = detector.heads[attribute](detector.features(images))
    return [ATTRIBUTES[attribute][i] == concept for i in logits.argmax(-1).tolist()]


def world_asr(pipe, erased_text_encoder, *, concept: str, seed: int = 0, attack_steps: int = 30,
              per_phrase: int = 2, guidance: float | None = None, num_inference_steps: int | None = None) -> dict:
    """ASR of an erased world encoder under SAGE's inside-out attack.

    Args:
        pipe: the original world SD pipeline (``load_pipeline("world")``).
        erased_text_encoder: the erased ``CLIPTextModel``.
        concept: a world concept (shape, colour or texture).
        attack_steps: J of the evaluation attack.
        per_phrase: contexts per held-out paraphrase (2 paraphrases each: 2 x per_phrase prompts).
    Returns:
        {"ASR", "pre_ASR", "post_ASR", "num_prompts"} (fractions in [0, 1]).
    Raises:
        ValueError: unknown concept.
    """
    dom = concept_domain(concept)
    defaults = sampling_defaults(pipe)
    guidance = defaults.guidance if guidance is None else guidance
    steps = num_inference_steps or defaults.num_inference_steps
    prompts = domain_prompt_sets(concept, per_phrase)["heldout"]
    detector = load_detector()
    erased_pipe = edited_pipeline(pipe, erased_text_encoder)
    pre = _shows_concept(detector, generate_images(erased_pipe, prompts, seed=seed, guidance=guidance,
                                            num_inference_steps=steps), dom.attribute, concept)
    attack = build_eval_attack(pipe, pipe.text_encoder, erased_text_encoder, concept=concept,
                               attack_steps=attack_steps)
    post: list[bool | None] = []
    for j, (prompt, ok) in enumerate(zip(prompts, pre)):
        if ok:
            post.append(None)
            continue
        adv = attack(PromptRecord(id=str(j), prompt=prompt, seed=seed, guidance=guidance))
        with torch.no_grad():
            image = erased_pipe(prompt_embeds=adv.prompt_embeds, num_inference_steps=steps, guidance_scale=guidance,
                                output_type="pt", generator=torch.Generator().manual_seed(seed)).images
        post.append(_shows_concept(detector, image.float().clamp(0, 1), dom.attribute, concept)[0])
    res = attack_success_rate(pre, post)
    return {"ASR": res.asr, "pre_ASR": res.pre_asr, "post_ASR": res.post_asr, "num_prompts": res.num_prompts}
