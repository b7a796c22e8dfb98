"""ESD-style negative-guidance erase loss (docs/METHOD.md, "Self-erasure"; ESD and AdvUnlearn)."""

from __future__ import annotations

import torch
from torch import Tensor


def esd_target(eps_uncond_BCHW: Tensor, eps_concept_BCHW: Tensor, *, negative_guidance: float) -> Tensor:
    """Negative-guidance target e_∅ − η (e_c − e_∅) (docs/METHOD.md; ESD, AdvUnlearn).

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
    """L_erase = mean over all elements of (ε(z, t, τ_n(x)) − target)² (reduction "mean").

    All inputs ``[B, C, H, W]`` float; returns a scalar. The gradient is zero when the student equals the target.
    """
    target = esd_target(eps_uncond_BCHW, eps_concept_BCHW, negative_guidance=negative_guidance)
    return torch.mean((eps_student_BCHW - target) ** 2)


def row_mse(eps_student_BCHW: Tensor, eps_target_BCHW: Tensor) -> Tensor:
    """Mean squared error of each row: ``[B, C, H, W]`` x2 -> ``[B]``. A row's share of :func:`erase_loss` or
    :func:`~sage_dist.losses.retain.retain_loss` when the student pass runs in chunks of rows."""
    return ((eps_student_BCHW - eps_target_BCHW) ** 2).flatten(1).mean(1)
