"""Frozen-model noise predictions and the partial DDIM rollout that produces z_t (spec §1.4).

Each step draws a DDIM index i ~ U{0..S−1} of an S-step DDIM schedule (η_DDIM = 0), runs the frozen model's
DDIM sampler from Gaussian noise with classifier-free guidance ``start_guidance`` until the latent has
reached the noise level of about timestep 1000·i/S, and draws the DDPM timestep
t ~ U[⌊1000·i/S⌋, ⌊1000·(i+1)/S⌋). No gradient flows through the sampling.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sage_dist.models.text import Conditioning


@dataclass(frozen=True)
class RolloutDraw:
    """One draw of the rollout index ``ddim_index`` (i) and the DDPM ``timestep`` (t)."""

    ddim_index: int
    timestep: int


class DiffusionSampler:
    """UNet noise predictions (frozen, any dtype; returned as float32) and the partial DDIM rollout.

    Args:
        unet: the pipeline's ``UNet2DConditionModel`` (frozen).
        scheduler_config: the pipeline scheduler's config; a ``DDIMScheduler`` is built from it.
        latent_shape: ``(C, H, W)`` of one latent.
        ddim_steps: S.
    """

    def __init__(self, unet, scheduler_config, latent_shape: tuple[int, int, int], ddim_steps: int):
        from diffusers import DDIMScheduler

        self.unet = unet
        self.scheduler = DDIMScheduler.from_config(scheduler_config)
        self.scheduler.set_timesteps(ddim_steps)
        self.ddim_steps = ddim_steps
        self.num_train_timesteps = int(self.scheduler.config.num_train_timesteps)
        self.latent_shape = latent_shape
        self.num_unet_calls = 0
        """Rows of UNet forward passes made (for cost accounting in benchmarks)."""

    @property
    def device(self) -> torch.device:
        return self.unet.device

    def eps(self, latents: Tensor, timestep: int | Tensor, cond: Conditioning) -> Tensor:
        """ε(z, t, h): UNet prediction ``[B, C, H, W]`` float32. Gradient flows into ``cond`` when enabled.

        ``latents`` ``[B, C, H, W]``; ``timestep`` a Python int or ``[B]`` tensor; ``cond`` B rows.
        """
        dtype = self.unet.dtype
        t = torch.as_tensor(timestep, device=latents.device)
        if t.ndim == 0:
            t = t.expand(latents.shape[0])
        added = None
        if cond.added_cond_kwargs is not None:
            added = {k: v.to(dtype) for k, v in cond.added_cond_kwargs.items()}
        self.num_unet_calls += latents.shape[0]
        out = self.unet(latents.to(dtype), t, encoder_hidden_states=cond.encoder_hidden_states.to(dtype),
                        added_cond_kwargs=added).sample
        return out.float()

    def draw(self, generator: torch.Generator) -> RolloutDraw:
        """i ~ U{0..S−1}, t ~ U[⌊T·i/S⌋, ⌊T·(i+1)/S⌋) with T = 1000, from ``generator``."""
        i = int(torch.randint(0, self.ddim_steps, (1,), generator=generator))
        lo = self.num_train_timesteps * i // self.ddim_steps
        hi = self.num_train_timesteps * (i + 1) // self.ddim_steps
        t = int(torch.randint(lo, max(hi, lo + 1), (1,), generator=generator))
        return RolloutDraw(i, t)

    def initial_noise(self, batch_size: int, generator: torch.Generator) -> Tensor:
        """Gaussian start latents ``[B, C, H, W]`` float32, drawn on the CPU (device-independent)."""
        noise = torch.randn((batch_size, *self.latent_shape), generator=generator)
        return (noise * self.scheduler.init_noise_sigma).to(self.device)

    @torch.no_grad()
    def rollout(self, cond: Conditioning, uncond: Conditioning, ddim_index: int, *, guidance: float,
                noise: Tensor) -> Tensor:
        """Run S − 1 − i DDIM steps from ``noise`` with CFG; returns z ``[B, C, H, W]`` float32.

        The latent then sits at the noise level of timestep ≈ 1000·i/S. ``cond`` and ``uncond`` have B rows.
        """
        num = self.ddim_steps - 1 - ddim_index
        z = noise
        both = Conditioning.cat([uncond, cond])
        for k in range(num):
            t = int(self.scheduler.timesteps[k])
            eps_u, eps_c = self.eps(torch.cat([z, z]), t, both).chunk(2)
            eps = eps_u + guidance * (eps_c - eps_u)
            z = self.scheduler.step(eps, t, z, eta=0.0).prev_sample
        return z
