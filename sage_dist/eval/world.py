"""Erasure metrics on the bundled world, with the names and meaning of docs/METHOD.md "Evaluation".

The erased model and the original model generate from the same prompts with the same seeds; the detector
reads every image.

* ``erasure_rate_<set>``: fraction of the erased model's images of the concept-domain prompt set ``<set>`` in
  which the detector does NOT find the concept (on its attribute's head).
* ``RER_<set>`` (relative erasure ratio, spec 3.2): ``1 - N_erased / N_original``, N = images in which the
  detector finds the concept. Sets: ``word`` (the concept's word), ``synonyms`` (paraphrases erasure may see),
  ``heldout`` (held-out paraphrases: erasure never saw them) and ``domain`` (all three pooled).
* ``retention_acc``: on prompts about unrelated concepts (:func:`sage_dist.world.concepts.retain_prompts`), the
  fraction of images whose prompted value of the erased concept's attribute (e.g. the shape, for "triangle")
  is detected; ``retention_acc_all``: all three attributes detected; ``*_original`` the same for the original
  model, ``retention_drop`` = ``retention_acc_original - retention_acc``.
* ``FID``: Frechet distance (clean-fid's ``frechet_distance``) between the detector's penultimate features of
  the erased model's retain-prompt images and of true renders of the same prompts (``FID_original``: the
  original model's). The COCO-FID analogue of spec 3.3.
* ``alignment``: CLIP-score analogue, the detector's mean probability of each prompted attribute on the retain
  prompts (0-1).

``evaluate_world("world", text_encoder, concept="triangle")`` takes ~10-25 s on 2 cores (``quick=True``: half).
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path

import numpy as np
import torch

from sage_dist.eval.generate import generate_images
from sage_dist.models.load import edited_pipeline, load_pipeline
from sage_dist.models.registry import sampling_defaults
from sage_dist.world import scene as world_scene
from sage_dist.world.concepts import (
    ATTRIBUTES,
    COLOURS,
    SHAPES,
    TEXTURES,
    concept_domain,
    retain_prompts,
)
from sage_dist.world.detector import load_detector

logger = logging.getLogger(__name__)
RETAIN_TEMPLATE = "a {colour} {texture} {shape}"


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
    """Frechet distance between two feature sets [N, D] (clean-fid's ``frechet_distance`` on mean/cov)."""
    from cleanfid.fid import frechet_distance

    a, b = np.asarray(features_a, dtype=np.float64), np.asarray(features_b, dtype=np.float64)
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError("FID needs at least 2 feature vectors per set")
    return float(frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)))


# ---------------------------------------------------------------- prompt sets

def domain_prompt_sets(concept: str, per_phrase: int) -> dict[str, list[str]]:
    """Prompts for each phrase set of ``concept``: "word", "synonyms", "heldout"; ``per_phrase`` contexts each."""
    dom = concept_domain(concept)
    sets = {"word": (dom.word,), "synonyms": dom.synonyms, "heldout": dom.heldout_paraphrases}
    others = {"shape": SHAPES, "colour": COLOURS, "texture": TEXTURES}
    out = {}
    for name, phrases in sets.items():
        prompts = []
        for pi, phrase in enumerate(phrases):
            for k in range(per_phrase):
                j = 5 * pi + k
                words = {"shape": others["shape"][j % 6], "colour": others["colour"][(j + 2) % 6],
                         "texture": others["texture"][j % 3]}
                words[dom.attribute] = phrase
                prompts.append(RETAIN_TEMPLATE.format(**words))
        out[name] = prompts
    return out


