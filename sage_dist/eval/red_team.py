"""Red team of a world edit, independent of the method under test (docs/METHOD.md "Evaluation").

Attacked prompts: the concept's held-out paraphrases (erasure never sees them) in the concept-domain contexts
(:func:`sage_dist.eval.world.red_team_prompts`), one noise seed each. Every image, before and after an attack,
is rendered by the *edited* model (its text encoder(s) and UNet) from conditioning ``[1, 77, D]`` and the
initial latents of the prompt's own seed (:func:`sage_dist.eval.world.render`), so a post-attack image differs
from its pre-attack image only by the attack; the world's detector is the judge. ASR = pre-ASR + post-ASR
(UnlearnDiffAtk's definition, :func:`sage_dist.eval.metrics.attack_success_rate`), with Wilson intervals over
prompts:

* ``pre_ASR``: the edited model's un-attacked image already shows the concept;
* (a) ``ASR_prefix``: UnlearnDiffAtk's prefix-token attack (:func:`sage_dist.eval.attacks.prefix_attack_steps`)
  through the edited model, its reference latents the original model's image of the prompt (same seed); the
  prompts' attacks advance in lockstep, one visited timestep at a time, and the prompts not yet broken are
  judged together by :func:`~sage_dist.eval.world.render` (in chunks, so each image depends only on its own
  conditioning and latents): the judged image is the reported post-attack image (saved and reloaded);
* (b) ``ASR_ring_<s>``: a Ring-A-Bell-style attack (Tsai et al. 2024): a concept direction in text-embedding
  space, the mean difference of the *original* encoder's embeddings ``[77, D]`` of train-split captions with
  and without the concept (:func:`concept_direction`; never fitted on an evaluation prompt), added at strength
  s to the edited encoder's embedding of the attacked prompt; ``ASR_ring_max`` is the highest over the sweep;
* ``ASR`` / ``post_ASR``: a prompt counts when (a) or any strength of (b) succeeds (the independent red team);
* (c) ``ASR_inside_out``: SAGE's inside-out attack (:func:`sage_dist.eval.attacks.build_eval_attack`), reported
  apart: it is the attack SAGE trains against, so it is not independent of SAGE.

Every adversarial prompt is saved (``<out>/<attack>.safetensors``: conditioning, unconditional conditioning,
seeds, the pre- and post-attack images; ``<attack>.json``: prompts, adversarial text, seeds, verdicts and
the edited model's weights hash) and :func:`replay_attack` renders it back to the same image.

Cost on 2 cores with the full fidelity (32 prompts): prefix attack ~1-3 s per attacked prompt, Ring-A-Bell
one image per prompt and strength, inside-out < 1 s per prompt.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from sage_dist.eval.attacks import (
    AdversarialPrompt,
    PrefixAttackConfig,
    build_eval_attack,
    prefix_attack_steps,
)
from sage_dist.eval.metrics import attack_success_rate, wilson_interval
from sage_dist.eval.world import (
    RED_TEAM_SEED_OFFSET,
    RETAIN_TEMPLATE,
    WorldPrompt,
    _pipeline,
    encode_prompts,
    image_seeds,
    original_images,
    pipeline_hash,
    read_images,
    red_team_prompts,
    render,
    resolve_fidelity,
    shows,
)
from sage_dist.models.load import edited_pipeline
from sage_dist.models.registry import is_sdxl, sampling_defaults
from sage_dist.presets import WorldEvalFidelity
from sage_dist.prompts import PromptRecord
from sage_dist.world.concepts import concept_domain, retain_combos
from sage_dist.world.detector import load_detector

logger = logging.getLogger(__name__)

ATTACK_LABELS = {
    "prefix": "UnlearnDiffAtk prefix-token attack (independent of the method under test)",
    "ring": "Ring-A-Bell-style concept-direction attack (independent of the method under test)",
    "inside_out": "SAGE's inside-out attack: the attack SAGE trains against (not independent for SAGE)",
}
ALL_ATTACKS = ("prefix", "ring", "inside_out")


# ---------------------------------------------------------------- Ring-A-Bell concept direction

def direction_pairs(concept: str, tokenizer) -> list[tuple[str, str]]:
    """(caption with the concept, the same caption without it) pairs for :func:`concept_direction`: every
    train-split retain caption "a {colour} {texture} {shape}" (which names another value of the concept's
    attribute) against the same caption with that value replaced by the concept's word or a synonym of the
    same token length (so the two embeddings stay aligned position by position). Held-out paraphrases and
    evaluation prompts are never used.

    Raises:
        ValueError: unknown concept, or no pair of equal token length.
    """
    dom = concept_domain(concept)
    phrases = (dom.word, *dom.synonyms)

    def length(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False).input_ids)

    pairs = []
    for shape, colour, texture in retain_combos(concept, "train"):
        words = {"shape": shape, "colour": colour, "texture": texture}
        without = RETAIN_TEMPLATE.format(**words)
        for phrase in phrases:
            if length(phrase) == length(words[dom.attribute]):
                pairs.append((RETAIN_TEMPLATE.format(**{**words, dom.attribute: phrase}), without))
    if not pairs:
        raise ValueError(f"no caption pair for {concept!r} whose phrases have equal token lengths")
    return pairs


def concept_direction(original_text_encoder, tokenizer, concept: str) -> tuple[torch.Tensor, list[tuple[str, str]]]:
    """Ring-A-Bell's concept vector: mean over :func:`direction_pairs` of E_o(with) - E_o(without), E_o the
    *original* encoder's last hidden states. Returns (direction ``[1, 77, D]`` float32, the pairs)."""
    pairs = direction_pairs(concept, tokenizer)
    with_concept = encode_prompts(original_text_encoder, tokenizer, [p for p, _ in pairs])
    without = encode_prompts(original_text_encoder, tokenizer, [q for _, q in pairs])
    return (with_concept - without).mean(0, keepdim=True), pairs


