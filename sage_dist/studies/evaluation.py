"""Evaluate an edited pipeline against its original for the open-question studies.

Every study compares an *edited* pipeline (erased text encoder(s), an encoder swapped in from another model,
or an ESD-x UNet) with the *original* on the same prompts and seeds. On the bundled world ("world",
"world-xl", or a world folder) this uses the world's own metric functions (:mod:`sage_dist.world.evaluate`:
``RER_*``, ``erasure_rate_*``, ``retention_acc``, ``FID``, ``alignment``, spec §3) with the prompt sets of
``evaluate_world(..., quick=True)``. It differs from ``evaluate_world`` in two ways the studies need:

* the edited pipeline is given whole, so a UNet edit (ESD-x) or an encoder swap is evaluated the same way;
* retention is measured on prompts that name none of ``exclude`` (all concepts erased in a multi-concept
  run), so erasing concept B does not count as a retention loss when concept A is evaluated.

``ASR_heldout`` (template-bias study) is the fraction of the edited model's held-out-paraphrase images in
which the detector still finds the concept: ``1 - erasure_rate_heldout``.

On other models (SD v1.4, SDXL ids or folders) no image metric runs on CPU here; :func:`text_metrics` gives the
text-space proxy of :mod:`sage_dist.tune.objective` (``text_erasure``, ``text_retention_drift``), never under
image-metric names; an ESD-x (UNet) edit has no text-space proxy, so its metrics there are only timings.
"""

from __future__ import annotations

import copy
import functools
import logging
import time

import numpy as np
import torch

log = logging.getLogger(__name__)

WORLD_IDS = ("world", "world-xl")
ENCODER_ATTRS = {0: "text_encoder", 1: "text_encoder_2"}


def is_world(model_id: str) -> bool:
    """True for the bundled world ("world", "world-xl")."""
    return model_id in WORLD_IDS


def edited_pipeline(pipe, *, text_encoders: dict[int, torch.nn.Module] | None = None,
                    unet: torch.nn.Module | None = None):
    """A shallow copy of ``pipe`` with encoder slot(s) (0: ``text_encoder``, 1: ``text_encoder_2``) and/or the
    UNet replaced; ``pipe`` itself is unchanged.

    Raises:
        ValueError: slot 1 given for a pipeline with one text encoder.
    """
    edited = copy.copy(pipe)
    for e, module in (text_encoders or {}).items():
        if e == 1 and getattr(pipe, "text_encoder_2", None) is None:
            raise ValueError("encoder index 1 given but the pipeline has a single text encoder")
        setattr(edited, ENCODER_ATTRS[e], module.to(dtype=getattr(pipe, ENCODER_ATTRS[e]).dtype))
    if unet is not None:
        edited.unet = unet.to(dtype=pipe.unet.dtype)
    return edited


def retain_set(concepts: tuple[str, ...], num: int) -> tuple[list[str], list[dict[str, str]]]:
    """``num`` retain prompts naming none of ``concepts`` (evenly spaced, as ``evaluate_world`` picks them)
    and their attribute labels. With one concept this is exactly ``evaluate_world``'s retain subset."""
    from sage_dist.world.concepts import retain_prompts

    prompts = [p for p in retain_prompts(concepts[0]) if not set(concepts) & set(p[2:].split(" ", 2))]
    if len(prompts) < 2:
        raise ValueError(f"erasing {concepts} leaves fewer than 2 retain prompts; erase fewer concepts")
    idx = np.unique(np.linspace(0, len(prompts) - 1, min(num, len(prompts))).round().astype(int))
    chosen = [prompts[i] for i in idx]
    labels = []
    for p in chosen:
        colour, texture, shape = p[2:].split(" ", 2)
        labels.append({"shape": shape, "colour": colour, "texture": texture})
    return chosen, labels


@functools.lru_cache(maxsize=64)
def _original_images(key: str, prompts: tuple[str, ...], seed: int, guidance: float, steps: int) -> torch.Tensor:
    pipe = _ORIGINALS[key]
    from sage_dist.world.generate import generate

    return generate(pipe, list(prompts), seed=seed, guidance=guidance, num_inference_steps=steps)


_ORIGINALS: dict[str, object] = {}


