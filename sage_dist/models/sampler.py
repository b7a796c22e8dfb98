"""Frozen-model noise predictions and the partial DDIM rollout that produces z_t (docs/METHOD.md "Self-erasure").

Each step draws a DDIM index i ~ U{0..S−1} of an S-step DDIM schedule (η_DDIM = 0), runs the frozen model's
DDIM sampler from Gaussian noise with classifier-free guidance ``start_guidance`` until the latent has
reached the noise level of about timestep 1000·i/S, and draws the DDPM timestep
t ~ U[⌊1000·i/S⌋, ⌊1000·(i+1)/S⌋). No gradient flows through the sampling.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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

    def __init__(self, unet, scheduler_config, latent_shape: tuple[int, int, int], ddim_steps: int, *,
                 out_dtype: torch.dtype = torch.float32):
        from diffusers import DDIMScheduler

        self.unet = unet
        self.scheduler = DDIMScheduler.from_config(scheduler_config)
        self.scheduler.set_timesteps(ddim_steps)
        self.ddim_steps = ddim_steps
        self.num_train_timesteps = int(self.scheduler.config.num_train_timesteps)
        self.latent_shape = latent_shape
        self.out_dtype = out_dtype
        """dtype of returned predictions and latents (``model.train_dtype``)."""
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
        return out.to(self.out_dtype)

    def draw(self, generator: torch.Generator) -> RolloutDraw:
        """i ~ U{0..S−1}, t ~ U[⌊T·i/S⌋, ⌊T·(i+1)/S⌋) with T = 1000, from ``generator``."""
        i = int(torch.randint(0, self.ddim_steps, (1,), generator=generator))
        lo = self.num_train_timesteps * i // self.ddim_steps
        hi = self.num_train_timesteps * (i + 1) // self.ddim_steps
        t = int(torch.randint(lo, max(hi, lo + 1), (1,), generator=generator))
        return RolloutDraw(i, t)

    def initial_noise(self, batch_size: int, generator: torch.Generator) -> Tensor:
        """Gaussian start latents ``[B, C, H, W]`` in ``out_dtype``, drawn on the CPU (device-independent)."""
        noise = torch.randn((batch_size, *self.latent_shape), generator=generator, dtype=self.out_dtype)
        return (noise * self.scheduler.init_noise_sigma).to(self.device, self.out_dtype)

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


@dataclass
class BankSample:
    """Rows drawn from a :class:`TrajectoryBank`: latents, per-row timesteps and the frozen predictions."""

    latents: Tensor
    """z ``[B, C, H, W]`` float32."""
    timesteps: Tensor
    """t ``[B]`` int64 (fixed per bank entry and DDIM index)."""
    eps_uncond: Tensor
    """ε_o(z, t, τ_o(∅)) ``[B, C, H, W]`` float32."""
    eps_cond: Tensor
    """ε_o(z, t, τ_o(prompt of the row)) ``[B, C, H, W]`` float32."""


@dataclass
class BankState:
    """The contents of a :class:`TrajectoryBank`, separate from the bank so that several runs can share them
    (``sage_dist/train/shared.py`` keeps one per study, model, concept and seed, and persists it).

    Every value is a pure function of its key (see :class:`TrajectoryBank`), so a state filled by one run
    serves another run of the same frozen model, seed, guidance and schedule exactly.
    """

    levels: dict[tuple[str, int], dict[int, Tensor]] = field(default_factory=dict)
    """(prompt key, slot) -> DDIM index -> z ``[1, C, H, W]`` in the UNet's dtype (index S − 1: the start noise)."""
    targets: dict[tuple[str, int, int], tuple[int, Tensor, Tensor]] = field(default_factory=dict)
    """(prompt key, slot, DDIM index) -> (t, ε_o(z, t, ∅) ``[1, C, H, W]``, ε_o(z, t, prompt) ``[1, C, H, W]``)
    in the UNet's dtype."""

    def merge(self, other: "BankState") -> int:
        """Add the entries of ``other`` that this state lacks (existing ones are equal by construction and kept);
        returns how many levels and targets were added."""
        added = 0
        for entry, levels in other.levels.items():
            mine = self.levels.setdefault(entry, {})
            for i, z in levels.items():
                if i not in mine:
                    mine[i] = z
                    added += 1
        for key, value in other.targets.items():
            if key not in self.targets:
                self.targets[key] = value
                added += 1
        return added


