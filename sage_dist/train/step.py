"""One optimisation step of SAGE or a baseline (docs/METHOD.md "One step"). Read ``Eraser.train_step`` first:

1. ``erase_prompts``: the prompt x erased for each concept: the concept word during warm-up; after it, every
   ``erase.steps_per_cycle`` steps a new attack (SAGE: inside-out in text space; AdvUnlearn: outside-in through
   the UNet) whose result is x;
2. ``retain_batch``: the retain prompts of this step and which of them get ``retain_loss`` (SAGE: the Top-k most
   drifted, from a no-grad pass of τ_n truncated after EOT);
3. ``encode``: one pass of the trainable encoder τ_n with gradient (one DDP sync) over [x; selected retain prompts]
   at 77 positions (UNet conditioning) and over the retain batch up to its last EOT (the global semantic-graph
   loss reads only pooled features: exact, CLIP is causal);
4. ``frozen_targets``: one partial DDIM rollout of the frozen model for [concept; selected retain prompts], sharing
   i and t, and the frozen predictions e_∅, e_c, ε_o(r);
5. ``student_backward``: the student's predictions and L = L_erase + γ_g·L_graph + γ_t·retain_loss, backward;
6. one Adam step.

What each method uses (attack, retain batch, graph loss, Top-k) is :data:`sage_dist.train.methods.METHODS`.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from sage_dist.attack.inside_out import AttackResult, inside_out_attack
from sage_dist.attack.outside_in import outside_in_attack
from sage_dist.attack.prompt import AttackPrompt, build_attack_prompt, max_token_norms
from sage_dist.attack.templates import load_templates
from sage_dist.config import StudyConfig
from sage_dist.losses import (
    erase_loss,
    esd_target,
    graph_loss,
    interference,
    retain_loss,
    row_mse,
    select_top_k,
)
from sage_dist.models.load import DTYPES
from sage_dist.models.sampler import DiffusionSampler, RolloutDraw, TrajectoryBank
from sage_dist.models.text import MAX_LENGTH, Conditioning, PromptBatch, TextConditioner
from sage_dist.retention.sampler import RetainSampler
from sage_dist.train.methods import method_spec
from sage_dist.train.shared import FrozenCache

log = logging.getLogger(__name__)

NUM_SPECIAL_TOKENS = 2  # <|startoftext|>, <|endoftext|> are the last two ids of the CLIP vocabulary
TAU_O_CHUNK = 16
"""Retain prompts per τ_o pass: prompt j of the retain set is always encoded together with the other prompts of
its chunk ``j // TAU_O_CHUNK``, so its conditioning is a pure function of the prompt and the retain set, whatever
order the steps ask for it (a batch's floats depend on its composition), and a cache filled by another run holds
the same floats (``frozen_cache``)."""


@dataclass
class ConceptState:
    """Per-concept constants (frozen model) and the concept's own attack state."""

    word: PromptBatch
    """Token embeddings of the concept word, 1 row."""
    cond: Conditioning
    """τ_o(c), 1 row (no gradient)."""
    attack: AttackPrompt | None = None
    """Latest attack prompt (None before the first attack)."""
    attack_log: list[dict] = field(default_factory=list)
    found: list[AttackPrompt] = field(default_factory=list)
    """Every ``found_stride``-th attack's optimised prompt (at most about :data:`FOUND_PROMPTS_KEPT`), kept for
    the semantic-drift measurement (:func:`sage_dist.eval.found_prompts.found_prompt_concept_rate`)."""


FOUND_PROMPTS_KEPT = 32
"""Optimised attack prompts kept per concept for the semantic-drift measurement, spread evenly over training."""


def found_stride(cfg: StudyConfig) -> int:
    """Keep every n-th attack prompt: n = ceil(attacks per concept / :data:`FOUND_PROMPTS_KEPT`), counting
    attacks at the upper bound of one per cycle after warm-up (round-robin concepts attack less often)."""
    attacks = max(0, cfg.optim.num_steps - cfg.erase.warmup_steps) // cfg.erase.steps_per_cycle + 1
    return max(1, -(-attacks // FOUND_PROMPTS_KEPT))


@dataclass
class RetainBatch:
    """The retain prompts of one step on this rank (stage 2)."""

    prompts: list[str]
    """This rank's shard of the step's retain batch."""
    embeds: PromptBatch | None
    """Their token embeddings (None without a retain batch)."""
    original: Conditioning | None
    """Their τ_o conditioning and features (cached per prompt; None without a retain batch)."""
    selected: Tensor
    """``[k]`` int64 rows of the shard that get ``retain_loss``."""
    graph_length: int | None
    """Positions the graph rows are encoded to (their last EOT + 1); None: no graph loss this step."""

    @staticmethod
    def empty() -> "RetainBatch":
        return RetainBatch(prompts=[], embeds=None, original=None, selected=torch.arange(0), graph_length=None)


@dataclass
class FrozenTargets:
    """The frozen model's side of a step (stage 4): latents z, timesteps t and the targets at (z, t)."""

    draw: RolloutDraw
    """The step's DDIM index i and timestep t."""
    latents: Tensor
    """z ``[n_erase + k, C, H, W]``: erase rows first, then the selected retain rows."""
    timesteps: int | Tensor
    """t: one int for every row, or ``[rows]`` int64 (trajectory bank)."""
    eps_uncond: Tensor
    """e_∅ ``[n_erase, C, H, W]``."""
    eps_concept: Tensor
    """e_c ``[n_erase, C, H, W]``."""
    eps_retain: Tensor
    """ε_o(z_r, t, τ_o(r)) ``[k, C, H, W]``."""


def subsample_top_k(selected: Tensor, m: int, generator: torch.Generator) -> Tensor:
    """m of the k selected retain rows ``[k]`` int64, uniformly without replacement (``retain.retain_loss_rows``).

    Each row is kept with probability m / k, so the mean of ``retain_loss`` over the kept rows is an unbiased
    estimate of its mean over all k; returns ``selected`` unchanged (no draw) when m >= k.
    """
    if m >= len(selected):
        return selected
    return selected[torch.randperm(len(selected), generator=generator)[:m]]


class Eraser:
    """Training state of one erasure run on one worker (single device; distribution added by the caller).

    Args:
        cfg: the validated study configuration.
        pipe: a loaded diffusers SD / SDXL pipeline (frozen).
        retain_prompts: the retain set (already filtered; at least ``retain_batch_size`` prompts unless ESD).
        rank, world_size: this worker's place in a data-parallel group. Each rank draws its own rollout noise
            and attack templates; all ranks draw the same retain batch and take their shard of it.
        frozen_cache: τ_o conditioning and trajectory-bank contents shared with other runs of the same frozen
            model, concepts, seed, rank and retain set (:mod:`sage_dist.train.shared`, which keys it); read and
            extended in place. The run's numbers are identical with and without it.
    """

    def __init__(self, cfg: StudyConfig, pipe, retain_prompts: list[str], *, rank: int = 0, world_size: int = 1,
                 frozen_cache: FrozenCache | None = None):
        self.cfg = cfg
        self.method = cfg.erase.method
        self.spec = method_spec(self.method)
        self.rank, self.world_size = rank, world_size
        train_dtype = DTYPES[cfg.model.train_dtype]
        trains_text = self.spec.trains == "text_encoder"
        self.conditioner = TextConditioner(pipe, train_encoders=cfg.model.train_encoders if trains_text else (),
                                           trainable=cfg.model.trainable, trainable_layers=cfg.model.trainable_layers,
                                           pooling=cfg.retain.pooling, train_dtype=train_dtype)
        size = self.conditioner.resolution // pipe.vae_scale_factor
        # The frozen UNet must not require grad: a pipeline built in code (diffusers' default requires_grad=True,
        # e.g. models.tiny) would otherwise get weight gradients for every UNet parameter in each student backward
        # (on the SD-1.4 shape that was ~14 of a 60 s step, and 3.4 GB of .grad). ESD-x trains its own copy.
        pipe.unet.requires_grad_(False)
        self.sampler = DiffusionSampler(pipe.unet, pipe.scheduler.config,
                                        (pipe.unet.config.in_channels, size, size), cfg.erase.ddim_steps,
                                        out_dtype=train_dtype)
        self.generator = torch.Generator().manual_seed(cfg.optim.seed * 1_000_003 + rank)
        self.shared_generator = torch.Generator().manual_seed(cfg.optim.seed)
        self.retain_sampler = None
        if self.spec.retain:
            self.retain_sampler = RetainSampler(retain_prompts, cfg.retain.retain_batch_size, self.shared_generator)
        self.templates = load_templates(cfg.attack.template_library)
        self.max_norms = max_token_norms(self.conditioner)
        self._uncond1 = self.conditioner.uncond(1)
        self.retain_prompts = list(retain_prompts)
        self._retain_position: dict[str, int] = {}
        for j, p in enumerate(self.retain_prompts):
            self._retain_position.setdefault(p, j)
        self._retain_cache: dict[str, Conditioning] = frozen_cache.tau_o if frozen_cache is not None else {}
        self.concepts: dict[str, ConceptState] = {}
        for c in cfg.erase.erase_concept:
            word = self.conditioner.embed([c])
            with torch.no_grad():
                cond = self.conditioner.condition(word, trained=False)
            self.concepts[c] = ConceptState(word=word, cond=cond)
        self.student = self.sampler
        """Predicts the student's noise: the frozen UNet (text-encoder methods) or a trainable copy (ESD-x)."""
        self.trainable_module: torch.nn.Module = self.conditioner.trainable
        self.trainable_parameters = self.conditioner.trainable_parameters
        if self.spec.trains == "unet_cross_attention":
            unet = copy.deepcopy(pipe.unet).to(train_dtype)
            unet.requires_grad_(False)
            self.trainable_parameters = []
            for name, p in unet.named_parameters():
                if "attn2" in name:  # ESD's "xattn": every cross-attention parameter
                    p.requires_grad_(True)
                    self.trainable_parameters.append(p)
            self.student = DiffusionSampler(unet, pipe.scheduler.config, self.sampler.latent_shape, cfg.erase.ddim_steps,
                                            out_dtype=train_dtype)
            self.trainable_module = unet
        self.optimizer = torch.optim.Adam(self.trainable_parameters, lr=cfg.optim.lr)
        unet_params = sum(p.numel() for p in pipe.unet.parameters())
        self.student_chunk_size = cfg.model.student_chunk_size or (1 if unet_params >= 2e9 else 2 if unet_params >= 1e8 else 0)
        """Rows per student UNet pass (0: all rows at once); see ``model.student_chunk_size``."""
        checkpointing = cfg.model.gradient_checkpointing
        if checkpointing == "on" or (checkpointing == "auto" and unet_params >= 2e9):
            self.student.unet.enable_gradient_checkpointing()
        elif getattr(self.student.unet, "is_gradient_checkpointing", False):
            # a pipeline reused from an earlier run (the process's model cache) may still have it on
            self.student.unet.disable_gradient_checkpointing()
        self.bank = None
        if cfg.erase.rollout_cache:
            self.bank = TrajectoryBank(self.sampler, bank_size=cfg.erase.rollout_bank_size,
                                       guidance=cfg.erase.start_guidance, seed=cfg.optim.seed * 7919 + rank,
                                       state=frozen_cache.bank if frozen_cache is not None else None)

    # ---- frozen-model caches (exact: τ_o and the UNet never change) ----------------------------------------
    def uncond(self, rows: int) -> Conditioning:
        return Conditioning.cat([self._uncond1] * rows) if rows else self._uncond1.select(torch.arange(0))

    def retain_original(self, prompts: list[str]) -> Conditioning:
        """τ_o conditioning of retain prompts, computed once per prompt: a prompt of the retain set with its
        :data:`TAU_O_CHUNK` chunk, any other prompt alone (so every value is a pure function of its prompt)."""
        missing = [p for p in prompts if p not in self._retain_cache]
        chunks = sorted({self._retain_position[p] // TAU_O_CHUNK for p in missing if p in self._retain_position})
        batches = [self.retain_prompts[c * TAU_O_CHUNK : (c + 1) * TAU_O_CHUNK] for c in chunks]
        batches += [[p] for p in dict.fromkeys(missing) if p not in self._retain_position]
        for batch in batches:
            with torch.no_grad():
                cond = self.conditioner.condition(self.conditioner.embed(batch), trained=False)
            for j, p in enumerate(batch):
                self._retain_cache.setdefault(p, cond.select(torch.tensor([j])))
        return Conditioning.cat([self._retain_cache[p] for p in prompts])

    # ---- attack -----------------------------------------------------------------------------------------------
    def _random_ids(self, n: int) -> list[int]:
        vocab = self.conditioner.token_embedding(0).num_embeddings - NUM_SPECIAL_TOKENS
        return [int(i) for i in torch.randint(0, vocab, (n,), generator=self.generator)]

    def _initial_attack_prompt(self, concept: str) -> AttackPrompt:
        a = self.cfg.attack
        if self.spec.attack == "outside_in":  # AdvUnlearn: k random prefix tokens before the concept
            return build_attack_prompt(self.conditioner, concept, prefix_ids=self._random_ids(a.num_adv_tokens))
        if a.init == "library":
            j = int(torch.randint(0, len(self.templates), (1,), generator=self.generator))
            return build_attack_prompt(self.conditioner, concept, template=self.templates[j])
        if a.init == "random":
            return build_attack_prompt(self.conditioner, concept, prefix_ids=self._random_ids(a.num_random_tokens))
        concept_ids = self.conditioner.tokenizers[0](concept, add_special_tokens=False).input_ids
        return build_attack_prompt(self.conditioner, concept, prefix_ids=list(concept_ids))

    def attack(self, concept: str) -> AttackResult:
        """Self-check: a fresh (or, with reinit="latest", continued) attack prompt optimised for J steps."""
        state = self.concepts[concept]
        if state.attack is not None and self.cfg.attack.reinit == "latest":
            start = state.attack
        else:
            start = self._initial_attack_prompt(concept)
        if self.spec.attack == "outside_in":
            result = outside_in_attack(self.conditioner, self.sampler, start, state.cond, self._uncond1, self.cfg.attack,
                                       start_guidance=self.cfg.erase.start_guidance, generator=self.generator,
                                       max_norms=self.max_norms)
        else:
            result = inside_out_attack(self.conditioner, start, state.cond.features, self.cfg.attack,
                                       max_norms=self.max_norms)
        state.attack = result.prompt
        if len(state.attack_log) % found_stride(self.cfg) == 0:
            state.found.append(result.prompt.detached())
        state.attack_log.append({"template": result.prompt.template, "loss_first": result.losses[0],
                                 "loss_last": result.losses[-1], "H1": result.h1, "H2": result.h2})
        return result

    # ---- the step ---------------------------------------------------------------------------------------------
    def train_step(self, step: int) -> dict[str, float]:
        """One optimisation step; returns the step's scalars (losses, attack statistics). Stages in the order of
        the module docstring.

        Raises:
            FloatingPointError: a loss became NaN or infinite (the caller records the run as failed).
        """
        concepts = self._concepts_at(step)
        out: dict[str, float] = {}
        erase_prompts = self.erase_prompts(step, concepts, out)                 # 1. word or self-check
        retain = self.retain_batch(concepts, out)                               # 2. retain batch, Top-k
        student_cond, l_graph = self.encode(erase_prompts, retain)              # 3. the one τ_n forward
        frozen = self.frozen_targets(concepts, retain)                          # 4. rollout, frozen targets
        self.optimizer.zero_grad(set_to_none=True)
        l_erase, l_retain, total = self.student_backward(step, student_cond, frozen, l_graph, out)  # 5.
        self.optimizer.step()                                                   # 6.
        out.update(loss=total.item(), erase_loss=l_erase.item(), graph_loss=l_graph.item(),
                   retain_loss=l_retain.item(), ddim_index=float(frozen.draw.ddim_index),
                   timestep=float(frozen.draw.timestep))
        return out

    def _concepts_at(self, step: int) -> list[str]:
        """The concepts erased at ``step``: all of them ("sum") or one in turn ("round_robin")."""
        names = list(self.concepts)
        return names if self.cfg.erase.multi_concept == "sum" else [names[step % len(names)]]

    def erase_prompts(self, step: int, concepts: list[str], out: dict[str, float]) -> PromptBatch:
        """Stage 1: the prompt x erased for each concept, the concept word during warm-up; after it, every
        ``erase.steps_per_cycle`` steps a new attack (the self-check), whose prompt is x until the next."""
        cfg = self.cfg
        attacking = self.spec.attack != "none" and step >= cfg.erase.warmup_steps
        rows = []
        for c in concepts:
            state = self.concepts[c]
            if attacking and ((step - cfg.erase.warmup_steps) % cfg.erase.steps_per_cycle == 0 or state.attack is None):
                result = self.attack(c)
                out.update(attack_loss_first=result.losses[0], attack_loss_last=result.losses[-1])
                if not math.isnan(result.h1):
                    out.update(attack_H1=result.h1, attack_H2=result.h2)
            rows.append(state.attack.assemble(self.conditioner).detach() if attacking else state.word)
        return PromptBatch.cat(rows)

    def retain_batch(self, concepts: list[str], out: dict[str, float]) -> RetainBatch:
        """Stage 2: this rank's shard of the retain batch (every rank draws the same batch), and which of its
        prompts get ``retain_loss``: the Top-k (``retain.top_k_selection``) from a no-grad pass of τ_n (SAGE), or
        all (AdvUnlearn). That pass and the graph loss read only pooled features (EOT state, or the mean over
        1..EOT), which a causal CLIP encoder computes from the positions up to EOT: they are encoded only that far
        (exact)."""
        if self.retain_sampler is None:
            return RetainBatch.empty()
        cfg = self.cfg
        shard = self.retain_sampler.next_batch()[self.rank :: self.world_size]
        if not shard:  # more workers than retain prompts: this rank has none this step
            return RetainBatch.empty()
        embeds = self.conditioner.embed(shard)
        length = self._graph_length(embeds)
        original = self.retain_original(shard)
        trained_e = self.conditioner.train_encoders
        with torch.no_grad():
            feats_n = self.conditioner.condition(embeds, trained=True, length=length, through_wrapper=False).features
            drift = torch.stack([(feats_n[e] * original.features[e]).sum(-1) for e in trained_e]).mean(0)
            concept_feat = self.concepts[concepts[0]].cond.features
            concept_sim = torch.stack([(original.features[e] * concept_feat[e]).sum(-1) for e in trained_e]).mean(0)
        selected = self._select(drift, concept_sim, max(1, math.ceil(cfg.retain.top_k / self.world_size)))
        if cfg.retain.retain_loss_rows and self.spec.retain_loss_rows:  # approximation, opt-in
            m_local = max(1, math.ceil(cfg.retain.retain_loss_rows / self.world_size))
            selected = subsample_top_k(selected, m_local, self.generator)
        out["retain_drift_mean"] = float(drift.mean())
        with_graph = self.spec.graph_loss and cfg.retain.graph_weight > 0 and len(shard) >= 2
        return RetainBatch(prompts=shard, embeds=embeds, original=original, selected=selected,
                           graph_length=length if with_graph else None)

    @staticmethod
    def _graph_length(batch: PromptBatch) -> int:
        """Positions the graph-only rows need: up to the last EOT of the batch (CLIP is causal)."""
        return int(batch.eot_index.max()) + 1

    def _select(self, scores: Tensor, concept_sim: Tensor, k: int) -> Tensor:
        mode = self.cfg.retain.top_k_selection if self.spec.top_k else "all"
        n = scores.shape[0]
        if mode == "all" or k >= n:
            return torch.arange(n)
        if mode == "most_drifted":
            return select_top_k(scores, k)
        if mode == "least_concept_similar":
            return select_top_k(concept_sim, k)
        return torch.randperm(n, generator=self.generator)[:k]

    def encode(self, erase_prompts: PromptBatch, retain: RetainBatch) -> tuple[Conditioning, Tensor]:
        """Stage 3: the one forward of τ_n with gradient (one DDP sync) over two groups: [erase prompts; selected
        retain prompts] at 77 positions (the student's UNet conditioning) and the retain batch up to its last EOT
        (the graph); returns the student conditioning and L_graph (0 without the graph)."""
        cfg = self.cfg
        unet_batch = erase_prompts
        if len(retain.selected):
            unet_batch = PromptBatch.cat([erase_prompts, retain.embeds.select(retain.selected)])
        groups = [(unet_batch, MAX_LENGTH)]
        if retain.graph_length is not None:
            groups.append((retain.embeds, retain.graph_length))
        conds = self.conditioner.condition_groups(groups, trained=True)
        l_graph = torch.zeros((), device=self.sampler.device)
        if retain.graph_length is not None:
            l_graph = torch.stack([graph_loss(conds[1].features[e], retain.original.features[e],
                                              kind=cfg.retain.graph_loss, temperature=cfg.retain.graph_temperature)
                                   for e in self.conditioner.train_encoders]).mean()
        return conds[0], l_graph

    def frozen_targets(self, concepts: list[str], retain: RetainBatch) -> FrozenTargets:
        """Stage 4: one partial DDIM rollout of the frozen model for [concepts; selected retain prompts] with a
        shared i and t, and the frozen predictions e_∅, e_c (erase rows) and ε_o(r) (retain rows); with
        ``erase.rollout_cache`` the trajectory bank's entries, their cached t and frozen predictions instead."""
        cfg = self.cfg
        n_erase = len(concepts)
        draw = self.sampler.draw(self.generator)
        concept_cond = Conditioning.cat([self.concepts[c].cond for c in concepts])
        parts = [concept_cond] + ([retain.original.select(retain.selected)] if len(retain.selected) else [])
        roll_cond = Conditioning.cat(parts)
        rows = n_erase + len(retain.selected)
        if self.bank is not None:
            keys = [f"concept:{c}" for c in concepts] + [f"retain:{retain.prompts[int(j)]}" for j in retain.selected]
            sample = self.bank.sample(keys, roll_cond, self.uncond(1), draw.ddim_index, self.generator)
            return FrozenTargets(draw=draw, latents=sample.latents, timesteps=sample.timesteps,
                                 eps_uncond=sample.eps_uncond[:n_erase], eps_concept=sample.eps_cond[:n_erase],
                                 eps_retain=sample.eps_cond[n_erase:])
        z = self.sampler.rollout(roll_cond, self.uncond(rows), draw.ddim_index, guidance=cfg.erase.start_guidance,
                                 noise=self.sampler.initial_noise(rows, self.generator))
        with torch.no_grad():
            target_cond = Conditioning.cat([self.uncond(n_erase), roll_cond])
            eps_frozen = self.sampler.eps(torch.cat([z[:n_erase], z]), draw.timestep, target_cond)
        return FrozenTargets(draw=draw, latents=z, timesteps=draw.timestep, eps_uncond=eps_frozen[:n_erase],
                             eps_concept=eps_frozen[n_erase : 2 * n_erase], eps_retain=eps_frozen[2 * n_erase :])

    def student_backward(self, step: int, student_cond: Conditioning, frozen: FrozenTargets, l_graph: Tensor,
                         out: dict[str, float]) -> tuple[Tensor, Tensor, Tensor]:
        """Stage 5: the student's predictions (gradient into τ_n, or into ESD-x's UNet copy), the total loss
        L = L_erase + γ_g·L_graph + γ_t·retain_loss and its backward; returns (L_erase, retain_loss, L). On SD/SDXL-size
        UNets the student runs in chunks of ``model.student_chunk_size`` rows, each with its own UNet backward,
        then one encoder backward (the same gradients with a fraction of the activation memory)."""
        n_erase = len(frozen.eps_uncond)
        graph_term = (self.cfg.retain.graph_weight if self.spec.graph_loss else 0.0) * l_graph
        interference = self.cfg.erase.log_interference and n_erase > 1
        if self.student_chunk_size and len(student_cond.encoder_hidden_states) > self.student_chunk_size:
            if interference:  # needs the erase rows' graph into the encoder: one extra forward of those rows
                t = frozen.timesteps
                t_erase = t if not torch.is_tensor(t) or t.ndim == 0 else t[:n_erase]
                eps_erase = self.student.eps(frozen.latents[:n_erase], t_erase, student_cond.select(torch.arange(n_erase)))
                out["interference_cos"] = self._interference(eps_erase, frozen)
            eps_student = self._chunked_student_backward(student_cond, frozen, graph_term)
            with torch.no_grad():
                l_erase, l_retain, total = self._losses(eps_student, frozen, graph_term)
            self._check_finite(step, total, l_erase, l_graph, l_retain)
            return l_erase, l_retain, total
        eps_student = self.student.eps(frozen.latents, frozen.timesteps, student_cond)
        l_erase, l_retain, total = self._losses(eps_student, frozen, graph_term)
        self._check_finite(step, total, l_erase, l_graph, l_retain)
        if interference:
            out["interference_cos"] = self._interference(eps_student[:n_erase], frozen)
        total.backward()
        return l_erase, l_retain, total

    def _losses(self, eps_student: Tensor, frozen: FrozenTargets, graph_term: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(L_erase, retain_loss, L) from the student's predictions ``[n_erase + k, C, H, W]``."""
        n_erase = len(frozen.eps_uncond)
        l_erase = erase_loss(eps_student[:n_erase], frozen.eps_uncond, frozen.eps_concept,
                             negative_guidance=self.cfg.erase.negative_guidance)
        zero = torch.zeros((), device=eps_student.device)
        l_retain = retain_loss(eps_student[n_erase:], frozen.eps_retain) if len(eps_student) > n_erase else zero
        return l_erase, l_retain, l_erase + graph_term + self.cfg.retain.retain_loss_weight * l_retain

    @staticmethod
    def _check_finite(step: int, total: Tensor, l_erase: Tensor, l_graph: Tensor, l_retain: Tensor) -> None:
        if not torch.isfinite(total):
            raise FloatingPointError(f"step {step}: loss is {float(total)} (erase {float(l_erase)}, graph "
                                     f"{float(l_graph)}, retain {float(l_retain)}); lower optim.lr")

    def _chunked_student_backward(self, student_cond: Conditioning, frozen: FrozenTargets,
                                  graph_term: Tensor) -> Tensor:
        """The student pass in chunks of ``student_chunk_size`` rows, each with its own UNet backward into a detached
        copy of the conditioning; then one backward of the text encoder (and of ``graph_term``). L_erase and
        retain_loss are means over rows, so each chunk's share is its rows' mean weighted by rows / all rows: the
        gradients equal the one-pass gradients up to float summation order. Returns the detached predictions
        ``[rows, C, H, W]``. Raises FloatingPointError for a non-finite chunk loss (before any optimiser step)."""
        cfg = self.cfg
        n_erase = len(frozen.eps_uncond)
        rows = len(student_cond.encoder_hidden_states)
        k = rows - n_erase
        hidden = student_cond.encoder_hidden_states
        added = student_cond.added_cond_kwargs
        hidden_leaf = hidden.detach().requires_grad_(hidden.requires_grad)
        added_leaf = None if added is None else {key: v.detach().requires_grad_(v.requires_grad) for key, v in added.items()}
        leaf = Conditioning(hidden_leaf, added_leaf, student_cond.features, student_cond.final)
        targets = torch.cat([esd_target(frozen.eps_uncond, frozen.eps_concept,
                                        negative_guidance=cfg.erase.negative_guidance), frozen.eps_retain])
        timesteps = torch.as_tensor(frozen.timesteps, device=frozen.latents.device)
        outputs = []
        for start in range(0, rows, self.student_chunk_size):
            sl = torch.arange(start, min(rows, start + self.student_chunk_size))
            t = timesteps if timesteps.ndim == 0 else timesteps[sl]
            eps = self.student.eps(frozen.latents[sl], t, leaf.select(sl))
            sq = row_mse(eps, targets[sl])
            is_erase = sl < n_erase
            loss = sq[is_erase].sum() / n_erase
            if k:
                loss = loss + cfg.retain.retain_loss_weight * sq[~is_erase].sum() / k
            if not torch.isfinite(loss):
                raise FloatingPointError(f"student chunk rows {start}..{start + len(sl) - 1}: loss {float(loss)}; "
                                         "lower optim.lr")
            if loss.requires_grad:
                loss.backward()
            outputs.append(eps.detach())
        tensors, grads = [], []
        if hidden.requires_grad and hidden_leaf.grad is not None:
            tensors.append(hidden)
            grads.append(hidden_leaf.grad)
        for key in added or {}:
            if added[key].requires_grad and added_leaf[key].grad is not None:
                tensors.append(added[key])
                grads.append(added_leaf[key].grad)
        if graph_term.requires_grad:
            tensors.append(graph_term)
            grads.append(torch.ones_like(graph_term))
        if tensors:
            torch.autograd.backward(tensors, grads)
        return torch.cat(outputs)

    def _interference(self, eps_student: Tensor, frozen: FrozenTargets) -> float:
        """Mean pairwise cosine of the per-concept erase-loss gradients on the trainable parameters."""
        eta = self.cfg.erase.negative_guidance
        grads = {}
        for j in range(eps_student.shape[0]):
            loss_j = erase_loss(eps_student[j : j + 1], frozen.eps_uncond[j : j + 1], frozen.eps_concept[j : j + 1],
                                negative_guidance=eta)
            g = torch.autograd.grad(loss_j, self.trainable_parameters, retain_graph=True, allow_unused=True)
            grads[str(j)] = torch.cat([(gi if gi is not None else torch.zeros_like(p)).flatten()
                                       for gi, p in zip(g, self.trainable_parameters)])
        return interference(grads)["interference_cos"]


@torch.no_grad()
def erase_objective(eraser: Eraser, concept: str, *, seed: int, num_draws: int = 4,
                    prompt: PromptBatch | None = None) -> float:
    """L_erase of ``prompt`` (default: the plain concept word) for ``concept``'s targets, averaged over
    ``num_draws`` fixed (i, t, noise) draws of ``seed``.

    A deterministic yardstick for "did training lower the erase objective" (independent of the training
    RNG). The student is τ_n through the frozen UNet, or the original encoder through ESD-x's trained UNet copy.
    Returns a float (mean squared error to the negative-guidance target, docs/METHOD.md "Self-erasure").
    """
    generator = torch.Generator().manual_seed(seed)
    state = eraser.concepts[concept]
    eta = eraser.cfg.erase.negative_guidance
    total = 0.0
    for _ in range(num_draws):
        draw = eraser.sampler.draw(generator)
        z = eraser.sampler.rollout(state.cond, eraser.uncond(1), draw.ddim_index, guidance=eraser.cfg.erase.start_guidance,
                                   noise=eraser.sampler.initial_noise(1, generator))
        eps_u, eps_c = eraser.sampler.eps(torch.cat([z, z]), draw.timestep,
                                          Conditioning.cat([eraser.uncond(1), state.cond])).chunk(2)
        x = prompt if prompt is not None else state.word
        student = eraser.student.eps(z, draw.timestep, eraser.conditioner.condition(x, trained=True))
        total += float(erase_loss(student, eps_u, eps_c, negative_guidance=eta))
    return total / num_draws