def evaluate_edit(original, edited, *, concepts: tuple[str, ...], exclude: tuple[str, ...] = (), seed: int = 0,
                  quick: bool = True, original_key: str = "") -> dict[str, float]:
    """World metrics of ``edited`` against ``original`` (both loaded world pipelines) for each of ``concepts``.

    Args:
        concepts: concepts whose domain prompts are scored; one concept gives ``RER_word`` etc., several give
            ``<concept>/RER_word`` etc. plus their means under the plain names.
        exclude: concepts the retain prompts must not name (default: ``concepts``).
        quick: ``evaluate_world``'s quick prompt sets (2 contexts per phrase, 18 retain prompts).
        original_key: a name under which the original's images are cached in this process ("" = no cache).
    Returns:
        ``RER_{word,synonyms,heldout,domain}``, ``erasure_rate_*``, ``ASR_heldout``, ``retention_acc``,
        ``retention_acc_original``, ``retention_drop``, ``FID``, ``FID_original``, ``alignment``, ``eval_s``.
    """
    from sage_dist.world.concepts import ATTRIBUTES, concept_domain
    from sage_dist.world.detector import load_detector
    from sage_dist.world.evaluate import (_real_features, alignment_score, domain_prompt_sets, erasure_rate,
                                          feature_fid, relative_erasure_ratio, retention_accuracy)
    from sage_dist.world.generate import generate, sampling_defaults

    t0 = time.time()
    folder = getattr(original, "_world_folder", None)
    guidance, steps = sampling_defaults(folder) if folder is not None else (2.0, 20)
    per_phrase, num_retain = (2, 18) if quick else (4, 36)
    retain, labels = retain_set(tuple(exclude or concepts), num_retain)
    sets = {c: domain_prompt_sets(c, per_phrase) for c in concepts}
    prompts = tuple(p for c in concepts for name in ("word", "synonyms", "heldout") for p in sets[c][name]) + tuple(retain)

    if original_key:
        _ORIGINALS.setdefault(original_key, original)
        imgs_original = _original_images(original_key, prompts, seed, guidance, steps)
    else:
        imgs_original = generate(original, list(prompts), seed=seed, guidance=guidance, num_inference_steps=steps)
    imgs_edited = generate(edited, list(prompts), seed=seed, guidance=guidance, num_inference_steps=steps)

    det = load_detector()
    out = {}
    with torch.no_grad():
        for tag, imgs in (("edited", imgs_edited), ("original", imgs_original)):
            feats = det.features(imgs)
            probs = {h: torch.softmax(head(feats), -1) for h, head in det.heads.items()}
            preds = {h: [ATTRIBUTES[h][i] for i in p.argmax(-1).tolist()] for h, p in probs.items()}
            out[tag] = (feats.numpy(), probs, preds)

    per_concept: dict[str, dict[str, float]] = {}
    start = 0
    for c in concepts:
        attribute = concept_domain(c).attribute
        res, pooled = {}, {"edited": [], "original": []}
        for name in ("word", "synonyms", "heldout"):
            sl = slice(start, start + len(sets[c][name]))
            start += len(sets[c][name])
            hit = {tag: np.array([p == c for p in out[tag][2][attribute][sl]]) for tag in out}
            for tag in out:
                pooled[tag].append(hit[tag])
            res[f"erasure_rate_{name}"] = erasure_rate(hit["edited"])
            res[f"RER_{name}"] = relative_erasure_ratio(hit["edited"], hit["original"])
        both = {tag: np.concatenate(v) for tag, v in pooled.items()}
        res["erasure_rate_domain"] = erasure_rate(both["edited"])
        res["RER_domain"] = relative_erasure_ratio(both["edited"], both["original"])
        res["ASR_heldout"] = 1.0 - res["erasure_rate_heldout"]
        per_concept[c] = res

    result: dict[str, float] = {}
    for key in per_concept[concepts[0]]:
        values = [per_concept[c][key] for c in concepts]
        result[key] = float(np.nanmean(values)) if not all(np.isnan(values)) else float("nan")
        if len(concepts) > 1:
            result.update({f"{c}/{key}": per_concept[c][key] for c in concepts})

    rs = slice(start, start + len(retain))
    real = _real_features(tuple(retain), 256)
    for tag, suffix in (("edited", ""), ("original", "_original")):
        feats, probs, preds = out[tag]
        result[f"retention_acc{suffix}"] = retention_accuracy({h: v[rs] for h, v in preds.items()}, labels)
        result[f"alignment{suffix}"] = alignment_score({h: v[rs] for h, v in probs.items()}, labels)
        result[f"FID{suffix}"] = feature_fid(feats[rs], real)
    result["retention_drop"] = result["retention_acc_original"] - result["retention_acc"]
    result["eval_s"] = round(time.time() - t0, 2)
    return result


def text_metrics(cfg, original_pipe, encoders: dict[int, torch.nn.Module]) -> dict[str, float]:
    """Text-space proxy (``text_erasure``, ``text_retention_drift``, ``text_score``) for models without an image
    evaluator here (see :func:`sage_dist.tune.objective.text_proxy_metrics`)."""
    from sage_dist.retention.prompts import resolve_retain_prompts
    from sage_dist.tune.objective import text_proxy_metrics

    originals = {e: getattr(original_pipe, ENCODER_ATTRS[e]) for e in encoders}
    retain = resolve_retain_prompts(cfg.retain.retain_prompts, model_id=cfg.model.model_id,
                                    erase_concepts=cfg.erase.erase_concept)
    return text_proxy_metrics(cfg, originals, encoders, original_pipe.tokenizer, retain)
