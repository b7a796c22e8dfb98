"""One optimisation step of SAGE, ESD or AdvUnlearn on the text encoder (spec §1.4-1.7).

This is the file to read for "what happens in a step". ``Eraser.train_step`` does, in order:

1. the erase prompt x: the concept word during warm-up; after it, every ``steps_per_cycle`` steps a new
   attack (SAGE: inside-out in text space; AdvUnlearn: outside-in through the UNet) whose result is x;
2. the retain batch: the Top-k selection (most drifted) from a no-grad pass of τ_n truncated after EOT;
3. one pass of the trainable encoder τ_n with gradient (a single forward, so DDP syncs once) over
   [x; selected retain prompts] at 77 positions (UNet conditioning) and over the retain batch up to its
   last EOT (SAGE's global semantic-graph loss reads only pooled features g(·), the EOT state or the mean over
   positions 1..EOT: exact, CLIP is causal);
4. one partial DDIM rollout of the frozen model for [concept; selected retain prompts], sharing i and t;
5. frozen targets (e_∅, e_c, ε_o(r)) and the student's predictions, in two batched UNet calls (the student's
   in chunks of ``model.student_chunk_size`` rows on SD/SDXL-size UNets, each with its own UNet backward, then
   one encoder backward: the same gradients with a fraction of the activation memory);
6. L = L_erase + γ_g·L_graph + γ_t·L_image, one Adam step.

Method differences: "esd" uses only L_erase on the word; "advunlearn" uses the outside-in attack and noise
retention on every retain prompt (no graph); "sage" uses everything.
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
    noise_retain_loss,
    select_top_k,
)
from sage_dist.models.load import DTYPES
from sage_dist.models.sampler import DiffusionSampler, TrajectoryBank
from sage_dist.models.text import MAX_LENGTH, Conditioning, PromptBatch, TextConditioner
from sage_dist.retention.sampler import RetainSampler

log = logging.getLogger(__name__)

NUM_SPECIAL_TOKENS = 2  # <|startoftext|>, <|endoftext|> are the last two ids of the CLIP vocabulary


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


def subsample_top_k(selected: Tensor, m: int, generator: torch.Generator) -> Tensor:
    """m of the k selected retain rows ``[k]`` int64, uniformly without replacement (``retain.image_loss_rows``).

    Each row is kept with probability m / k, so the mean of L_image over the kept rows is an unbiased
    estimate of its mean over all k (spec §1.7's L_image); returns ``selected`` unchanged (no draw) when m >= k.
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
    """

    def __init__(self, cfg: StudyConfig, pipe, retain_prompts: list[str], *, rank: int = 0, world_size: int = 1):
        self.cfg = cfg
        self.method = cfg.erase.method
        self.rank, self.world_size = rank, world_size
        train_dtype = DTYPES[cfg.model.train_dtype]
        self.conditioner = TextConditioner(pipe, train_encoders=() if self.method == "esd-x" else cfg.model.train_encoders,
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
        if self.method not in ("esd", "esd-x"):
            self.retain_sampler = RetainSampler(retain_prompts, cfg.retain.retain_batch_size, self.shared_generator)
        self.templates = load_templates(cfg.attack.template_library)
        self.max_norms = max_token_norms(self.conditioner)
        self._uncond1 = self.conditioner.uncond(1)
        self._retain_cache: dict[str, Conditioning] = {}
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
        if self.method == "esd-x":
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
                                       guidance=cfg.erase.start_guidance, seed=cfg.optim.seed * 7919 + rank)

    # ---- frozen-model caches (exact: τ_o and the UNet never change) ----------------------------------------
    def uncond(self, rows: int) -> Conditioning:
        return Conditioning.cat([self._uncond1] * rows) if rows else self._uncond1.select(torch.arange(0))

    def retain_original(self, prompts: list[str]) -> Conditioning:
        """τ_o conditioning of retain prompts, computed once per prompt."""
        missing = [p for p in prompts if p not in self._retain_cache]
        if missing:
            with torch.no_grad():
                cond = self.conditioner.condition(self.conditioner.embed(missing), trained=False)
            for j, p in enumerate(missing):
                self._retain_cache[p] = cond.select(torch.tensor([j]))
        return Conditioning.cat([self._retain_cache[p] for p in prompts])

    # ---- attack -----------------------------------------------------------------------------------------------
    def _random_ids(self, n: int) -> list[int]:
        vocab = self.conditioner.token_embedding(0).num_embeddings - NUM_SPECIAL_TOKENS
        return [int(i) for i in torch.randint(0, vocab, (n,), generator=self.generator)]

    def _initial_attack_prompt(self, concept: str) -> AttackPrompt:
        a = self.cfg.attack
        if self.method == "advunlearn":
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
        if self.method == "advunlearn":
            result = outside_in_attack(self.conditioner, self.sampler, start, state.cond, self._uncond1, self.cfg.attack,
                                       start_guidance=self.cfg.erase.start_guidance, generator=self.generator,
                                       max_norms=self.max_norms)
        else:
            features = state.cond.features
            result = inside_out_attack(self.conditioner, start, features, self.cfg.attack, max_norms=self.max_norms,
                                       word_features=features if self.cfg.attack.boundary_weight > 0 else None)
        state.attack = result.prompt
        state.attack_log.append({"template": result.prompt.template, "loss_first": result.losses[0],
                                 "loss_last": result.losses[-1], "H1": result.h1, "H2": result.h2})
        return result

    # ---- the step ---------------------------------------------------------------------------------------------
    @staticmethod
    def _graph_length(batch: PromptBatch) -> int:
        """Positions the graph-only rows need: up to the last EOT of the batch (CLIP is causal)."""
        return int(batch.eot_index.max()) + 1

    def _select(self, scores: Tensor, concept_sim: Tensor, k: int) -> Tensor:
        mode = self.cfg.retain.top_k_selection if self.method == "sage" else "all"
        n = scores.shape[0]
        if mode == "all" or k >= n:
            return torch.arange(n)
        if mode == "most_drifted":
            return select_top_k(scores, k)
        if mode == "least_concept_similar":
            return select_top_k(concept_sim, k)
        return torch.randperm(n, generator=self.generator)[:k]

    def _interference(self, eps_student: Tensor, eps_uncond: Tensor, eps_concept: Tensor) -> float:
        """Mean pairwise cosine of the per-concept erase-loss gradients (spec §5.3 interference measure)."""
        eta = self.cfg.erase.negative_guidance
        flat = []
        for j in range(eps_student.shape[0]):
            loss_j = erase_loss(eps_student[j : j + 1], eps_uncond[j : j + 1], eps_concept[j : j + 1],
                                negative_guidance=eta)
            grads = torch.autograd.grad(loss_j, self.trainable_parameters, retain_graph=True, allow_unused=True)
            flat.append(torch.cat([(g if g is not None else torch.zeros_like(p)).flatten()
                                   for g, p in zip(grads, self.trainable_parameters)]))
        unit = torch.nn.functional.normalize(torch.stack(flat), dim=-1)
        cos = unit @ unit.T
        n = cos.shape[0]
        return float((cos.sum() - cos.diagonal().sum()) / (n * (n - 1)))

    def _losses(self, eps_student: Tensor, n_erase: int, eps_uncond: Tensor, eps_concept: Tensor,
                eps_retain_original: Tensor, graph_term: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(L_erase, L_image, L) of spec §1.7 from the student's predictions ``[n_erase + k, C, H, W]`` (k: the selected
        retain rows, m of them with ``retain.image_loss_rows``)."""
        cfg = self.cfg
        l_erase = erase_loss(eps_student[:n_erase], eps_uncond, eps_concept, negative_guidance=cfg.erase.negative_guidance)
        zero = torch.zeros((), device=eps_student.device)
        l_image = noise_retain_loss(eps_student[n_erase:], eps_retain_original) if len(eps_student) > n_erase else zero
        return l_erase, l_image, l_erase + graph_term + cfg.retain.retain_loss_weight * l_image

    @staticmethod
    def _check_finite(step: int, total: Tensor, l_erase: Tensor, l_graph: Tensor, l_image: Tensor) -> None:
        if not torch.isfinite(total):
            raise FloatingPointError(f"step {step}: loss is {float(total)} (erase {float(l_erase)}, graph "
                                     f"{float(l_graph)}, image {float(l_image)}); lower optim.lr")

    def _chunked_student_backward(self, z: Tensor, timestep, student_cond: Conditioning, n_erase: int,
                                  eps_uncond: Tensor, eps_concept: Tensor, eps_retain_original: Tensor,
                                  graph_term: Tensor) -> Tensor:
        """The student pass in chunks of ``student_chunk_size`` rows, each with its own UNet backward into a detached
        copy of the conditioning; then one backward of the text encoder (and of ``graph_term``). L_erase and L_image
        are means over rows, so each chunk's share is its rows' mean weighted by rows / all rows: the gradients
        equal the one-pass gradients up to float summation order. Returns the detached predictions
        ``[rows, C, H, W]``. Raises FloatingPointError for a non-finite chunk loss (before any optimizer step)."""
        cfg = self.cfg
        rows = len(student_cond.encoder_hidden_states)
        k = rows - n_erase
        hidden = student_cond.encoder_hidden_states
        added = student_cond.added_cond_kwargs
        hidden_leaf = hidden.detach().requires_grad_(hidden.requires_grad)
        added_leaf = None if added is None else {key: v.detach().requires_grad_(v.requires_grad) for key, v in added.items()}
        leaf = Conditioning(hidden_leaf, added_leaf, student_cond.features, student_cond.final)
        targets = torch.cat([esd_target(eps_uncond, eps_concept, negative_guidance=cfg.erase.negative_guidance), eps_retain_original])
        timesteps = torch.as_tensor(timestep, device=z.device)
        outputs = []
        for start in range(0, rows, self.student_chunk_size):
            sl = torch.arange(start, min(rows, start + self.student_chunk_size))
            t = timesteps if timesteps.ndim == 0 else timesteps[sl]
            eps = self.student.eps(z[sl], t, leaf.select(sl))
            sq = ((eps - targets[sl]) ** 2).flatten(1).mean(1)  # per-row mean squared error
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

    def train_step(self, step: int) -> dict[str, float]:
        """One optimisation step; returns the step's scalars (losses, attack stats). See module docstring.

        Raises:
            FloatingPointError: a loss became NaN or infinite (the caller records the run as failed).
        """
        cfg = self.cfg
        names = list(self.concepts)
        now = names if cfg.erase.multi_concept == "sum" else [names[step % len(names)]]
        attacking = self.method in ("sage", "advunlearn") and step >= cfg.erase.warmup_steps
        out: dict[str, float] = {}

        # 1. erase prompts (the word, or the latest attack prompt after a self-check)
        erase_rows = []
        for c in now:
            state = self.concepts[c]
            if attacking and ((step - cfg.erase.warmup_steps) % cfg.erase.steps_per_cycle == 0 or state.attack is None):
                result = self.attack(c)
                out.update(attack_loss_first=result.losses[0], attack_loss_last=result.losses[-1])
                if not math.isnan(result.h1):
                    out.update(attack_H1=result.h1, attack_H2=result.h2)
            erase_rows.append(state.attack.assemble(self.conditioner).detach() if attacking else state.word)
        x = PromptBatch.cat(erase_rows)
        n_erase = len(x)

        # 2. retain prompts: every rank draws the same batch and keeps its shard
        shard: list[str] = []
        if self.retain_sampler is not None:
            shard = self.retain_sampler.next_batch()[self.rank :: self.world_size]

        # 3. Top-k selection (most drifted, from the pooled features of a no-grad pass) and the global graph.
        #    The graph and the drift only read pooled features (EOT state, or mean over 1..EOT), which a causal
        #    CLIP encoder computes from the positions up to EOT: those rows are encoded only that far (exact,
        #    issue 8); the UNet rows (erase prompts + selected retain prompts) get all 77 positions.
        zero = torch.zeros((), device=self.sampler.device)
        l_graph, selected = zero, torch.arange(0)
        graph_rows, retain_batch = None, None
        if shard:
            retain_batch = self.conditioner.embed(shard)
            length = self._graph_length(retain_batch)
            cond_o_r = self.retain_original(shard)
            trained_e = self.conditioner.train_encoders
            with torch.no_grad():
                feats_n = self.conditioner.condition(retain_batch, trained=True, length=length,
                                                     through_wrapper=False).features
                drift = torch.stack([(feats_n[e] * cond_o_r.features[e]).sum(-1) for e in trained_e]).mean(0)
                concept_feat = self.concepts[now[0]].cond.features
                concept_sim = torch.stack([(cond_o_r.features[e] * concept_feat[e]).sum(-1) for e in trained_e]).mean(0)
            k_local = max(1, math.ceil(cfg.retain.top_k / self.world_size))
            selected = self._select(drift, concept_sim, k_local)
            if cfg.retain.image_loss_rows and self.method == "sage":  # approximation, opt-in
                m_local = max(1, math.ceil(cfg.retain.image_loss_rows / self.world_size))
                selected = subsample_top_k(selected, m_local, self.generator)
            out["retain_drift_mean"] = float(drift.mean())
            if self.method == "sage" and cfg.retain.graph_weight > 0 and len(shard) >= 2:
                graph_rows = (retain_batch, length)
        unet_batch = PromptBatch.cat([x, retain_batch.select(selected)]) if len(selected) else x
        groups = [(unet_batch, MAX_LENGTH)] + ([graph_rows] if graph_rows is not None else [])
        conds = self.conditioner.condition_groups(groups, trained=True)  # the one τ_n forward with gradient
        student_cond = conds[0]
        if graph_rows is not None:
            l_graph = torch.stack([graph_loss(conds[1].features[e], cond_o_r.features[e],
                                              kind=cfg.retain.graph_loss, temperature=cfg.retain.graph_temperature)
                                   for e in trained_e]).mean()

        # 4. one partial DDIM rollout for [concepts; selected retain prompts], shared i and t
        #    (with erase.rollout_cache: bank entries with their cached t and frozen predictions)
        draw = self.sampler.draw(self.generator)
        concept_cond = Conditioning.cat([self.concepts[c].cond for c in now])
        parts = [concept_cond] + ([cond_o_r.select(selected)] if len(selected) else [])
        roll_cond = Conditioning.cat(parts)
        rows = n_erase + len(selected)
        if self.bank is not None:
            keys = [f"concept:{c}" for c in now] + [f"retain:{shard[int(j)]}" for j in selected]
            sample = self.bank.sample(keys, roll_cond, self.uncond(1), draw.ddim_index, self.generator)
            z, timestep = sample.latents, sample.timesteps
            eps_uncond, eps_concept = sample.eps_uncond[:n_erase], sample.eps_cond[:n_erase]
            eps_retain_original = sample.eps_cond[n_erase:]
        else:
            z = self.sampler.rollout(roll_cond, self.uncond(rows), draw.ddim_index, guidance=cfg.erase.start_guidance,
                                     noise=self.sampler.initial_noise(rows, self.generator))
            timestep = draw.timestep
            # 5a. frozen targets
            with torch.no_grad():
                target_cond = Conditioning.cat([self.uncond(n_erase), roll_cond])
                eps_frozen = self.sampler.eps(torch.cat([z[:n_erase], z]), timestep, target_cond)
                eps_uncond, eps_concept = eps_frozen[:n_erase], eps_frozen[n_erase : 2 * n_erase]
                eps_retain_original = eps_frozen[2 * n_erase :]

        # 5b. the student's predictions (gradient into τ_n, or into the UNet copy for ESD-x) and
        # 6. the total loss and one optimiser step
        graph_weight = cfg.retain.graph_weight if self.method == "sage" else 0.0
        self.optimizer.zero_grad(set_to_none=True)
        interference = cfg.erase.log_interference and n_erase > 1
        if self.student_chunk_size and len(student_cond.encoder_hidden_states) > self.student_chunk_size:
            if interference:  # needs the erase rows' graph into the encoder: one extra forward of those rows
                t_erase = timestep if not torch.is_tensor(timestep) or timestep.ndim == 0 else timestep[:n_erase]
                eps_erase = self.student.eps(z[:n_erase], t_erase, student_cond.select(torch.arange(n_erase)))
                out["interference_cos"] = self._interference(eps_erase, eps_uncond, eps_concept)
            eps_student = self._chunked_student_backward(z, timestep, student_cond, n_erase, eps_uncond, eps_concept,
                                                         eps_retain_original, graph_weight * l_graph)
            with torch.no_grad():
                l_erase, l_image, total = self._losses(eps_student, n_erase, eps_uncond, eps_concept,
                                                       eps_retain_original, graph_weight * l_graph)
            self._check_finite(step, total, l_erase, l_graph, l_image)
        else:
            eps_student = self.student.eps(z, timestep, student_cond)
            l_erase, l_image, total = self._losses(eps_student, n_erase, eps_uncond, eps_concept, eps_retain_original,
                                                   graph_weight * l_graph)
            self._check_finite(step, total, l_erase, l_graph, l_image)
            if interference:
                out["interference_cos"] = self._interference(eps_student[:n_erase], eps_uncond, eps_concept)
            total.backward()
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.trainable_parameters, cfg.optim.grad_clip)
        self.optimizer.step()
        out.update(loss=total.item(), erase_loss=l_erase.item(), graph_loss=l_graph.item(),
                   retain_loss=l_image.item(), ddim_index=float(draw.ddim_index), timestep=float(draw.timestep))
        return out


@torch.no_grad()
def erase_objective(eraser: Eraser, concept: str, *, seed: int, num_draws: int = 4,
                    prompt: PromptBatch | None = None) -> float:
    """L_erase of ``prompt`` (default: the plain concept word) for ``concept``'s targets, averaged over
    ``num_draws`` fixed (i, t, noise) draws of ``seed``.

    A deterministic yardstick for "did training lower the erase objective" (independent of the training
    RNG). The student is τ_n through the frozen UNet, or the original encoder through ESD-x's trained UNet copy.
    Returns a float (mean squared error to the negative-guidance target, spec §1.4).
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
