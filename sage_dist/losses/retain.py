"""Global-local retention: the semantic-graph loss, the Top-k selection and the local ``retain_loss``
(docs/METHOD.md, "Global-local retention")."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor


def cosine_graph(features_ND: Tensor) -> Tensor:
    """Pairwise cosine similarities S_ij = cos(f_i, f_j). ``[N, D]`` -> ``[N, N]``."""
    unit = F.normalize(features_ND, dim=-1)
    return unit @ unit.T


def graph_loss(features_trained_ND: Tensor, features_original_ND: Tensor, *, kind: Literal["mse", "kl"] = "mse",
               temperature: float = 0.1) -> Tensor:
    """L_graph between the trained and the original encoder's graphs over N retain prompts .

    "mse" (default): (1/N²) Σ_ij (S^n_ij − S^o_ij)². "kl": mean over rows i of
    KL(softmax(S^o_i / τ) ‖ softmax(S^n_i / τ)). ``features_original_ND`` is treated as a constant.

    Args:
        features_trained_ND, features_original_ND: ``[N, D]`` pooled features g_n(r), g_o(r).
    Returns:
        scalar tensor.
    Raises:
        ValueError: fewer than 2 nodes, or an unknown ``kind``.
    """
    if features_trained_ND.shape[0] < 2:
        raise ValueError("graph_loss needs at least 2 retain prompts (retain.retain_batch_size >= 2).")
    s_new = cosine_graph(features_trained_ND)
    s_old = cosine_graph(features_original_ND).detach()
    if kind == "mse":
        return torch.mean((s_new - s_old) ** 2)
    if kind == "kl":
        log_p_new = F.log_softmax(s_new / temperature, dim=-1)
        p_old = F.softmax(s_old / temperature, dim=-1)
        return F.kl_div(log_p_new, p_old, reduction="batchmean")
    raise ValueError(f"graph loss kind {kind!r}: allowed 'mse' or 'kl'")


def select_top_k(scores_N: Tensor, k: int, *, tie_tolerance: float = 1e-6) -> Tensor:
    """Indices of the ``k`` lowest scores (the retain prompts whose s_i = cos(g_n, g_o) is lowest,
    i.e. the most disturbed). ``[N]`` -> ``[min(k, N)]`` int64, ascending score.

    Scores are compared on a grid of ``tie_tolerance``: scores that round to the same multiple count as tied and
    ties break by lower index. Without it, floating-point rounding would decide between prompts that are tied in
    exact arithmetic (at the first step τ_n = τ_o, so every s_i is 1 up to rounding), and rounding differs
    between CPU kernels.
    """
    k = min(k, scores_N.shape[0])
    order = torch.sort(torch.round(scores_N.detach().double() / tie_tolerance), stable=True).indices
    return order[:k]


def retain_loss(eps_student_BCHW: Tensor, eps_original_BCHW: Tensor) -> Tensor:
    """The local retention loss (the paper's L_image): mean over the selected retain prompts and all elements of
    (ε(z_i, t, τ_n(r_i)) − ε_o(z_i, t, τ_o(r_i)))² (AdvUnlearn's retain regulariser). ``[B, C, H, W]`` each;
    returns a scalar, 0 for B == 0."""
    if eps_student_BCHW.shape[0] == 0:
        return eps_student_BCHW.sum() * 0.0
    return torch.mean((eps_student_BCHW - eps_original_BCHW) ** 2)
