"""Pure tensor losses of SAGE and its baselines (no modules, schedulers, devices or RNGs in here).

Shape-suffix legend: B batch, C latent channels, H/W latent height/width, N nodes (prompts), D feature width,
P flattened parameters.
"""

from sage_dist.losses.attack import (
           attack_loss,
           h1_concept_similarity,
           h2_not_erased,
           outside_in_loss,
           sequence_cosine,
)
from sage_dist.losses.erase import erase_loss, esd_target, row_mse
from sage_dist.losses.gradients import interference, pairwise_cosines
from sage_dist.losses.retain import cosine_graph, graph_loss, retain_loss, select_top_k

__all__ = ["attack_loss", "h1_concept_similarity", "h2_not_erased", "outside_in_loss", "sequence_cosine",
           "erase_loss", "esd_target", "row_mse", "interference", "pairwise_cosines", "cosine_graph", "graph_loss",
           "retain_loss", "select_top_k"]