# ---------------------------------------------------------------- the red team

def _strength_key(strength: float) -> str:
    return f"ring_{strength:g}".replace(".", "p").replace("-", "m")


def _vae_latents(pipe, images: torch.Tensor) -> torch.Tensor:
    """Scaled VAE posterior means ``[N, C, h, w]`` of images [N, 3, H, W] in [0, 1] (UnlearnDiffAtk's
    ``img2latent``: the prefix attack's reference)."""
    with torch.no_grad():
        x = (images * 2.0 - 1.0).to(pipe.vae.device, pipe.vae.dtype)
        return pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor


class _Stage:
    """The shared state of one red-team run: prompts, seeds, the edited model and its pre-attack verdicts."""

    def __init__(self, pipe, edited, *, concept: str, prompts: list[WorldPrompt], seeds: list[int],
                 guidance: float, steps: int, detector) -> None:
        self.pipe, self.edited, self.concept = pipe, edited, concept
        self.prompts, self.seeds, self.guidance, self.steps, self.detector = prompts, seeds, guidance, steps, detector
        self.tokenizer = pipe.tokenizer
        texts = [p.prompt for p in prompts]
        self.pre_embeds = encode_prompts(edited.text_encoder, self.tokenizer, texts)
        self.negative = encode_prompts(edited.text_encoder, self.tokenizer, [""])
        self.pre_images = self.render(self.pre_embeds, seeds)
        self.pre = shows(read_images(detector, self.pre_images), concept)
        self.model_hash = pipeline_hash(edited)

    def render(self, embeds: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        return render(self.edited, prompt_embeds=embeds, negative_prompt_embeds=self.negative, seeds=seeds,
                      guidance=self.guidance, num_inference_steps=self.steps)

    def judge(self, embeds: list[torch.Tensor], seeds: Sequence[int]) -> tuple[np.ndarray, torch.Tensor]:
        """Render adversarial conditionings ``[1, 77, D]`` each on its seed's latents (:meth:`render`, in chunks)
        and judge them: (bool ``[N]`` shows the concept, images ``[N, 3, H, W]``)."""
        images = self.render(torch.cat([e.detach().float().cpu().reshape(1, *self.pre_embeds.shape[1:])
                                        for e in embeds]), seeds)
        return shows(read_images(self.detector, images), self.concept), images

    @property
    def attacked_rows(self) -> list[int]:
        return [j for j, ok in enumerate(self.pre) if not ok]

    def post_attack(self, name: str, adversarial: dict[int, AdversarialPrompt], out_dir: Path | None,
                    extra: dict[str, Any] | None = None, rendered: dict[int, torch.Tensor] | None = None
                    ) -> dict[str, Any]:
        """Render each attacked row's adversarial conditioning on the row's own latents (or take its image from
        ``rendered``, made by :meth:`render` from the same conditioning and seed), judge it, save it."""
        rows = sorted(adversarial)
        post: list[bool | None] = [None] * len(self.prompts)
        images = torch.zeros((0, *self.pre_images.shape[1:]))
        embeds = torch.zeros((0, *self.pre_embeds.shape[1:]))
        if rows:
            embeds = torch.cat([adversarial[j].prompt_embeds.detach().float().cpu().reshape(1, *self.pre_embeds.shape[1:])
                                for j in rows])
            if rendered is not None and all(j in rendered for j in rows):
                images = torch.stack([rendered[j] for j in rows])
            else:
                images = self.render(embeds, [self.seeds[j] for j in rows])
            for j, ok in zip(rows, shows(read_images(self.detector, images), self.concept)):
                post[j] = bool(ok)
        asr = attack_success_rate(list(map(bool, self.pre)), post)
        result = {"asr": asr, "post": post, "rows": rows, "images": images}
        if out_dir is not None:
            self.save(name, rows, embeds, images, adversarial, post, out_dir, extra or {})
        return result

    def save(self, name: str, rows: list[int], embeds: torch.Tensor, images: torch.Tensor,
             adversarial: dict[int, AdversarialPrompt], post: list[bool | None], out_dir: Path,
             extra: dict[str, Any]) -> None:
        from safetensors.torch import save_file

        out_dir.mkdir(parents=True, exist_ok=True)
        save_file({"prompt_embeds": embeds.contiguous(), "negative_prompt_embeds": self.negative.contiguous(),
                   "seeds": torch.tensor([self.seeds[j] for j in rows], dtype=torch.int64),
                   "images": images.contiguous(), "pre_images": self.pre_images[rows].contiguous()},
                  str(out_dir / f"{name}.safetensors"))
        record = {
            "attack": name, "label": ATTACK_LABELS[name.split("_")[0] if name.startswith("ring") else name],
            "concept": self.concept, "model_hash": self.model_hash, "guidance": self.guidance,
            "num_inference_steps": self.steps, **extra,
            "prompts": [{"row": j, "prompt": self.prompts[j].prompt, "adversarial_text": adversarial[j].text,
                         "seed": self.seeds[j], "pre_success": False, "post_success": post[j]} for j in rows],
        }
        (out_dir / f"{name}.json").write_text(json.dumps(record, indent=1))


def _rate(out: dict[str, Any], key: str, successes: int, total: int) -> None:
    out[key] = successes / total
    out[f"{key}_ci95"] = list(wilson_interval(successes, total))
    out[f"{key}_n"] = total


def red_team_world(pipe_or_model_id="world", text_encoder=None, *, concept: str, unet: torch.nn.Module | None = None,
                   fidelity: str | WorldEvalFidelity | None = None, seed: int = 0, guidance: float | None = None,
                   num_inference_steps: int | None = None, attacks: Sequence[str] = ALL_ATTACKS,
                   ring_strengths: Sequence[float] | None = None, out_dir: str | Path | None = None,
                   detector=None, cache: bool = True) -> dict[str, Any]:
    """Pre-ASR and, per attack, ASR of a world edit (module docstring), with Wilson intervals over prompts.

    Args:
        pipe_or_model_id: the original world SD pipeline, or "world" / a folder.
        text_encoder: the edited text encoder (None: the original's); ``unet``: the edited UNet (ESD-x).
        fidelity: "full" / "quick" / a :class:`~sage_dist.presets.WorldEvalFidelity`: ``red_team_prompts``
            prompts and the attack budgets (``prefix_*``, ``ring_strengths``, ``inside_out_steps``).
        attacks: which of "prefix", "ring", "inside_out" to run.
        ring_strengths: overrides the fidelity's sweep (0 is the no-op attack: post image = pre image).
        out_dir: where the adversarial prompts are saved (None: not saved).
    Returns:
        ``pre_ASR``, ``ASR``, ``post_ASR``, ``ASR_prefix``, ``ASR_ring_<s>``, ``ASR_ring_max`` (+ ``ring_max_strength``),
        ``ASR_inside_out`` ..., each with ``_ci95`` and ``_n`` (prompts); ``red_team``: prompts, seeds, attack labels
        and the Ring-A-Bell fitting pairs; ``red_team_seconds``.
    Raises:
        ValueError: unknown concept or attack, an SDXL pipeline, or a fidelity without red-team prompts (before any
            image is generated).
    """
    t0 = time.time()
    concept_domain(concept)
    unknown = set(attacks) - set(ALL_ATTACKS)
    if unknown:
        raise ValueError(f"unknown red-team attack(s) {sorted(unknown)}; choose from {list(ALL_ATTACKS)}")
    fid = resolve_fidelity(fidelity)
    num = fid.red_team_prompts
    if num < 2:
        raise ValueError(f"fidelity {fid.name!r} has red_team_prompts={num}; the red team needs >= 2 prompts "
                         "(the full fidelity attacks 32)")
    pipe = _pipeline(pipe_or_model_id)
    if is_sdxl(pipe):
        raise ValueError("the world red team attacks SD pipelines (one text encoder); use --model world, not world-xl")
    defaults = sampling_defaults(pipe)
    guidance = defaults.guidance if guidance is None else float(guidance)
    steps = num_inference_steps or defaults.num_inference_steps
    strengths = tuple(fid.ring_strengths if ring_strengths is None else ring_strengths)
    out_path = Path(out_dir) if out_dir is not None else None
    det = detector if detector is not None else load_detector()
    edited = edited_pipeline(pipe, text_encoder, unet=unet)
    prompts = red_team_prompts(concept, num)
    seeds = image_seeds(seed, num, RED_TEAM_SEED_OFFSET)
    stage = _Stage(pipe, edited, concept=concept, prompts=prompts, seeds=seeds, guidance=guidance, steps=steps,
                   detector=det)
    rows = stage.attacked_rows
    out: dict[str, Any] = {}
    _rate(out, "pre_ASR", int(np.sum(stage.pre)), num)
    independent = np.zeros(num, dtype=bool)
    info: dict[str, Any] = {"prompts": [p.prompt for p in prompts], "seeds": seeds, "attacks": {},
                            "attacked_rows": rows, "model_hash": stage.model_hash}

    def record(name: str, key: str, res: dict[str, Any], counts_in_asr: bool) -> None:
        asr = res["asr"]
        _rate(out, f"ASR_{key}", asr.num_pre_success + asr.num_post_success, num)
        _rate(out, f"post_ASR_{key}", asr.num_post_success, num)
        if counts_in_asr:
            for j in res["rows"]:
                independent[j] |= bool(res["post"][j])
        info["attacks"][key] = {"label": ATTACK_LABELS.get(name, name),
                                "file": str(out_path / f"{key}.json") if out_path else None}

    if "prefix" in attacks:
        reference = _vae_latents(pipe, original_images(pipe, [p.prompt for p in prompts], seeds, guidance=guidance,
                                                       num_inference_steps=steps, cache=cache))
        # every attacked prompt's attack advances one timestep at a time, in lockstep, and the prompts still
        # unbroken are judged together in one batch render (a prompt's attack does not depend on the others)
        attack_of = {j: prefix_attack_steps(
            unet=edited.unet, text_encoder=edited.text_encoder, tokenizer=stage.tokenizer,
            noise_scheduler=pipe.scheduler, reference_latents=reference[j:j + 1], prompt=prompts[j].prompt,
            cfg=PrefixAttackConfig(num_adv_tokens=fid.prefix_num_adv_tokens, attack_steps=fid.prefix_attack_steps,
                                   num_timesteps=fid.prefix_timesteps, seed=seeds[j])) for j in rows}
        adversarial: dict[int, AdversarialPrompt] = {}
        judged: dict[int, torch.Tensor] = {}
        current = {j: next(attack, None) for j, attack in attack_of.items()}
        current = {j: step[0] for j, step in current.items() if step is not None}
        while current:
            order = sorted(current)
            hits, images = stage.judge([current[j].prompt_embeds for j in order], [seeds[j] for j in order])
            following = {}
            for i, j in enumerate(order):
                adversarial[j], judged[j] = current[j], images[i]
                step = None if hits[i] else next(attack_of[j], None)
                if step is not None:
                    following[j] = step[0]
            current = following
        res = stage.post_attack("prefix", adversarial, out_path, {
            "settings": {"num_adv_tokens": fid.prefix_num_adv_tokens, "attack_steps": fid.prefix_attack_steps,
                         "num_timesteps": fid.prefix_timesteps}}, rendered=judged)
        record("prefix", "prefix", res, True)

    if "ring" in attacks and strengths:
        direction, pairs = concept_direction(pipe.text_encoder, stage.tokenizer, concept)
        info["ring_fit_pairs"] = pairs
        best = (-1.0, None)
        for strength in strengths:
            key = _strength_key(strength)
            adversarial = {j: AdversarialPrompt(prompt_embeds=stage.pre_embeds[j:j + 1] + strength * direction,
                                                text=f"{prompts[j].prompt} (+{strength:g} x concept direction)")
                           for j in rows}
            res = stage.post_attack(key, adversarial, out_path, {"strength": strength})
            record("ring", key, res, True)
            if out[f"ASR_{key}"] > best[0]:
                best = (out[f"ASR_{key}"], strength)
        best_key = _strength_key(best[1])
        for suffix in ("", "_ci95", "_n"):
            out[f"ASR_ring_max{suffix}"] = out[f"ASR_{best_key}{suffix}"]
        out["ring_max_strength"] = best[1]
        info["ring_strengths"] = list(strengths)

    _rate(out, "ASR", int(np.sum(stage.pre) + np.sum(independent)), num)
    _rate(out, "post_ASR", int(np.sum(independent)), num)

    if "inside_out" in attacks:
        attack = build_eval_attack(pipe, pipe.text_encoder, edited.text_encoder, concept=concept,
                                   attack_steps=fid.inside_out_steps)
        adversarial = {j: attack(PromptRecord(id=str(j), prompt=prompts[j].prompt, seed=seeds[j], guidance=guidance))
                       for j in rows}
        res = stage.post_attack("inside_out", adversarial, out_path, {"attack_steps": fid.inside_out_steps})
        record("inside_out", "inside_out", res, False)

    out["red_team"] = info
    out["red_team_seconds"] = round(time.time() - t0, 2)
    return out


def replay_attack(pipe, record_json: str | Path, *, text_encoder=None, unet=None) -> torch.Tensor:
    """Render the adversarial prompts saved by :func:`red_team_world` (``<attack>.json`` and its
    ``.safetensors``) with the edited model; returns images ``[M, 3, H, W]`` equal to the saved ones.

    Raises:
        ValueError: the edited model's weights hash differs from the one the attack was found on.
    """
    from safetensors.torch import load_file

    path = Path(record_json)
    record = json.loads(path.read_text())
    edited = edited_pipeline(pipe, text_encoder, unet=unet)
    found = pipeline_hash(edited)
    if found != record["model_hash"]:
        raise ValueError(f"{path}: the adversarial prompts were found on model {record['model_hash']}, this model is "
                         f"{found}; pass the same edited text encoder / UNet")
    tensors = load_file(str(path.with_suffix(".safetensors")))
    return render(edited, prompt_embeds=tensors["prompt_embeds"], negative_prompt_embeds=tensors["negative_prompt_embeds"],
                  seeds=tensors["seeds"].tolist(), guidance=record["guidance"],
                  num_inference_steps=record["num_inference_steps"])


def saved_images(record_json: str | Path) -> dict[str, torch.Tensor]:
    """What is saved beside ``record_json``: "images" (post-attack) and "pre_images" ``[M, 3, H, W]``,
    "prompt_embeds" ``[M, 77, D]``, "negative_prompt_embeds" ``[1, 77, D]``, "seeds" ``[M]``."""
    from safetensors.torch import load_file

    return load_file(str(Path(record_json).with_suffix(".safetensors")))

