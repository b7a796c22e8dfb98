"""ASR on the bundled world under SAGE's own inside-out attack: pre-ASR + post-ASR on held-out paraphrases.

The attack SAGE trains against (:func:`sage_dist.eval.attacks.build_eval_attack`), so it is not independent of
SAGE: the independent red team (UnlearnDiffAtk's prefix tokens, a Ring-A-Bell-style concept direction) is
:func:`sage_dist.eval.red_team.red_team_world`, which this function calls with the inside-out attack only.

Red-team set: ``2 x per_phrase`` prompts, the concept's held-out paraphrases in the domain's contexts. Each
post-attack image is rendered from the attacked conditioning on the initial latents of its own prompt's seed,
the latents of its pre-attack image (:func:`sage_dist.eval.world.render`).
"""

from __future__ import annotations

import dataclasses

from sage_dist.eval.red_team import red_team_world
from sage_dist.presets import WORLD_EVAL_FULL


def world_asr(pipe, erased_text_encoder, *, concept: str, seed: int = 0, attack_steps: int = 30,
              per_phrase: int = 2, guidance: float | None = None, num_inference_steps: int | None = None,
              unet=None, out_dir=None) -> dict:
    """ASR of an erased world encoder (and/or UNet) under SAGE's inside-out attack.

    Args:
        pipe: the original world SD pipeline (``load_pipeline("world")``).
        erased_text_encoder: the erased ``CLIPTextModel`` (None: the original's).
        concept: a world concept (shape, colour or texture).
        attack_steps: J of the evaluation attack.
        per_phrase: contexts per held-out paraphrase (2 paraphrases each: 2 x per_phrase prompts, >= 1).
        unet: an edited UNet (ESD-x).
        out_dir: where the adversarial prompts are saved.
    Returns:
        {"ASR", "pre_ASR", "post_ASR", "num_prompts"} (fractions in [0, 1]) and each rate's ``_ci95`` / ``_n``.
    Raises:
        ValueError: unknown concept, ``per_phrase < 1``.
    """
    if per_phrase < 1:
        raise ValueError(f"per_phrase={per_phrase}: use >= 1")
    fidelity = dataclasses.replace(WORLD_EVAL_FULL, name="inside-out", red_team_prompts=2 * per_phrase,
                                   inside_out_steps=attack_steps)
    res = red_team_world(pipe, erased_text_encoder, concept=concept, unet=unet, fidelity=fidelity, seed=seed,
                         guidance=guidance, num_inference_steps=num_inference_steps, attacks=("inside_out",),
                         out_dir=out_dir)
    out = {"num_prompts": 2 * per_phrase}
    for key, source in (("ASR", "ASR_inside_out"), ("post_ASR", "post_ASR_inside_out"), ("pre_ASR", "pre_ASR")):
        for suffix in ("", "_ci95", "_n"):
            out[f"{key}{suffix}"] = res[f"{source}{suffix}"]
    return out
