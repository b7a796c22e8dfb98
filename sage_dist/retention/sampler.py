"""Retain-batch sampling without replacement (docs/METHOD.md "Hyper-parameters" pitfalls: AdvUnlearn resets the pool when fewer
unseen prompts remain than one batch)."""

from __future__ import annotations

import torch


class RetainSampler:
    """Draws batches of ``batch_size`` distinct prompts; every prompt is seen once before any repeats.

    Raises:
        ValueError: fewer prompts than ``batch_size`` (checked at construction).
    """

    def __init__(self, prompts: list[str], batch_size: int, generator: torch.Generator):
        if len(prompts) < batch_size:
            raise ValueError(f"the retain set has {len(prompts)} prompts, fewer than retain.retain_batch_size="
                             f"{batch_size}; lower retain_batch_size or use a larger retain set")
        self.prompts = list(prompts)
        self.batch_size = batch_size
        self.generator = generator
        self.order = torch.randperm(len(self.prompts), generator=generator)
        self.position = 0

    def next_batch(self) -> list[str]:
        """The next ``batch_size`` prompts (a fresh permutation when the current one runs short)."""
        if self.position + self.batch_size > len(self.prompts):
            self.order = torch.randperm(len(self.prompts), generator=self.generator)
            self.position = 0
        idx = self.order[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return [self.prompts[int(i)] for i in idx]

    def state(self) -> dict[str, torch.Tensor]:
        return {"order": self.order.clone(), "position": torch.tensor(self.position)}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.order = state["order"].clone()
        self.position = int(state["position"])
