"""Shared by the world evaluation tests: an encoder that no longer draws what it is asked for."""

from __future__ import annotations

import copy

import torch


def scrambled_text_encoder(pipe) -> torch.nn.Module:
    """A copy of ``pipe.text_encoder`` whose token embeddings are permuted (seed 0): its images no longer show the
    prompted concept, so it erases it (and everything else)."""
    encoder = copy.deepcopy(pipe.text_encoder)
    with torch.no_grad():
        weight = encoder.get_input_embeddings().weight
        weight.copy_(weight[torch.randperm(weight.shape[0], generator=torch.Generator().manual_seed(0))])
    return encoder
