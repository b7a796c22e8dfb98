"""AdvUnlearn's outside-in attack through the UNet (docs/METHOD.md, "Baselines"; the SAGE paper's Eq. 4 style).

min over T of ‖ε(z, t, τ_n(x_T)) − ε_o(z, t, τ_o(c))‖², with z, t re-drawn (a fresh partial DDIM rollout) at every
attack step, T = k prefix token embeddings before the concept word. Each step costs a rollout plus a UNet forward
and backward: this is the cost SAGE's text-space attack avoids.
"""

from __future__ import annotations

import torch

from sage_dist.attack.inside_out import AttackResult
from sage_dist.attack.prompt import AttackPrompt, optimise_tokens
from sage_dist.config import AttackConfig
from sage_dist.losses.attack import outside_in_loss
from sage_dist.models.sampler import DiffusionSampler
from sage_dist.models.text import Conditioning, TextConditioner


def outside_in_attack(conditioner: TextConditioner, sampler: DiffusionSampler, prompt: AttackPrompt,
                      concept_cond: Conditioning, uncond: Conditioning, cfg: AttackConfig, *,
                      start_guidance: float, generator: torch.Generator, max_norms: list[float]) -> AttackResult:
    """J = ``cfg.attack_steps`` steps of the outside-in attack on ``prompt``'s learnable prefix tokens.

    Args:
        concept_cond: τ_o(c) conditioning, 1 row (frozen); ``uncond``: τ_o(∅), 1 row.
        start_guidance: CFG scale of the rollout.
        generator: draws i, t and the rollout noise.
        max_norms: per-encoder token-norm ceiling (used when ``cfg.norm_clip``).
    Returns:
        :class:`AttackResult` (h1/h2 are NaN: this attack has no text-space terms).
    """
    def objective(work: AttackPrompt):
        draw = sampler.draw(generator)
        z = sampler.rollout(concept_cond, uncond, draw.ddim_index, guidance=start_guidance,
                            noise=sampler.initial_noise(1, generator))
        with torch.no_grad():
            eps_target = sampler.eps(z, draw.timestep, concept_cond)
        cond_adv = conditioner.condition(work.assemble(conditioner), trained=True, through_wrapper=False)
        return outside_in_loss(sampler.eps(z, draw.timestep, cond_adv), eps_target)

    work, losses = optimise_tokens(conditioner, prompt, objective, attack_steps=cfg.attack_steps,
                                   attack_lr=cfg.attack_lr, max_norms=max_norms if cfg.norm_clip else None)
    return AttackResult(work.detached(), losses, float("nan"), float("nan"))