class TrajectoryBank:
    """Frozen-model DDIM trajectories, ``bank_size`` per prompt key, extended on demand.

    Level i of an entry is the latent at the noise level of DDIM index i (what
    :meth:`DiffusionSampler.rollout` returns for ``ddim_index = i``) for a start noise drawn from ``seed``
    and the (key, slot) pair. An entry is only run as deep as it has been asked for, so its first use costs
    what a fresh rollout costs, and later uses are free. The DDPM timestep of (key, slot, i) is drawn once from
    the same bin as :meth:`DiffusionSampler.draw`, and the frozen predictions there are cached too: once warm,
    a training step only runs the student.

    **Every value is a pure function of its key**, bit for bit: each entry is stepped, and its targets are
    computed, in a UNet call of its own (2 rows: ∅ and the entry's prompt), never batched with other entries.
    A batched call would make an entry's floats depend on which other entries shared its batch (CPU kernels
    block and vectorise by batch size), and so on the order of use. Hence the bank's contents do not depend on
    the order of use, a run resumed from a checkpoint refills it with the same values, and a :class:`BankState`
    filled by one run serves another exactly (``state``). Unbatched calls cost more than batched ones (about 2x
    on the bundled world's small UNet on a CPU, ``reports/benchmarks.md``); a study's trials share the state, so a
    study pays that once per entry.

    This approximates the reference sampling (finite start noises, one t per bin and entry): a config
    choice (``erase.rollout_cache``) whose effect on RER and retention is measured (README, closing notes).

    Args:
        sampler: the frozen model's sampler.
        bank_size: start noises per prompt key.
        guidance: classifier-free guidance of the rollouts (``erase.start_guidance``).
        seed: seed of the start noises and timesteps.
        state: contents to read and extend (default: a new, empty :class:`BankState`); it must have been filled
            with the same frozen model, ``seed``, ``guidance`` and DDIM schedule (the caller keys it by them).
    """

    def __init__(self, sampler: DiffusionSampler, *, bank_size: int, guidance: float, seed: int,
                 state: BankState | None = None):
        self.sampler, self.bank_size, self.guidance, self.seed = sampler, bank_size, guidance, seed
        self.state = state if state is not None else BankState()
        self._levels = self.state.levels
        self._targets = self.state.targets
        self.num_ddim_rows = 0
        """Entry-steps of DDIM sampling this bank computed (not those it found in ``state``; cost accounting)."""
        self.num_target_rows = 0
        """Entries whose frozen predictions this bank computed (not those found in ``state``)."""

    def _generator(self, key: str, *extra: int) -> torch.Generator:
        import zlib

        value = self.seed * 1_000_003 + zlib.crc32(key.encode())
        for x in extra:
            value = value * 131 + x
        return torch.Generator().manual_seed(value % 2**63)

    def _noise(self, key: str, slot: int) -> Tensor:
        return self.sampler.initial_noise(1, self._generator(key, slot))

    @property
    def num_built(self) -> int:
        """Entries (key, slot) started so far (including those found in ``state``)."""
        return len(self._levels)

    @torch.no_grad()
    def _extend(self, entries: list[tuple[str, int]], conds: Conditioning, uncond: Conditioning, ddim_index: int) -> None:
        """Run every entry down to ``ddim_index``, one entry per UNet call (see the class docstring)."""
        s = self.sampler
        top = s.ddim_steps - 1
        done: set[tuple[str, int]] = set()
        for j, entry in enumerate(entries):
            if entry in done:
                continue
            done.add(entry)
            levels = self._levels.get(entry)
            if levels is None:
                levels = self._levels[entry] = {top: self._noise(*entry).to(s.unet.dtype)}
            level = min(levels)
            if level <= ddim_index:
                continue
            both = Conditioning.cat([uncond, conds.select(torch.tensor([j]))])
            z = levels[level].to(s.out_dtype)
            while level > ddim_index:
                t = int(s.scheduler.timesteps[top - level])
                eps_u, eps_c = s.eps(torch.cat([z, z]), t, both).chunk(2)
                z = s.scheduler.step(eps_u + self.guidance * (eps_c - eps_u), t, z, eta=0.0).prev_sample
                level -= 1
                levels[level] = z.to(s.unet.dtype)
                z = levels[level].to(s.out_dtype)  # continue from the stored value, as a later extension would
                self.num_ddim_rows += 1

    def latents(self, keys: list[str], conds: Conditioning, uncond: Conditioning, ddim_index: int,
                generator: torch.Generator) -> Tensor:
        """z at ``ddim_index`` for each row: a slot drawn per row from ``generator``; ``[B, C, H, W]`` float32."""
        return self.sample(keys, conds, uncond, ddim_index, generator, with_targets=False).latents

    @torch.no_grad()
    def sample(self, keys: list[str], conds: Conditioning, uncond: Conditioning, ddim_index: int,
               generator: torch.Generator, *, with_targets: bool = True) -> BankSample:
        """One bank entry per row (slot drawn from ``generator``) at ``ddim_index``, with t and the frozen
        predictions (``with_targets``). ``conds``: the rows' τ_o conditioning; ``uncond``: 1 row."""
        s = self.sampler
        entries = [(key, int(torch.randint(0, self.bank_size, (1,), generator=generator))) for key in keys]
        self._extend(entries, conds, uncond, ddim_index)
        latents = torch.cat([self._levels[e][ddim_index] for e in entries]).to(s.out_dtype)
        if not with_targets:
            return BankSample(latents, torch.empty(0, dtype=torch.long), latents[:0], latents[:0])
        lo = s.num_train_timesteps * ddim_index // s.ddim_steps
        hi = max(s.num_train_timesteps * (ddim_index + 1) // s.ddim_steps, lo + 1)
        for j, entry in enumerate(entries):
            if (*entry, ddim_index) in self._targets:
                continue
            t = int(torch.randint(lo, hi, (1,), generator=self._generator(*entry, ddim_index)))
            z = latents[j : j + 1]
            both = Conditioning.cat([uncond, conds.select(torch.tensor([j]))])
            eps_u, eps_c = s.eps(torch.cat([z, z]), torch.tensor([t, t], device=z.device), both).chunk(2)
            self._targets[(*entry, ddim_index)] = (t, eps_u.to(s.unet.dtype), eps_c.to(s.unet.dtype))
            self.num_target_rows += 1
        cached = [self._targets[(*e, ddim_index)] for e in entries]
        return BankSample(latents, torch.tensor([c[0] for c in cached], device=latents.device),
                          torch.cat([c[1] for c in cached]).to(s.out_dtype), torch.cat([c[2] for c in cached]).to(s.out_dtype))