def retain_subset(concepts: str | tuple[str, ...], num: int) -> tuple[list[str], list[dict[str, str]]]:
    """``num`` retain prompts naming none of ``concepts``, evenly spaced over :func:`retain_prompts`, and their
    attribute labels ({"shape", "colour", "texture"} -> value).

    Raises:
        ValueError: unknown concept, or ``concepts`` leave fewer than 2 retain prompts.
    """
    excluded = (concepts,) if isinstance(concepts, str) else tuple(concepts)
    prompts = [p for p in retain_prompts(excluded[0]) if not set(excluded) & set(p[2:].split(" ", 2))]
    if len(prompts) < 2:
        raise ValueError(f"erasing {excluded} leaves fewer than 2 retain prompts; erase fewer concepts")
    idx = np.unique(np.linspace(0, len(prompts) - 1, min(num, len(prompts))).round().astype(int))
    chosen = [prompts[i] for i in idx]
    labels = []
    for p in chosen:
        colour, texture, shape = p[2:].split(" ", 2)
        labels.append({"shape": shape, "colour": colour, "texture": texture})
    return chosen, labels


# ---------------------------------------------------------------- evaluation

@functools.lru_cache(maxsize=4)
def _cached_pipeline(model_id: str):
    return load_pipeline(model_id)


@functools.lru_cache(maxsize=32)
def _cached_original(model_id: str, prompts: tuple[str, ...], seed: int, guidance: float, steps: int, n: int):
    return generate_images(_cached_pipeline(model_id), list(prompts), seed=seed, guidance=guidance,
                    num_inference_steps=steps, num_images_per_prompt=n)


@functools.lru_cache(maxsize=32)
def _real_features(prompts: tuple[str, ...], num: int) -> np.ndarray:
    rng = np.random.default_rng(4321)
    scenes = []
    for i in range(num):
        colour, texture, shape = prompts[i % len(prompts)][2:].split(" ", 2)
        s = world_scene.sample_scenes(1, rng, exclude_heldout=False, combos=((shape, colour, texture),))[0]
        scenes.append(s)
    with torch.no_grad():
        return load_detector().features(torch.from_numpy(world_scene.render_batch(scenes))).numpy()


