"""Interference between concepts erased together: cosine between per-concept erase gradients (docs/METHOD.md "Several concepts").

For concepts c_1..c_n and the current trainable encoder(s) θ, g_i = ∇_θ L_erase(c_i) is the gradient of the
erase loss of concept i's own word, averaged over a few fixed (i, t, noise) draws (the same draws at every
measurement, so measurements along a run are comparable). The interference of the set is the mean pairwise
cosine cos(g_i, g_j) over i < j: near 0 the concepts' updates are independent, positive they help each other,
negative they pull the encoder apart.

The engine's loop does not expose its training state per step, so the measurement is a separate small pass
(:class:`InterferenceProbe`): its own ``Eraser`` (method "esd", the same frozen model) into which the run's
checkpointed encoder weights are loaded. Cost: ``num_draws`` rollouts and UNet passes per concept.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from safetensors.torch import load_file

from sage_dist.config import StudyConfig
from sage_dist.losses import erase_loss, interference
from sage_dist.models.text import Conditioning
from sage_dist.train.step import Eraser


class InterferenceProbe:
    """Per-concept erase gradients of an encoder state, measured on fixed draws (module docstring).

    Args:
        cfg: the run's configuration (its concepts, model, encoders, η and start guidance are used).
        pipe: the run's frozen pipeline.
        num_draws: (i, t, noise) draws averaged per concept.
    """

    def __init__(self, cfg: StudyConfig, pipe, *, num_draws: int = 2, seed: int = 12345):
        probe_cfg = dataclasses.replace(cfg, erase=dataclasses.replace(cfg.erase, method="esd", rollout_cache=False,
                                                                        warmup_steps=0))
        self.eraser = Eraser(probe_cfg, pipe, [])
        self.num_draws, self.seed = num_draws, seed

    def load(self, trainable_state: dict[str, torch.Tensor] | str | Path) -> None:
        """Load the run's trainable-encoder state dict (or a checkpoint folder's ``trainable.safetensors``)."""
        if not isinstance(trainable_state, dict):
            trainable_state = load_file(Path(trainable_state) / "trainable.safetensors")
        self.eraser.trainable_module.load_state_dict(trainable_state)

    def gradients(self) -> dict[str, torch.Tensor]:
        """Flat gradient [P] of each concept's erase loss at the loaded state."""
        e = self.eraser
        eta, guidance = e.cfg.erase.negative_guidance, e.cfg.erase.start_guidance
        out = {}
        for concept, state in e.concepts.items():
            generator = torch.Generator().manual_seed(self.seed)
            e.optimizer.zero_grad(set_to_none=True)
            loss = torch.zeros(())
            for _ in range(self.num_draws):
                draw = e.sampler.draw(generator)
                with torch.no_grad():
                    z = e.sampler.rollout(state.cond, e.uncond(1), draw.ddim_index, guidance=guidance,
                                          noise=e.sampler.initial_noise(1, generator))
                    eps_u, eps_c = e.sampler.eps(torch.cat([z, z]), draw.timestep,
                                                 Conditioning.cat([e.uncond(1), state.cond])).chunk(2)
                student = e.sampler.eps(z, draw.timestep, e.conditioner.condition(state.word, trained=True))
                loss = loss + erase_loss(student, eps_u, eps_c, negative_guidance=eta) / self.num_draws
            loss.backward()
            out[concept] = torch.cat([p.grad.flatten() for p in e.trainable_parameters if p.grad is not None]).clone()
        e.optimizer.zero_grad(set_to_none=True)
        return out

    def measure(self) -> dict[str, float]:
        """:func:`sage_dist.losses.interference` of :meth:`gradients`."""
        return interference(self.gradients())
