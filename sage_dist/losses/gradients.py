"""Cosine between per-concept gradients: how much erasing several concepts at once pulls the encoder apart."""

from __future__ import annotations

import itertools

import torch
from torch import Tensor


def pairwise_cosines(gradients: dict[str, Tensor]) -> dict[str, float]:
    """Cosine of every pair of flat gradients ``[P]`` (keys ``"<a>|<b>"``, names sorted).

    >>> pairwise_cosines({"a": torch.tensor([1., 0.]), "b": torch.tensor([1., 1.])})["a|b"]  # doctest: +ELLIPSIS
    0.7071...
    """
    return {f"{a}|{b}": float(torch.nn.functional.cosine_similarity(gradients[a], gradients[b], dim=0))
            for a, b in itertools.combinations(sorted(gradients), 2)}


def interference(gradients: dict[str, Tensor]) -> dict[str, float]:
    """``{"interference_cos": mean pairwise cosine, "interference_cos_min": the smallest, "<a>|<b>": each}`` of
    per-concept flat gradients ``[P]``; NaN for a single concept. Near 0 the concepts' updates are independent,
    positive they help each other, negative they pull the encoder apart.

    >>> interference({"a": torch.tensor([1., 0.]), "b": torch.tensor([0., 1.])})["interference_cos"]
    0.0
    """
    pairs = pairwise_cosines(gradients)
    if not pairs:
        return {"interference_cos": float("nan"), "interference_cos_min": float("nan")}
    values = list(pairs.values())
    return {"interference_cos": sum(values) / len(values), "interference_cos_min": min(values), **pairs}