def evaluate_world(pipe_or_model_id="world", text_encoder=None, *, concept: str | tuple[str, ...],
                   unet: torch.nn.Module | None = None, exclude: tuple[str, ...] = (), seed: int = 0,
                   num_images_per_prompt: int = 1, guidance: float | None = None, quick: bool = False,
                   num_inference_steps: int | None = None, detector=None) -> dict[str, float]:
    """Erasure metrics of an edited world pipeline against the original on one or several concepts.

    The edit is ``text_encoder`` (erased encoder(s)) and/or ``unet`` (an edited UNet, e.g. ESD-x); with neither,
    the original is evaluated against itself (RER 0).

    Args:
        pipe_or_model_id: a loaded world pipeline (the original), "world", "world-xl" or a folder (a model id
            caches the original's images in this process).
        text_encoder: the erased encoder (replaces encoder 1) or {0: te1, 1: te2}.
        concept: one of :data:`sage_dist.world.concepts.CONCEPTS`, or several (a multi-concept erasure).
        unet: an edited UNet.
        exclude: concepts the retain prompts must not name (default: the evaluated concepts); a multi-concept
            run passes all its erased concepts, so erasing B does not count as a retention loss of A.
        quick: fewer prompts (2 contexts per phrase, 18 retain prompts instead of 4 and 36).
    Returns:
        {"RER_word", "RER_synonyms", "RER_heldout", "RER_domain", "erasure_rate_*", "concept_rate_original",
        "retention_acc", "retention_acc_all", "retention_acc_original", "retention_acc_all_original",
        "retention_drop", "FID", "FID_original", "alignment", "alignment_original", "guidance", "seconds"}.
        ``retention_acc`` scores the attribute(s) of the evaluated concepts; with several concepts the per-concept
        values are also given as ``<concept>/RER_word`` etc. and the plain names hold their means.
    Raises:
        ValueError: unknown concept, an encoder index 1 for a one-encoder pipeline, or too many exclusions.
    """
    t0 = time.time()
    concepts = (concept,) if isinstance(concept, str) else tuple(concept)
    if not concepts:
        raise ValueError("evaluate_world needs at least one concept")
    domains = {c: concept_domain(c) for c in concepts}
    per_phrase, num_retain = (2, 18) if quick else (4, 36)
    retain, retain_labels = retain_subset(tuple(exclude) or concepts, num_retain)
    det = detector if detector is not None else load_detector()
    if isinstance(pipe_or_model_id, (str, Path)):
        model_id = str(pipe_or_model_id)
        pipe = _cached_pipeline(model_id)
        original = functools.partial(_cached_original, model_id)
    else:
        pipe = pipe_or_model_id

        def original(prompts, seed_, guidance_, steps_, n_):
            return generate_images(pipe, list(prompts), seed=seed_, guidance=guidance_, num_inference_steps=steps_,
                            num_images_per_prompt=n_)
    defaults = sampling_defaults(pipe)
    guidance = defaults.guidance if guidance is None else float(guidance)
    steps = num_inference_steps or defaults.num_inference_steps
    n = num_images_per_prompt

    sets = {c: domain_prompt_sets(c, per_phrase) for c in concepts}
    all_prompts = tuple(p for c in concepts for name in ("word", "synonyms", "heldout") for p in sets[c][name])
    all_prompts += tuple(retain)
    erased_pipe = edited_pipeline(pipe, text_encoder, unet=unet)
    imgs_original = original(all_prompts, seed, guidance, steps, n)
    imgs_erased = generate_images(erased_pipe, list(all_prompts), seed=seed, guidance=guidance, num_inference_steps=steps,
                           num_images_per_prompt=n)

    with torch.no_grad():
        out = {}
        for tag, imgs in (("erased", imgs_erased), ("original", imgs_original)):
            feats = det.features(imgs)
            probs = {h: torch.softmax(head(feats), -1) for h, head in det.heads.items()}
            preds = {h: [ATTRIBUTES[h][i] for i in p.argmax(-1).tolist()] for h, p in probs.items()}
            out[tag] = (feats.numpy(), probs, preds)

    per_concept: dict[str, dict[str, float]] = {}
    start = 0
    for c in concepts:
        attribute = domains[c].attribute
        res: dict[str, float] = {}
        detected_all = {"erased": [], "original": []}
        for name in ("word", "synonyms", "heldout"):
            count = len(sets[c][name]) * n
            sl = slice(start, start + count)
            start += count
            hit = {tag: np.array([p == c for p in out[tag][2][attribute][sl]]) for tag in out}
            for tag in out:
                detected_all[tag].append(hit[tag])
            res[f"erasure_rate_{name}"] = erasure_rate(hit["erased"])
            res[f"RER_{name}"] = relative_erasure_ratio(hit["erased"], hit["original"])
        pooled = {tag: np.concatenate(v) for tag, v in detected_all.items()}
        res["erasure_rate_domain"] = erasure_rate(pooled["erased"])
        res["RER_domain"] = relative_erasure_ratio(pooled["erased"], pooled["original"])
        res["concept_rate_original"] = float(pooled["original"].mean())
        per_concept[c] = res

    result: dict[str, float] = {}
    for key in per_concept[concepts[0]]:
        values = np.array([per_concept[c][key] for c in concepts], dtype=float)
        result[key] = float(np.nanmean(values)) if not np.isnan(values).all() else float("nan")
        if len(concepts) > 1:
            result.update({f"{c}/{key}": per_concept[c][key] for c in concepts})

    rs = slice(start, start + len(retain) * n)
    labels = [lab for lab in retain_labels for _ in range(n)]
    attributes = sorted({d.attribute for d in domains.values()})
    real = _real_features(tuple(retain), 256)
    for tag, suffix in (("erased", ""), ("original", "_original")):
        feats, probs, preds = out[tag]
        sliced = {h: v[rs] for h, v in preds.items()}
        result[f"retention_acc{suffix}"] = retention_accuracy(sliced, [{a: lab[a] for a in attributes} for lab in labels])
        result[f"retention_acc_all{suffix}"] = retention_accuracy(sliced, labels)
        result[f"alignment{suffix}"] = alignment_score({h: v[rs] for h, v in probs.items()}, labels)
        result[f"FID{suffix}"] = feature_fid(feats[rs], real)
    result["retention_drop"] = result["retention_acc_original"] - result["retention_acc"]
    result["guidance"] = guidance
    result["seconds"] = round(time.time() - t0, 2)
    return result
