"""Retain-batch sampling without replacement (docs/METHOD.md "Hyper-parameters" pitfalls: AdvUnlearn resets the pool when fewer
unseen prompts remain than one batch)."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


class RetainSampler:
    """Draws batches of ``batch_size`` distinct prompts from a random permutation of the distinct prompts.

    A pass over one permutation yields ``n // batch_size`` batches, none repeating a prompt of the pass; when
    fewer than ``batch_size`` prompts of the permutation are left they are dropped and a fresh permutation
    starts (AdvUnlearn's reset), so a batch never spans two permutations and never holds a prompt twice.
    Every prompt is drawn equally often in expectation. Repeated prompts in ``prompts`` are removed (first
    occurrences kept, with a warning), since they would otherwise be drawn more often and could share a batch;
    for a list without repeats the draws depend only on ``generator`` and ``len(prompts)``.

    Raises:
        ValueError: fewer distinct prompts than ``batch_size``, or ``batch_size`` < 1 (checked at construction).
    """

    def __init__(self, prompts: list[str], batch_size: int, generator: torch.Generator):
        distinct = list(dict.fromkeys(prompts))
        if len(distinct) < len(prompts):
            log.warning("retain sampler: %d repeated prompt(s) removed (each prompt is drawn equally often)",
                        len(prompts) - len(distinct))
        if batch_size < 1:
            raise ValueError(f"retain.retain_batch_size={batch_size}: must be >= 1")
        if len(distinct) < batch_size:
            raise ValueError(f"the retain set has {len(distinct)} distinct prompts, fewer than "
                             f"retain.retain_batch_size={batch_size}; lower retain_batch_size or use a larger "
                             "retain set")
        self.prompts = distinct
        self.batch_size = batch_size
        self.generator = generator
        self.order = torch.randperm(len(self.prompts), generator=generator)
        self.position = 0

    def next_batch(self) -> list[str]:
        """The next ``batch_size`` distinct prompts (a fresh permutation when the current one runs short)."""
        if self.position + self.batch_size > len(self.prompts):
            self.order = torch.randperm(len(self.prompts), generator=self.generator)
            self.position = 0
        idx = self.order[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return [self.prompts[int(i)] for i in idx]

    def state(self) -> dict[str, torch.Tensor]:
        return {"order": self.order.clone(), "position": torch.tensor(self.position)}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Continue from :meth:`state` of a sampler over the same prompts.

        Raises:
            ValueError: the state belongs to a retain set of another size (the run's ``retain.retain_prompts``
                changed since the checkpoint), or it is not a permutation with a position inside it.
        """
        order, position = state["order"], int(state["position"])
        n = len(self.prompts)
        if order.numel() != n or not torch.equal(torch.sort(order.long()).values, torch.arange(n)):
            raise ValueError(f"the checkpoint's retain sampler state is for a set of {order.numel()} prompts, but "
                             f"this run's retain set has {n} distinct prompts; resume with the retain.retain_prompts "
                             "the checkpoint was made with")
        if not 0 <= position <= n:
            raise ValueError(f"the checkpoint's retain sampler position {position} lies outside its {n} prompts")
        self.order = order.clone()
        self.position = position
