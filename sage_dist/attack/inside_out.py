"""SAGE's inside-out self-check attack in text-feature space (docs/METHOD.md, "Self-check").

Starting from the concept inside a template, J optimiser steps on the template embeddings minimise
L_atk = −H2 − λ1·H1, with H1 = cos(g_o(x), g_o(c)) and H2 = cos(g_n(x), g_o(x)) by default. Only text-encoder
passes: no UNet, no sampling. τ_n and τ_o are frozen during the attack; the gradient reaches only the template
embeddings.

Features are computed over the first EOT+1 positions only: CLIP is causal, so those states do not depend on the
padding, and H1/H2 never read padding positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sage_dist.attack.prompt import AttackPrompt, optimise_tokens
from sage_dist.config import AttackConfig
from sage_dist.losses.attack import attack_loss, h1_concept_similarity, h2_not_erased
from sage_dist.models.text import TextConditioner


@dataclass
class AttackResult:
    prompt: AttackPrompt
    """The optimised prompt (detached)."""
    losses: list[float]
    """The attack loss before each step and after the last (J + 1 values)."""
    h1: float
    """H1 at the end (NaN for an attack without text-space terms)."""
    h2: float
    """H2 at the end (NaN likewise)."""


def _objective(conditioner: TextConditioner, prompt: AttackPrompt, concept_features: list[Tensor],
               cfg: AttackConfig) -> tuple[Tensor, Tensor, Tensor]:
    """(L_atk, H1 [B], H2 [B]) of ``prompt``, averaged over the trained encoders."""
    batch = prompt.assemble(conditioner)
    length = prompt.eot_index + 1
    cond_o = conditioner.condition(batch, trained=False, length=length)
    cond_n = conditioner.condition(batch, trained=True, length=length, through_wrapper=False)
    h1s, h2s = [], []
    for e in conditioner.train_encoders:
        h1s.append(h1_concept_similarity(cond_o.features[e], concept_features[e]))
        if cfg.objective == "h2_original":
            seq = cfg.features == "pooled+sequence"
            h2s.append(h2_not_erased(cond_n.features[e], cond_o.features[e],
                                     seq_trained_BLD=cond_n.final[e] if seq else None,
                                     seq_original_BLD=cond_o.final[e] if seq else None,
                                     eot_index_B=batch.eot_index if seq else None))
        else:
            h2s.append(h2_not_erased(cond_n.features[e], concept_features[e]))
    h1, h2 = torch.stack(h1s).mean(0), torch.stack(h2s).mean(0)
    return attack_loss(h1, h2, h1_weight=cfg.h1_weight, h2_weight=cfg.h2_weight), h1, h2


def inside_out_attack(conditioner: TextConditioner, prompt: AttackPrompt, concept_features: list[Tensor],
                      cfg: AttackConfig, *, max_norms: list[float]) -> AttackResult:
    """Run J = ``cfg.attack_steps`` steps of the inside-out attack on ``prompt``'s learnable tokens.

    Args:
        conditioner: holds τ_o (frozen) and τ_n (frozen for the attack).
        prompt: initial attack prompt (its tokens are not modified in place).
        concept_features: g_o(c) per encoder, ``[1, D_e]`` in the conditioner's ``train_dtype``.
        cfg: attack settings (steps, lr, objective, weights, norm clip).
        max_norms: per-encoder token-norm ceiling (used when ``cfg.norm_clip``).
    Returns:
        :class:`AttackResult` with the optimised (detached) prompt and the loss trace.
    """
    work, losses = optimise_tokens(conditioner, prompt, lambda p: _objective(conditioner, p, concept_features, cfg)[0],
                                   attack_steps=cfg.attack_steps, attack_lr=cfg.attack_lr,
                                   max_norms=max_norms if cfg.norm_clip else None)
    with torch.no_grad():
        loss, h1, h2 = _objective(conditioner, work, concept_features, cfg)
    losses.append(float(loss))
    return AttackResult(work.detached(), losses, float(h1.mean()), float(h2.mean()))
