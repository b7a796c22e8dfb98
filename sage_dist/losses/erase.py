"""ESD-style negative-guidance erase loss and the predicted-noise retention loss (spec §1.4, §1.7b)."""

from __future__ import annotations

import torch
from torch import Tensor


def esd_target(eps_uncond_BCHW: Tensor, eps_concept_BCHW: Tensor, *, negative_guidance: float) -> Tensor:
    """Negative-guidance target e_∅ − η (e_c − e_∅) (spec §1.4; ESD, AdvUnlearn).

    Args:
        eps_uncond_BCHW: frozen model's prediction for the empty prompt, ``[B, C, H, W]``.
        eps_concept_BCHW: frozen model's prediction for the concept, same shape.
        negative_guidance: η >= 0; η = 0 gives ``eps_uncond``.
    Returns:
        ``[B, C, H, W]``, no gradient expected through it (callers pass detached tensors).
    """
    return eps_uncond_BCHW - negative_guidance * (eps_concept_BCHW - eps_uncond_BCHW)


def erase_loss(eps_student_BCHW: Tensor, eps_uncond_BCHW: Tensor, eps_concept_BCHW: Tensor, *,
               negative_guidance: float) -> Tensor:
    """L_erase = mean over all elements of (ε(z, t, τ_n(x)) − target)² (spec §1.4, reduction "mean").

    All inputs ``[B, C, H, W]`` float; returns a scalar. The gradient is zero when the student equals the target.
    """
    target = esd_target(eps_uncond_BCHW, eps_concept_BCHW, negative_guidance=negative_guidance)
    return torch.mean((eps_student_BCHW - target) ** 2)


def noise_retain_loss(eps_student_BCHW: Tensor, eps_original_BCHW: Tensor) -> Tensor:
    """L_image = mean over selected prompts and elements of (ε(z_i, t, τ_n(r_i)) − ε_o(z_i, t, τ_o(r_i)))²
    (spec §1.7b; AdvUnlearn's retain regulariser). ``[B, C, H, W]`` each; scalar; 0 for B == 0."""
    if eps_student_BCHW.shape[0] == 0:
        return eps_student_BCHW.sum() * 0.0
    return torch.mean((eps_student_BCHW - eps_original_BCHW) ** 2)
