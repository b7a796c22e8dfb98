"""AdvUnlearn's outside-in attack through the UNet (spec §1.6 "Outside-in baseline", paper Eq. 4 style).

min over T of ‖ε(z, t, τ_n(x_T)) − ε_o(z, t, τ_o(c))‖², with z, t re-drawn (a fresh partial DDIM rollout)
at every attack step, T = k prefix token embeddings before the concept word. Each step costs a rollout
plus a UNet forward and backward: this is the cost SAGE's text-space attack avoids.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sage_dist.attack.inside_out import AttackResult
from sage_dist.attack.prompt import AttackPrompt, attack_update, clip_token_norms
from sage_dist.config import AttackConfig
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
    work = prompt.detached()
    init = [t.clone() for t in work.tokens]
    leaves = [work.tokens[e].requires_grad_(True) for e in conditioner.train_encoders]
    optimizer = torch.optim.Adam(leaves, lr=cfg.attack_lr) if cfg.attack_optimizer == "adam" else None
    losses: list[float] = []
    for _ in range(cfg.attack_steps):
        draw = sampler.draw(generator)
        z = sampler.rollout(concept_cond, uncond, draw.ddim_index, guidance=start_guidance,
                            noise=sampler.initial_noise(1, generator))
        with torch.no_grad():
            eps_target = sampler.eps(z, draw.timestep, concept_cond)
        cond_adv = conditioner.condition(work.assemble(conditioner), trained=True, through_wrapper=False)
        eps_adv = sampler.eps(z, draw.timestep, cond_adv)
        loss: Tensor = torch.mean((eps_adv - eps_target) ** 2)
        grads = torch.autograd.grad(loss, leaves)
        losses.append(loss.item())
        with torch.no_grad():
            attack_update(leaves, grads, optimizer, attack_lr=cfg.attack_lr)
            for e, leaf in zip(conditioner.train_encoders, leaves):
                if cfg.outside_in_radius > 0:
                    delta = clip_token_norms(leaf - init[e], cfg.outside_in_radius)
                    leaf.copy_(init[e] + delta)
                if cfg.norm_clip:
                    leaf.copy_(clip_token_norms(leaf, max_norms[e]))
    return AttackResult(work.detached(), losses, float("nan"), float("nan"))
