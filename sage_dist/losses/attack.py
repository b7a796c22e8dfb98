"""The attacks' objectives: SAGE's inside-out H1/H2 in text-feature space and AdvUnlearn's outside-in loss
(docs/METHOD.md, "Self-check").

All features are L2-normalised pooled features ``[B, D]`` or final-LN sequences ``[B, L, D]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def h1_concept_similarity(g_original_x_BD: Tensor, g_original_c_BD: Tensor) -> Tensor:
    """H1 = cos(g_o(x_T), g_o(c)): the frozen model still reads the attack prompt as the concept. ``[B]``."""
    return F.cosine_similarity(g_original_x_BD, g_original_c_BD, dim=-1)


def sequence_cosine(seq_a_BLD: Tensor, seq_b_BLD: Tensor, eot_index_B: Tensor) -> Tensor:
    """Mean per-position cosine over positions 1..EOT (SOT is prompt-independent). ``[B, L, D]`` x2 -> ``[B]``."""
    cos_BL = F.cosine_similarity(seq_a_BLD, seq_b_BLD, dim=-1)
    pos = torch.arange(cos_BL.shape[1], device=cos_BL.device)[None, :]
    mask = ((pos >= 1) & (pos <= eot_index_B[:, None])).to(cos_BL.dtype)
    return (cos_BL * mask).sum(1) / mask.sum(1)


def h2_not_erased(g_trained_x_BD: Tensor, g_reference_BD: Tensor, *, seq_trained_BLD: Tensor | None = None,
                  seq_original_BLD: Tensor | None = None, eot_index_B: Tensor | None = None) -> Tensor:
    """H2: how much the trained encoder still maps the prompt where the reference does (the self-check).

    Default reference g_o(x_T) (optionally averaged with the per-token sequence cosine); the alternative
    reading passes g_o(c) as reference and no sequences. Returns ``[B]``.
    """
    h2 = F.cosine_similarity(g_trained_x_BD, g_reference_BD, dim=-1)
    if seq_trained_BLD is not None:
        assert seq_original_BLD is not None and eot_index_B is not None
        h2 = 0.5 * (h2 + sequence_cosine(seq_trained_BLD, seq_original_BLD, eot_index_B))
    return h2


def attack_loss(h1_B: Tensor, h2_B: Tensor, *, h1_weight: float = 1.0, h2_weight: float = 1.0) -> Tensor:
    """SAGE's inside-out attack loss L_atk = mean_B(−λ2·H2 − λ1·H1) (docs/METHOD.md "Self-check"; λ2 = 1 in the
    method, 0 or λ1 = 0 are the H1-only / H2-only ablations), minimised over the template embeddings.
    ``[B]`` x2 -> scalar."""
    return (-h2_weight * h2_B - h1_weight * h1_B).mean()


def outside_in_loss(eps_adversarial_BCHW: Tensor, eps_target_BCHW: Tensor) -> Tensor:
    """AdvUnlearn's outside-in attack loss ‖ε(z, t, τ_n(x_T)) − ε_o(z, t, τ_o(c))‖² (mean over elements), minimised
    over the prefix tokens T. ``[B, C, H, W]`` x2 -> scalar."""
    return torch.mean((eps_adversarial_BCHW - eps_target_BCHW) ** 2)
