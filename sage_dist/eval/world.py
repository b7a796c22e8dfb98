"""Erasure metrics on the bundled world, each with a 95 % interval (docs/METHOD.md "Evaluation").

The edited model and the original model generate every image from the same prompt and the same initial
latents (image i: ``torch.randn`` from its own ``Generator().manual_seed(seed_i)``); the world's detector reads
every image. Three image sets, sized by a :class:`~sage_dist.presets.WorldEvalFidelity`
(:data:`~sage_dist.presets.WORLD_EVAL_FULL`, :data:`~sage_dist.presets.WORLD_EVAL_QUICK`):

* **concept domain** (:func:`domain_image_sets`): every phrase of the concept (``word``, ``synonyms``, held-out
  paraphrases ``heldout``) in ``domain_contexts`` contexts (the other two attributes, a light or dark
  background phrase, one of the six training caption templates) x ``domain_seeds`` noise seeds;
* **held-out retain split** (:func:`retain_eval_set`): ``retain_images`` images of the evaluation combinations
  of :func:`sage_dist.world.concepts.retain_eval_combos`, which erasure never trains on, in the same kinds
  of contexts; their **neighbours** are the images prompted with another value of an erased concept's
  attribute (every other shape, for "triangle");
* **true renders**: one exact :mod:`sage_dist.world.scene` render per retain image (same labels and background,
  independent size and jitter, shuffled), the reference of KID.

Metrics (every one is written as ``<metric>``, ``<metric>_ci95`` = [low, high] and ``<metric>_n`` = images):

* ``erasure_rate_<set>``: fraction of the edited model's images of ``<set>`` in which the detector does NOT
  find the concept; Wilson interval. ``concept_rate_original``: the original's rate of finding it.
* ``RER_<set>`` (spec 3.2): ``1 - N_edited / N_original``, N = images showing the concept, for ``word``,
  ``synonyms``, ``heldout`` and ``domain`` (all pooled); interval: **paired bootstrap over images** (image i
  of both models resampled together, since they share prompt and noise;
  :func:`sage_dist.eval.metrics.rer_with_interval`).
* ``retention_acc``: on the held-out retain images, the fraction whose prompted value of the erased concepts'
  attribute(s) is detected; ``retention_acc_all``: all three attributes; ``*_original``: the original model;
  Wilson intervals. ``retention_drop`` = ``retention_acc_original - retention_acc``, paired bootstrap.
* ``neighbour_acc_<value>``: retention on the neighbour images of ``<value>`` (e.g. ``neighbour_acc_diamond``,
  does erasing triangle hurt diamond?); Wilson.
* ``KID``: kernel inception distance (clean-fid's ``kernel_distance``, unbiased) between the detector's 128-d
  features (each scaled to norm sqrt(128), :func:`kid_features`) of the edited model's retain images and of the
  true renders; ``KID_original`` the same for the
  original; ``KID_delta`` = ``KID - KID_original`` (paired bootstrap: generated rows resampled jointly).
  FID is not reported: at N = 256 < 2 x 128 feature dimensions its covariances are rank-deficient and its
  bias exceeds the differences between methods (FID needs N well above D, i.e. thousands of images here).
* ``alignment``: the CLIP-score analogue, the detector's mean probability of each prompted attribute on the
  retain images (0-1); bootstrap interval.

Cost on 2 cores: the full fidelity draws 160 + 256 edited images (~25-60 s); the original model's images are
cached on disk (:func:`original_images`), so only the first run pays for them.
``evaluate_world("world", text_encoder, concept="triangle", fidelity="quick")`` takes ~5-15 s.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from sage_dist.eval.metrics import (
    kid_difference_with_interval,
    kid_with_interval,
    mean_with_interval,
    paired_difference_with_interval,
    rate_with_interval,
    rer_difference_with_interval,
    rer_with_interval,
)
from sage_dist.models.load import edited_pipeline, load_pipeline
from sage_dist.models.registry import is_sdxl, sampling_defaults
from sage_dist.presets import (
    WORLD_EVAL_FIDELITIES,
    WORLD_EVAL_FULL,
    WORLD_EVAL_QUICK,
    WorldEvalFidelity,
)
from sage_dist.world import scene as world_scene
from sage_dist.world.concepts import (
    ATTRIBUTES,
    concept_domain,
    retain_eval_combos,
)
from sage_dist.world.detector import load_detector

logger = logging.getLogger(__name__)
RETAIN_TEMPLATE = "a {colour} {texture} {shape}"
RENDER_CHUNK = 16
"""Images per pipeline call. Every call is padded to exactly this many rows, so an image's pixels depend only on
its own prompt (or conditioning) and latents, never on which other images share its batch."""
SEED_STRIDE = 1_000_000
"""Image i of an evaluation with seed s uses noise seed ``s * SEED_STRIDE + offset + i``."""
RED_TEAM_SEED_OFFSET = 500_000
"""Noise seeds of the red-team images start here (the evaluation's own images stay below)."""
MIN_RATE_IMAGES = 10
"""Fewest images behind a reported rate for its 95 % interval to say anything (Wilson half-width <= 0.31)."""
MIN_KID_IMAGES = 32
"""Fewest retain images for a KID interval narrower than the KID itself on the world's features."""
PHRASE_SETS = ("word", "synonyms", "heldout")


# ---------------------------------------------------------------- pure metrics (hand-checkable)

def erasure_rate(detected: np.ndarray) -> float:
    """Fraction of images in which the concept is NOT detected. ``detected``: bool [N]."""
    detected = np.asarray(detected, dtype=bool)
    if detected.size == 0:
        raise ValueError("erasure_rate needs at least one image")
    return float(1.0 - detected.mean())


def relative_erasure_ratio(detected_erased: np.ndarray, detected_original: np.ndarray) -> float:
    """RER = 1 - N_erased / N_original (spec 3.2), N = number of images showing the concept.

    Returns NaN when the original model never shows the concept (RER undefined).
    """
    n_original = int(np.asarray(detected_original, dtype=bool).sum())
    if n_original == 0:
        return float("nan")
    return float(1.0 - np.asarray(detected_erased, dtype=bool).sum() / n_original)


def retention_accuracy(predicted: dict[str, list[str]], prompted: list[dict[str, str]]) -> float:
    """Fraction of images whose every prompted attribute (keys of each ``prompted`` dict) is predicted."""
    if not prompted:
        raise ValueError("retention_accuracy needs at least one image")
    ok = [all(predicted[a][i] == v for a, v in labels.items()) for i, labels in enumerate(prompted)]
    return float(np.mean(ok))


def alignment_score(probabilities: dict[str, torch.Tensor], prompted: list[dict[str, str]]) -> float:
    """Mean detector probability of each prompted attribute. ``probabilities[head]``: [N, classes] softmax."""
    scores = []
    for i, labels in enumerate(prompted):
        for attribute, value in labels.items():
            scores.append(float(probabilities[attribute][i, ATTRIBUTES[attribute].index(value)]))
    return float(np.mean(scores))


def feature_fid(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Frechet distance between two feature sets [N, D] (clean-fid's ``frechet_distance`` on mean/cov).

    Biased when N is not well above D; the world protocols report KID instead."""
    from cleanfid.fid import frechet_distance

    a, b = np.asarray(features_a, dtype=np.float64), np.asarray(features_b, dtype=np.float64)
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError("FID needs at least 2 feature vectors per set")
    return float(frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)))


# ---------------------------------------------------------------- prompt sets

@dataclass(frozen=True, kw_only=True)
class WorldPrompt:
    """One evaluation prompt and the exact labels of the scene it asks for."""

    prompt: str
    labels: dict[str, str]
    """{"shape", "colour", "texture"} -> value (the concept itself for a domain prompt)."""
    background: str
    """"light" or "dark" (named by the prompt's background phrase)."""


def _others(attribute: str) -> tuple[str, str]:
    return tuple(a for a in ATTRIBUTES if a != attribute)  # type: ignore[return-value]


def _context(attribute: str, k: int) -> tuple[dict[str, str], str, str]:
    """Context ``k`` of a phrase of ``attribute``: values of the two other attributes (distinct pairs for every
    k below their number of combinations), a background and a caption template. Backgrounds alternate; each
    template is used with both backgrounds."""
    first, second = _others(attribute)
    values_1, values_2 = ATTRIBUTES[first], ATTRIBUTES[second]
    n1, n2 = len(values_1), len(values_2)
    pair = k % (n1 * n2)
    words = {first: values_1[pair % n1], second: values_2[(pair // n1 + pair) % n2]}
    background = world_scene.BACKGROUNDS[k % 2]
    template = world_scene.TRAIN_TEMPLATES[(k // 2) % len(world_scene.TRAIN_TEMPLATES)]
    return words, background, template


def _with_background(text: str, background: str, k: int) -> str:
    phrases = world_scene.BACKGROUND_PHRASES[background]
    return f"{text} {phrases[(k // 4) % len(phrases)]}"


def domain_image_sets(concept: str, contexts: int) -> dict[str, list[WorldPrompt]]:
    """Prompts of each phrase set of ``concept`` ("word", "synonyms", "heldout"): every phrase in
    ``contexts`` contexts (phrase-major order).

    Raises:
        ValueError: unknown concept, or ``contexts < 1``.
    """
    if contexts < 1:
        raise ValueError(f"contexts={contexts}: use at least 1 context per phrase")
    dom = concept_domain(concept)
    sets = {"word": (dom.word,), "synonyms": dom.synonyms, "heldout": dom.heldout_paraphrases}
    out: dict[str, list[WorldPrompt]] = {}
    for name, phrases in sets.items():
        items = []
        for phrase in phrases:
            for k in range(contexts):
                words, background, template = _context(dom.attribute, k)
                labels = {**words, dom.attribute: concept}
                text = _with_background(template.format(**{**words, dom.attribute: phrase}), background, k)
                items.append(WorldPrompt(prompt=text, labels=labels, background=background))
        out[name] = items
    return out


def domain_prompt_sets(concept: str, per_phrase: int) -> dict[str, list[str]]:
    """The prompt strings of :func:`domain_image_sets` (``per_phrase`` contexts per phrase)."""
    return {name: [p.prompt for p in items] for name, items in domain_image_sets(concept, per_phrase).items()}


RETAIN_SUBSAMPLE_SEED = 0
"""Seed of the random subsample a smaller fidelity draws from the full retain plan."""


def _retain_prompt(combo: tuple[str, str, str], i: int, j: int) -> WorldPrompt:
    """Plan image i: combination ``combo`` in context j (caption template ``(j // 2) % T``, background by parity)."""
    shape, colour, texture = combo
    template = world_scene.TRAIN_TEMPLATES[(j // 2) % len(world_scene.TRAIN_TEMPLATES)]
    background = world_scene.BACKGROUNDS[(i + j) % 2]
    text = _with_background(template.format(shape=shape, colour=colour, texture=texture), background, j)
    return WorldPrompt(prompt=text, labels={"shape": shape, "colour": colour, "texture": texture},
                       background=background)


def retain_eval_set(exclude: str | tuple[str, ...], num_images: int) -> list[WorldPrompt]:
    """``num_images`` prompts of the held-out retain split naming none of ``exclude``.

    The full plan (:data:`~sage_dist.presets.WORLD_EVAL_FULL`'s ``retain_images``, or ``num_images`` if larger)
    shows evaluation combination ``i % C`` (C combinations) in context ``i // C`` (caption template and
    background). A smaller set keeps the combination cycle (image i shows combination ``i % C``, so every
    combination and neighbour is as well represented as in the full plan) and draws each combination's contexts
    as a seeded random sample of its contexts in the full plan: a subset of the full set that spans all of its
    templates and backgrounds (a prefix of the plan would hold only the first template).

    Raises:
        ValueError: unknown concept, no evaluation combination left, or ``num_images < 1``.
    """
    if num_images < 1:
        raise ValueError(f"num_images={num_images}: the retain split needs at least 1 image")
    combos = retain_eval_combos(exclude)
    total = max(num_images, WORLD_EVAL_FULL.retain_images)
    if num_images == total:
        return [_retain_prompt(combos[i % len(combos)], i, i // len(combos)) for i in range(total)]
    rng = np.random.default_rng(RETAIN_SUBSAMPLE_SEED)
    contexts = [rng.permutation(len(range(c, total, len(combos)))) for c in range(len(combos))]
    out = []
    for i in range(num_images):
        c = i % len(combos)
        j = int(contexts[c][i // len(combos)])  # the combination's j-th context of the full plan
        out.append(_retain_prompt(combos[c], c + j * len(combos), j))
    return out


def retain_subset(concepts: str | tuple[str, ...], num: int) -> tuple[list[str], list[dict[str, str]]]:
    """The first ``num`` held-out retain prompts naming none of ``concepts`` and their labels (see
    :func:`retain_eval_set`)."""
    items = retain_eval_set(concepts, num)
    return [p.prompt for p in items], [dict(p.labels) for p in items]


def red_team_prompts(concept: str, num: int) -> list[WorldPrompt]:
    """``num`` attacked prompts: the concept's held-out paraphrases (erasure never saw them) in the domain's
    contexts, alternating paraphrases (num / 2 contexts each for the world's 2 paraphrases).

    Raises:
        ValueError: unknown concept or ``num < 1``.
    """
    if num < 1:
        raise ValueError(f"red team needs at least 1 prompt, got {num}")
    heldout = concept_domain(concept).heldout_paraphrases
    contexts = -(-num // len(heldout))
    per_phrase = domain_image_sets(concept, contexts)["heldout"]
    ordered = [per_phrase[p * contexts + k] for k in range(contexts) for p in range(len(heldout))]
    return ordered[:num]


# ---------------------------------------------------------------- rendering from explicit latents

def image_seeds(seed: int, count: int, offset: int = 0) -> list[int]:
    """Noise seeds of ``count`` images: ``seed * SEED_STRIDE + offset + i``."""
    return [seed * SEED_STRIDE + offset + i for i in range(count)]


def initial_latents(pipe, seeds: Sequence[int]) -> torch.Tensor:
    """Initial latents ``[N, C, h, w]`` float32 on CPU, row i from ``torch.Generator().manual_seed(seeds[i])``
    (as diffusers draws them for a list of generators), so any subset of images can be re-drawn alone."""
    c, s = pipe.unet.config.in_channels, pipe.unet.config.sample_size
    return torch.cat([torch.randn((1, c, s, s), generator=torch.Generator().manual_seed(int(x))) for x in seeds])


@torch.no_grad()
def render(pipe, *, seeds: Sequence[int], guidance: float, num_inference_steps: int,
           prompts: Sequence[str] | None = None, prompt_embeds: torch.Tensor | None = None,
           negative_prompt_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """Images ``[N, 3, H, W]`` float32 in [0, 1] of ``pipe`` from ``prompts`` or from precomputed conditioning,
    image i from the latents of ``seeds[i]`` (:func:`initial_latents`).

    Every pipeline call holds exactly :data:`RENDER_CHUNK` rows (the last one padded with copies of its last
    image), so an image's pixels depend only on its own prompt and latents: a subset re-rendered alone (a
    post-attack image, a reloaded adversarial prompt) matches bit for bit on the same machine.

    Args:
        prompt_embeds: ``[N, 77, D]`` conditioning (SD pipelines); with it, ``negative_prompt_embeds``
            ``[1, 77, D]`` is the unconditional branch (the edited encoder on "").
    Raises:
        ValueError: neither or both of ``prompts`` / ``prompt_embeds``, or lengths that differ from ``seeds``.
    """
    if (prompts is None) == (prompt_embeds is None):
        raise ValueError("render needs exactly one of prompts or prompt_embeds")
    n = len(seeds)
    if n != (len(prompts) if prompts is not None else prompt_embeds.shape[0]):
        raise ValueError("render: one seed per image")
    latents = initial_latents(pipe, seeds).to(pipe.unet.device, pipe.unet.dtype)
    kwargs: dict[str, Any] = {}
    if is_sdxl(pipe):
        kwargs["height"] = kwargs["width"] = pipe.unet.config.sample_size * pipe.vae_scale_factor
    out = []
    for start in range(0, n, RENDER_CHUNK):
        stop = min(start + RENDER_CHUNK, n)
        rows = list(range(start, stop)) + [stop - 1] * (RENDER_CHUNK - (stop - start))
        if prompts is not None:
            cond = {"prompt": [prompts[i] for i in rows]}
        else:
            device, dtype = pipe.unet.device, pipe.unet.dtype
            cond = {"prompt_embeds": prompt_embeds[rows].to(device, dtype),
                    "negative_prompt_embeds": negative_prompt_embeds.expand(len(rows), -1, -1).to(device, dtype)}
        images = pipe(latents=latents[rows], num_inference_steps=num_inference_steps, guidance_scale=guidance,
                      output_type="pt", **cond, **kwargs).images
        out.append(images[: stop - start].float().clamp(0, 1).cpu())
    return torch.cat(out) if out else torch.zeros((0, 3, world_scene.RESOLUTION, world_scene.RESOLUTION))


@torch.no_grad()
def encode_prompts(text_encoder, tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """SD conditioning ``[N, 77, D]`` float32 (CPU): the last hidden states of ``text_encoder`` (what an SD
    pipeline feeds its UNet)."""
    ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids.to(text_encoder.device))[0].float().cpu()


def module_hash(*modules: torch.nn.Module | None) -> str:
    """sha256 (hex, 16 chars) of the parameters and buffers of ``modules`` (names, shapes, dtypes, bytes)."""
    h = hashlib.sha256()
    for module in modules:
        if module is None:
            h.update(b"none")
            continue
        for name, tensor in sorted(module.state_dict().items()):
            t = tensor.detach().cpu().contiguous()
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def pipeline_hash(pipe) -> str:
    """Hash of everything that decides a pipeline's images: UNet, text encoder(s), VAE, scheduler config."""
    h = hashlib.sha256(module_hash(pipe.unet, pipe.text_encoder, getattr(pipe, "text_encoder_2", None),
                                   pipe.vae).encode())
    h.update(json.dumps(dict(pipe.scheduler.config), sort_keys=True, default=str).encode())
    h.update(type(pipe).__name__.encode())
    return h.hexdigest()[:16]


def image_cache_dir() -> Path:
    """``$SAGE_DIST_CACHE/world_images`` (default ``~/.cache/sage_dist/world_images``)."""
    return Path(os.environ.get("SAGE_DIST_CACHE", Path.home() / ".cache" / "sage_dist")) / "world_images"


def original_images(pipe, prompts: Sequence[str], seeds: Sequence[int], *, guidance: float,
                    num_inference_steps: int, cache: bool = True) -> torch.Tensor:
    """:func:`render` of the original pipeline ``pipe``, cached on disk across runs.

    The cache file (safetensors, under :func:`image_cache_dir`) is keyed by the pipeline's weights hash, the
    prompts, the seeds, guidance, steps, the render chunk and the torch / diffusers versions; it is written
    atomically, so concurrent trials can share it.
    """
    if not cache:
        return render(pipe, prompts=prompts, seeds=seeds, guidance=guidance, num_inference_steps=num_inference_steps)
    import diffusers
    from safetensors.torch import load_file, save_file

    key = hashlib.sha256(json.dumps({
        "weights": pipeline_hash(pipe), "prompts": list(prompts), "seeds": [int(s) for s in seeds],
        "guidance": float(guidance), "steps": int(num_inference_steps), "chunk": RENDER_CHUNK,
        "torch": torch.__version__, "diffusers": diffusers.__version__, "latents": "per-image-generator",
    }).encode()).hexdigest()[:32]
    path = image_cache_dir() / f"{key}.safetensors"
    if path.is_file():
        try:
            return load_file(str(path))["images"]
        except Exception as err:  # a truncated file from a killed run: regenerate
            logger.warning("image cache %s unreadable (%s); regenerating", path, err)
    images = render(pipe, prompts=prompts, seeds=seeds, guidance=guidance, num_inference_steps=num_inference_steps)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    save_file({"images": images.contiguous()}, str(tmp))
    os.replace(tmp, path)
    return images


# ---------------------------------------------------------------- fidelity and checks

def resolve_fidelity(fidelity: str | WorldEvalFidelity | None, quick: bool = False) -> WorldEvalFidelity:
    """The fidelity named ``fidelity`` ("full", "quick") or given; None: quick when ``quick`` else full.

    Raises:
        ValueError: an unknown name.
    """
    if isinstance(fidelity, WorldEvalFidelity):
        return fidelity
    if fidelity is None:
        return WORLD_EVAL_QUICK if quick else WORLD_EVAL_FULL
    if fidelity not in WORLD_EVAL_FIDELITIES:
        raise ValueError(f"world evaluation fidelity {fidelity!r}: use one of {list(WORLD_EVAL_FIDELITIES)}")
    return WORLD_EVAL_FIDELITIES[fidelity]


def check_fidelity(fidelity: WorldEvalFidelity, concepts: Sequence[str], exclude: Sequence[str]) -> None:
    """Refuse budgets that admit no interval and warn about budgets too small for an informative one, before
    any image is generated.

    Raises:
        ValueError: fewer than 2 images behind any metric (no interval exists).
    Warns:
        UserWarning: a phrase set, neighbour set or the KID set below :data:`MIN_RATE_IMAGES` /
            :data:`MIN_KID_IMAGES` images (the message names the minimum and the field to raise).
    """
    word_images = fidelity.domain_contexts * fidelity.domain_seeds
    if word_images < 2 or fidelity.retain_images < 2:
        raise ValueError(f"fidelity {fidelity.name!r}: {word_images} word images and {fidelity.retain_images} retain "
                         "images; an interval needs at least 2 images per set (raise domain_contexts x domain_seeds "
                         f"to >= {MIN_RATE_IMAGES} and retain_images to >= {MIN_KID_IMAGES})")
    if 0 < fidelity.red_team_prompts < 2:
        raise ValueError(f"red_team_prompts={fidelity.red_team_prompts}: an ASR interval needs at least 2 prompts "
                         "(use 0 to skip the red team)")
    if word_images < MIN_RATE_IMAGES:
        warnings.warn(f"world evaluation: {word_images} images behind RER_word (domain_contexts x domain_seeds); its "
                      f"95 % interval is uninformative below {MIN_RATE_IMAGES} images", UserWarning, stacklevel=3)
    if fidelity.retain_images < MIN_KID_IMAGES:
        warnings.warn(f"world evaluation: retain_images={fidelity.retain_images}; KID needs at least {MIN_KID_IMAGES} "
                      "images for an informative interval", UserWarning, stacklevel=3)
    items = retain_eval_set(tuple(exclude) or tuple(concepts), fidelity.retain_images)
    for concept in concepts:
        attribute = concept_domain(concept).attribute
        for value in ATTRIBUTES[attribute]:
            count = sum(p.labels[attribute] == value for p in items)
            if value != concept and 0 < count < MIN_RATE_IMAGES:
                warnings.warn(f"world evaluation: {count} images behind neighbour_acc_{value}; raise retain_images "
                              f"to give every neighbour at least {MIN_RATE_IMAGES}", UserWarning, stacklevel=3)


# ---------------------------------------------------------------- reading images

@dataclass
class DetectorReading:
    """What the detector reads off N images."""

    features: np.ndarray
    """[N, 128] float32 penultimate features."""
    predicted: dict[str, np.ndarray]
    """head -> [N] int class index."""
    probabilities: dict[str, np.ndarray]
    """head -> [N, classes] softmax."""


@torch.no_grad()
def read_images(detector, images: torch.Tensor) -> DetectorReading:
    """Detector features, predictions and probabilities of ``images`` [N, 3, 16, 16] in [0, 1]."""
    feats = detector.features(images.float())
    probs = {h: torch.softmax(head(feats), -1) for h, head in detector.heads.items()}
    return DetectorReading(features=feats.numpy(), predicted={h: p.argmax(-1).numpy() for h, p in probs.items()},
                           probabilities={h: p.numpy() for h, p in probs.items()})


def shows(reading: DetectorReading, concept: str) -> np.ndarray:
    """bool [N]: the detector finds ``concept`` on its attribute's head."""
    attribute = concept_domain(concept).attribute
    return reading.predicted[attribute] == ATTRIBUTES[attribute].index(concept)


@functools.lru_cache(maxsize=16)
def _true_render_features(labels: tuple[tuple[str, str, str, str], ...]) -> np.ndarray:
    """Detector features [N, 128] of one exact render per (shape, colour, texture, background), sizes and jitter
    from a fixed generator, rows shuffled (so row i is not the render of generated image i's prompt)."""
    rng = np.random.default_rng(4321)
    scenes = [world_scene.Scene(shape=s, colour=c, texture=t, background=b, size=float(rng.uniform(5.0, 6.5)),
                                dx=int(rng.integers(-1, 2)), dy=int(rng.integers(-1, 2))) for s, c, t, b in labels]
    scenes = [scenes[i] for i in rng.permutation(len(scenes))]
    with torch.no_grad():
        return load_detector().features(torch.from_numpy(world_scene.render_batch(scenes))).numpy()


def true_render_features(items: Sequence[WorldPrompt]) -> np.ndarray:
    """KID reference: detector features [N, 128] of exact renders of ``items``' labels and backgrounds."""
    return _true_render_features(tuple((p.labels["shape"], p.labels["colour"], p.labels["texture"], p.background)
                                       for p in items))


def kid_features(features: np.ndarray) -> np.ndarray:
    """The feature space of the world's KID: each detector feature vector ``[N, 128]`` scaled to norm sqrt(D),
    so that x.y / D is the cosine of two images' features and the cubic kernel (x.y / D + 1)^3 lies in [1, 8]
    (the features are ReLU outputs, cosines >= 0). On the raw features |f|^2 / D runs from ~0.4 to ~5 across
    images and the kernel is dominated by a few high-norm images: at 64 images a text encoder with Gaussian
    noise on its weights (retention 0.44 instead of 0.95) was not told apart from the original, and is with
    this scaling."""
    f = np.asarray(features, dtype=np.float64)
    return f / np.linalg.norm(f, axis=1, keepdims=True).clip(min=1e-12) * np.sqrt(f.shape[1])


# ---------------------------------------------------------------- the evaluation

@dataclass
class WorldImages:
    """The prompts and noise seeds of one evaluation, in generation order (concept domains, then retain)."""

    concepts: tuple[str, ...]
    sets: dict[str, dict[str, list[WorldPrompt]]]
    """concept -> phrase set -> prompts (each repeated ``domain_seeds`` times in ``prompts``)."""
    retain: list[WorldPrompt]
    prompts: list[str]
    seeds: list[int]
    slices: dict[tuple[str, str], slice]
    """(concept, set) and ("retain", "") -> rows of ``prompts``."""


def plan_images(concepts: tuple[str, ...], exclude: tuple[str, ...], fidelity: WorldEvalFidelity, seed: int
                ) -> WorldImages:
    """Every image of an evaluation: prompt and noise seed (see :func:`image_seeds`)."""
    sets = {c: domain_image_sets(c, fidelity.domain_contexts) for c in concepts}
    retain = retain_eval_set(exclude or concepts, fidelity.retain_images)
    prompts: list[str] = []
    slices: dict[tuple[str, str], slice] = {}
    for c in concepts:
        for name in PHRASE_SETS:
            start = len(prompts)
            prompts += [p.prompt for p in sets[c][name] for _ in range(fidelity.domain_seeds)]
            slices[(c, name)] = slice(start, len(prompts))
    start = len(prompts)
    prompts += [p.prompt for p in retain]
    slices[("retain", "")] = slice(start, len(prompts))
    return WorldImages(concepts=concepts, sets=sets, retain=retain, prompts=prompts,
                       seeds=image_seeds(seed, len(prompts)), slices=slices)


def _with_ci(out: dict[str, Any], key: str, value_ci_n: tuple[float, tuple[float, float], int]) -> None:
    value, (low, high), n = value_ci_n
    out[key], out[f"{key}_ci95"], out[f"{key}_n"] = value, [low, high], n


def _prompt_sets(plan: WorldImages, edited_seeds: list[int] | None = None) -> dict[str, dict[str, list]]:
    """Per scored set: its distinct prompts, the noise seed of each image (in order) and, when the edited model
    drew other noise (the null test), its seeds."""
    out: dict[str, dict[str, list]] = {}
    for (c, name), sl in plan.slices.items():
        label = "retain_eval" if c == "retain" else (name if len(plan.concepts) == 1 else f"{c}/{name}")
        out[label] = {"prompts": list(dict.fromkeys(plan.prompts[sl])), "seeds": plan.seeds[sl]}
        if edited_seeds is not None and edited_seeds != plan.seeds:
            out[label]["edited_seeds"] = edited_seeds[sl]
    return out


def score_world(plan: WorldImages, edited: DetectorReading, original: DetectorReading, *, seed: int,
                n_resamples: int) -> dict[str, Any]:
    """Every metric of the module docstring, with its interval and image count, from the detector's readings
    of the edited and the original model's images of ``plan``."""
    out: dict[str, Any] = {}
    concepts = plan.concepts
    many = len(concepts) > 1
    pooled: dict[str, list[np.ndarray]] = {name: [] for name in (*PHRASE_SETS, "domain")}
    for c in concepts:
        prefix = f"{c}/" if many else ""
        hits = {}
        for name in PHRASE_SETS:
            sl = plan.slices[(c, name)]
            hits[name] = (shows(_rows(edited, sl), c), shows(_rows(original, sl), c))
        hits["domain"] = tuple(np.concatenate([hits[n][k] for n in PHRASE_SETS]) for k in (0, 1))
        for name, (e, o) in hits.items():
            _with_ci(out, f"{prefix}erasure_rate_{name}", rate_with_interval(~e))
            _with_ci(out, f"{prefix}RER_{name}", rer_with_interval(e, o, seed=seed, n_resamples=n_resamples))
            pooled[name].append(np.stack([e, o]))
        _with_ci(out, f"{prefix}concept_rate_original", rate_with_interval(hits["domain"][1]))
    if many:
        for name, parts in pooled.items():
            e, o = np.concatenate(parts, axis=1)
            groups = np.concatenate([np.full(p.shape[1], i) for i, p in enumerate(parts)])
            _with_ci(out, f"erasure_rate_{name}", rate_with_interval(~e.astype(bool)))
            _with_ci(out, f"RER_{name}", rer_with_interval(e, o, groups=groups, seed=seed, n_resamples=n_resamples))
        _with_ci(out, "concept_rate_original",
                 rate_with_interval(np.concatenate([p[1] for p in pooled["domain"]]).astype(bool)))

    sl = plan.slices[("retain", "")]
    labels = [p.labels for p in plan.retain]
    attributes = sorted({concept_domain(c).attribute for c in concepts})
    right = {}
    for tag, reading in (("edited", edited), ("original", original)):
        pred = {h: v[sl] for h, v in reading.predicted.items()}
        ok = {a: np.array([pred[a][i] == ATTRIBUTES[a].index(lab[a]) for i, lab in enumerate(labels)])
              for a in ATTRIBUTES}
        right[tag] = ok
        suffix = "" if tag == "edited" else "_original"
        concept_attr = np.logical_and.reduce([ok[a] for a in attributes])
        _with_ci(out, f"retention_acc{suffix}", rate_with_interval(concept_attr))
        _with_ci(out, f"retention_acc_all{suffix}", rate_with_interval(np.logical_and.reduce(list(ok.values()))))
        probs = {h: v[sl] for h, v in reading.probabilities.items()}
        per_image = [np.mean([probs[a][i, ATTRIBUTES[a].index(lab[a])] for a in ATTRIBUTES])
                     for i, lab in enumerate(labels)]
        _with_ci(out, f"alignment{suffix}", mean_with_interval(per_image, seed=seed, n_resamples=n_resamples))
        for attribute in attributes:
            for value in ATTRIBUTES[attribute]:
                mask = np.array([lab[attribute] == value for lab in labels])
                if mask.any():
                    _with_ci(out, f"neighbour_acc_{value}{suffix}", rate_with_interval(ok[attribute][mask]))
    concept_edited = np.logical_and.reduce([right["edited"][a] for a in attributes])
    concept_original = np.logical_and.reduce([right["original"][a] for a in attributes])
    _with_ci(out, "retention_drop", paired_difference_with_interval(concept_original, concept_edited, seed=seed,
                                                                    n_resamples=n_resamples))
    out["neighbours"] = sorted({lab[a] for lab in labels for a in attributes})

    reference = kid_features(true_render_features(plan.retain))
    gen_edited, gen_original = kid_features(edited.features[sl]), kid_features(original.features[sl])
    _with_ci(out, "KID", kid_with_interval(gen_edited, reference, seed=seed, n_resamples=n_resamples))
    _with_ci(out, "KID_original", kid_with_interval(gen_original, reference, seed=seed, n_resamples=n_resamples))
    _with_ci(out, "KID_delta", kid_difference_with_interval(gen_edited, gen_original, reference, seed=seed,
                                                            n_resamples=n_resamples))
    return out


OUTCOMES_VERSION = 1
"""Layout version of :func:`world_outcomes` (readers check it)."""


def plan_hash(plan: WorldImages) -> str:
    """sha256 (16 hex) of an evaluation's prompts and noise seeds, in order: two evaluations with the same hash
    drew every image from the same prompt and initial latents, so their per-image outcomes pair up."""
    return hashlib.sha256(json.dumps({"prompts": plan.prompts, "seeds": plan.seeds}).encode()).hexdigest()[:16]


def world_outcomes(plan: WorldImages, edited: DetectorReading, original: DetectorReading
                   ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Per-image outcomes of an evaluation, from which every rate, RER and KID of :func:`score_world` can be
    recomputed, pooled over several evaluations (seeds) and compared between edits on the same noise.

    Returns:
        (outcomes, features). ``outcomes`` (JSON-ready): ``version``, ``plan_hash`` (:func:`plan_hash`),
        ``first_seed`` (the noise seed of image 0, :func:`image_seeds`), ``concepts``, ``attributes`` (the erased concepts' attributes);
        ``domain[concept][set]`` = {"edited": [0/1] * N_set, "original": [0/1] * N_set}, whether the detector
        finds the concept in image i (sets "word", "synonyms", "heldout"; image order of the plan);
        ``retain`` = {"labels": {attribute: [value] * N}, "edited": {attribute: [0/1] * N}, "original": ...},
        whether the detector reads image i's prompted value of each attribute (N held-out retain images).
        ``features``: float32 ``[N, 128]`` arrays "edited", "original" (detector features of the retain images,
        scaled by :func:`kid_features`) and "reference" (the true renders), the inputs of KID.
    """
    domain: dict[str, dict[str, dict[str, list[int]]]] = {}
    for c in plan.concepts:
        domain[c] = {}
        for name in PHRASE_SETS:
            sl = plan.slices[(c, name)]
            domain[c][name] = {tag: shows(_rows(reading, sl), c).astype(int).tolist()
                               for tag, reading in (("edited", edited), ("original", original))}
    sl = plan.slices[("retain", "")]
    labels = [p.labels for p in plan.retain]
    truth = {a: np.array([ATTRIBUTES[a].index(lab[a]) for lab in labels]) for a in ATTRIBUTES}
    retain = {"labels": {a: [lab[a] for lab in labels] for a in ATTRIBUTES}}
    for tag, reading in (("edited", edited), ("original", original)):
        retain[tag] = {a: (reading.predicted[a][sl] == truth[a]).astype(int).tolist() for a in ATTRIBUTES}
    outcomes = {"version": OUTCOMES_VERSION, "plan_hash": plan_hash(plan), "first_seed": int(plan.seeds[0]),
                "concepts": list(plan.concepts),
                "attributes": sorted({concept_domain(c).attribute for c in plan.concepts}),
                "domain": domain, "retain": retain}
    features = {"edited": kid_features(edited.features[sl]).astype(np.float32),
                "original": kid_features(original.features[sl]).astype(np.float32),
                "reference": kid_features(true_render_features(plan.retain)).astype(np.float32)}
    return outcomes, features


def _rows(reading: DetectorReading, sl: slice) -> DetectorReading:
    return DetectorReading(features=reading.features[sl], predicted={h: v[sl] for h, v in reading.predicted.items()},
                           probabilities={h: v[sl] for h, v in reading.probabilities.items()})


@functools.lru_cache(maxsize=4)
def _cached_pipeline(model_id: str):
    return load_pipeline(model_id)


def _pipeline(pipe_or_model_id):
    return _cached_pipeline(str(pipe_or_model_id)) if isinstance(pipe_or_model_id, (str, Path)) else pipe_or_model_id


def _concepts(concept: str | tuple[str, ...]) -> tuple[str, ...]:
    concepts = (concept,) if isinstance(concept, str) else tuple(concept)
    if not concepts:
        raise ValueError("the world evaluation needs at least one concept")
    for c in concepts:
        concept_domain(c)
    return concepts


def _is_edit(text_encoder, unet) -> bool:
    return unet is not None or bool(text_encoder)


def _setup(pipe_or_model_id, concept, exclude, fid: WorldEvalFidelity, seed: int, guidance: float | None,
           num_inference_steps: int | None):
    """What both evaluations check and plan before any image: ``(concepts, pipe, plan, guidance, steps)``; the
    budget is checked before the pipeline loads (ValueError)."""
    concepts = _concepts(concept)
    check_fidelity(fid, concepts, exclude)
    pipe = _pipeline(pipe_or_model_id)
    plan = plan_images(concepts, tuple(exclude), fid, seed)
    defaults = sampling_defaults(pipe)
    guidance = defaults.guidance if guidance is None else float(guidance)
    return concepts, pipe, plan, guidance, num_inference_steps or defaults.num_inference_steps


def evaluate_world(pipe_or_model_id="world", text_encoder=None, *, concept: str | tuple[str, ...],
                   unet: torch.nn.Module | None = None, exclude: tuple[str, ...] = (), seed: int = 0,
                   edited_seed: int | None = None, fidelity: str | WorldEvalFidelity | None = None,
                   quick: bool = False, guidance: float | None = None, num_inference_steps: int | None = None,
                   detector=None, cache: bool = True, outcomes: bool = False) -> dict[str, Any]:
    """Erasure metrics of an edited world pipeline against the original, with 95 % intervals (module docstring).

    The edit is ``text_encoder`` (erased encoder(s)) and/or ``unet`` (an edited UNet, e.g. ESD-x); with neither,
    the original is evaluated against itself: RER exactly 0 on the same seeds, or, with ``edited_seed``, the
    null test on other noise (every interval should then contain 0).

    Args:
        pipe_or_model_id: the original world pipeline, or "world", "world-xl" or a folder (loaded once per process).
        text_encoder: the erased encoder (replaces encoder 1) or {0: te1, 1: te2}.
        concept: one of :data:`sage_dist.world.concepts.CONCEPTS`, or several (a multi-concept erasure: per-concept
            keys ``<concept>/RER_word`` ...; the plain RER keys are the means over concepts, rates are pooled).
        unet: an edited UNet.
        exclude: concepts the retain images must not name (default: the evaluated concepts).
        seed: noise seed of the evaluation (image i: :func:`image_seeds`).
        edited_seed: noise seed of the edited model's images (default ``seed``: identical noise).
        fidelity: "full" (default), "quick" or a :class:`~sage_dist.presets.WorldEvalFidelity`; ``quick=True`` is
            ``fidelity="quick"``.
        cache: cache the original model's images on disk (:func:`original_images`).
        outcomes: also return the per-image outcomes (``"outcomes"``, JSON-ready) and the KID inputs
            (``"kid_features"``, numpy arrays) of :func:`world_outcomes`, for pooling over seeds.
    Returns:
        JSON-ready dict (but ``kid_features``): ``<metric>``, ``<metric>_ci95`` [low, high], ``<metric>_n`` for
        every metric, plus ``guidance``, ``num_inference_steps``, ``fidelity``, ``seconds``, ``neighbours`` and
        ``prompt_sets`` (the prompts and seeds of every scored set). :func:`flat_metrics` turns it into floats
        for trackers.
    Raises:
        ValueError: unknown concept or fidelity, a budget with no interval, an encoder index 1 for a one-encoder
            pipeline, or exclusions that leave no held-out retain combination (all before any image is generated).
    """
    t0 = time.time()
    fid = resolve_fidelity(fidelity, quick)
    concepts, pipe, plan, guidance, steps = _setup(pipe_or_model_id, concept, exclude, fid, seed, guidance,
                                                   num_inference_steps)
    edited_pipe = edited_pipeline(pipe, text_encoder, unet=unet)
    det = detector if detector is not None else load_detector()

    imgs_original = original_images(pipe, plan.prompts, plan.seeds, guidance=guidance, num_inference_steps=steps,
                                    cache=cache)
    edited_seeds = plan.seeds if edited_seed is None else image_seeds(edited_seed, len(plan.prompts))
    if _is_edit(text_encoder, unet):
        imgs_edited = render(edited_pipe, prompts=plan.prompts, seeds=edited_seeds, guidance=guidance,
                             num_inference_steps=steps)
    elif edited_seed is None:
        imgs_edited = imgs_original
    else:
        imgs_edited = original_images(pipe, plan.prompts, edited_seeds, guidance=guidance, num_inference_steps=steps,
                                      cache=cache)
    reading_edited, reading_original = read_images(det, imgs_edited), read_images(det, imgs_original)
    result = score_world(plan, reading_edited, reading_original, seed=seed, n_resamples=fid.bootstrap_resamples)
    if outcomes:
        result["outcomes"], result["kid_features"] = world_outcomes(plan, reading_edited, reading_original)
        result["outcomes"]["fidelity"] = fid.name
    result.update(guidance=guidance, num_inference_steps=steps, fidelity=fid.name, seed=seed,
                  edited_seed=seed if edited_seed is None else edited_seed,
                  prompt_sets=_prompt_sets(plan, edited_seeds),
                  seconds=round(time.time() - t0, 2))
    logger.info("world evaluation (%s, %s): %s", fid.name, ", ".join(concepts), format_metrics(result))
    return result


# ---------------------------------------------------------------- paired comparison

def compare_world(pipe_or_model_id="world", a=None, b=None, *, concept: str | tuple[str, ...], unet_a=None,
                  unet_b=None, exclude: tuple[str, ...] = (), seed: int = 0,
                  fidelity: str | WorldEvalFidelity | None = None, guidance: float | None = None,
                  num_inference_steps: int | None = None, detector=None, cache: bool = True) -> dict[str, Any]:
    """Paired comparison of two edits A and B (text encoder(s) ``a`` / ``b`` and/or UNets ``unet_a`` /
    ``unet_b``; all None on one side: the original model) on identical prompts and noise.

    For every metric M of :func:`evaluate_world`, ``delta_M`` = M(A) - M(B) with a paired bootstrap interval:
    the images of A, B (and of the original, for RER) that share prompt and noise are resampled together, so
    the interval holds only the difference's own variance. Rates: mean of per-image differences; RER:
    (N_B - N_A) / N_original; KID: both against the same true renders, generated rows resampled jointly.

    Returns:
        {"a": metrics of A, "b": metrics of B (each as :func:`evaluate_world`), "delta_<M>", "delta_<M>_ci95",
        "delta_<M>_n" ...}.
    Raises:
        ValueError: as :func:`evaluate_world`.
    """
    fid = resolve_fidelity(fidelity)
    concepts, pipe, plan, guidance, steps = _setup(pipe_or_model_id, concept, exclude, fid, seed, guidance,
                                                   num_inference_steps)
    det = detector if detector is not None else load_detector()
    imgs_original = original_images(pipe, plan.prompts, plan.seeds, guidance=guidance, num_inference_steps=steps,
                                    cache=cache)
    original = read_images(det, imgs_original)
    readings = {}
    for side, encoders, unet in (("a", a, unet_a), ("b", b, unet_b)):
        if _is_edit(encoders, unet):
            images = render(edited_pipeline(pipe, encoders, unet=unet), prompts=plan.prompts, seeds=plan.seeds,
                            guidance=guidance, num_inference_steps=steps)
            readings[side] = read_images(det, images)
        else:
            readings[side] = original
    n = fid.bootstrap_resamples
    out: dict[str, Any] = {side: score_world(plan, readings[side], original, seed=seed, n_resamples=n)
                           for side in ("a", "b")}
    many = len(concepts) > 1
    for c in concepts:
        prefix = f"{c}/" if many else ""
        for name in (*PHRASE_SETS, "domain"):
            names = PHRASE_SETS if name == "domain" else (name,)
            e_a, e_b, o = (np.concatenate([shows(_rows(r, plan.slices[(c, s)]), c) for s in names])
                           for r in (readings["a"], readings["b"], original))
            _with_ci(out, f"delta_{prefix}RER_{name}", rer_difference_with_interval(e_a, e_b, o, seed=seed,
                                                                                   n_resamples=n))
            _with_ci(out, f"delta_{prefix}erasure_rate_{name}",
                     paired_difference_with_interval(~e_a, ~e_b, seed=seed, n_resamples=n))
    sl = plan.slices[("retain", "")]
    labels = [p.labels for p in plan.retain]
    attributes = sorted({concept_domain(c).attribute for c in concepts})
    ok = {side: {at: readings[side].predicted[at][sl] == np.array([ATTRIBUTES[at].index(lab[at]) for lab in labels])
                 for at in ATTRIBUTES} for side in ("a", "b")}
    for key, pick in (("retention_acc", attributes), ("retention_acc_all", tuple(ATTRIBUTES))):
        hits = {side: np.logical_and.reduce([ok[side][at] for at in pick]) for side in ("a", "b")}
        _with_ci(out, f"delta_{key}", paired_difference_with_interval(hits["a"], hits["b"], seed=seed, n_resamples=n))
    for attribute in attributes:
        for value in ATTRIBUTES[attribute]:
            mask = np.array([lab[attribute] == value for lab in labels])
            if mask.any() and mask.sum() >= 2:
                _with_ci(out, f"delta_neighbour_acc_{value}", paired_difference_with_interval(
                    ok["a"][attribute][mask], ok["b"][attribute][mask], seed=seed, n_resamples=n))
    _with_ci(out, "delta_KID", kid_difference_with_interval(
        kid_features(readings["a"].features[sl]), kid_features(readings["b"].features[sl]),
        kid_features(true_render_features(plan.retain)), seed=seed, n_resamples=n))
    out.update(guidance=guidance, num_inference_steps=steps, fidelity=fid.name, seed=seed,
               prompt_sets=_prompt_sets(plan))
    return out


# ---------------------------------------------------------------- reporting

def flat_metrics(result: dict[str, Any]) -> dict[str, float]:
    """Floats only, for trackers and Tune: every number of ``result``; each ``<m>_ci95`` becomes
    ``<m>_ci95_lo`` and ``<m>_ci95_hi``; lists, strings and ``prompt_sets`` are left out."""
    out: dict[str, float] = {}
    for key, value in result.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            out[key] = float(value)
        elif key.endswith("_ci95") and isinstance(value, (list, tuple)) and len(value) == 2:
            out[f"{key}_lo"], out[f"{key}_hi"] = float(value[0]), float(value[1])
    return out


def format_metric(result: dict[str, Any], key: str, digits: int = 3) -> str:
    """"0.900 ± 0.050 [0.850, 0.950] (n=160)": value, half-width of the 95 % interval, the interval, images."""
    value = result[key]
    low, high = result.get(f"{key}_ci95", (float("nan"), float("nan")))
    n = result.get(f"{key}_n", "?")
    if value is None or not np.isfinite(value):
        return f"nan (n={n})"
    half = (high - low) / 2 if low is not None and high is not None else float("nan")
    spec = f".{digits}f" if abs(value) >= 0.01 or value == 0 else f".{digits - 1}e"
    return f"{value:{spec}} ± {half:{spec}} [{low:{spec}}, {high:{spec}}] (n={n})"


HEADLINE = ("RER_domain", "RER_word", "RER_synonyms", "RER_heldout", "concept_rate_original", "retention_acc",
            "retention_acc_original", "retention_drop", "retention_acc_all", "retention_acc_all_original", "KID",
            "KID_original", "KID_delta", "alignment", "alignment_original")


def format_metrics(result: dict[str, Any], keys: Sequence[str] = HEADLINE) -> str:
    """One line of the headline metrics with their 95 % intervals (:func:`format_metric`)."""
    return "; ".join(f"{k} {format_metric(result, k)}" for k in keys if k in result)

