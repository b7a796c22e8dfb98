"""What a trial is scored on: the pluggable objective ``evaluate_trial(cfg, result) -> {name: value}``.

Two evaluators:

* **Text-space proxy** (every model; the only one for "tiny-sd"/"tiny-sdxl", whose random weights make no
  images worth detecting). Computed from the trained encoder g_n and the frozen original g_o on the pooled
  features g(·) (EOT state after the final LayerNorm, L2-normalised; docs/METHOD.md "Notation"):

  - ``text_erasure`` = mean over concept-domain prompts x of 1 − cos(g_n(x), g_o(x)): how far the erased
    encoder moved the concept's prompts (0: untouched; up to 2). Domain prompts are the concept (and, on the
    bundled world, its synonyms and held-out paraphrases) inside evaluation templates the attack never uses.
  - ``text_retention_drift`` = the same on the retain prompts: how far unrelated prompts moved (0 is best).
  - ``text_score`` = ``text_erasure − text_retention_drift`` (same units; the single-objective target).

  These are proxies of erasure and retention in text space. They are not RER, accuracy or FID and are never
  reported under those names.
* **Bundled world** ("world"/"world-xl"): the world's own image-space evaluation
  (:func:`sage_dist.eval.world.evaluate_world`: ``RER_domain``, ``RER_word``, ``RER_heldout``, held-out
  ``retention_acc``, ``neighbour_acc_<value>``, ``KID`` ..., each with ``<metric>_ci95_lo`` / ``_hi`` and
  ``<metric>_n``), at the quick fidelity (:data:`sage_dist.presets.WORLD_EVAL_QUICK`) in a trial, plus the text
  proxy.

:class:`Objectives` names which metrics a study optimises: multi-objective (erasure up, retention cost down;
the result is the Pareto front) or single (``text_score``, reported at every checkpoint so ASHA can stop
weak trials early).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal

import torch

from sage_dist.config import StudyConfig
from sage_dist.eval.generate import generate_images, image_grid
from sage_dist.eval.world import evaluate_world, flat_metrics, format_metrics
from sage_dist.models.load import edited_pipeline, original_encoders
from sage_dist.models.registry import is_world, sampling_defaults
from sage_dist.retention.prompts import resolve_retain_prompts
from sage_dist.world.concepts import phrases as world_phrases

log = logging.getLogger(__name__)

EVAL_TEMPLATES: tuple[str, ...] = ("{}", "a picture of a {}", "an image showing a {}", "a {} in the middle",
                                   "a drawing with a {}")
"""Templates for the concept-domain prompts of the text proxy (not in the attack's template library)."""
NUM_RETAIN_EVAL = 32
"""Retain prompts the text proxy measures drift on (the first ones of the run's retain set)."""

Mode = Literal["min", "max"]


@dataclass(frozen=True, kw_only=True)
class Objectives:
    """The metrics a study optimises and in which direction."""

    erasure_metric: str
    """Higher is better: ``text_erasure`` (proxy) or ``RER_domain`` (world)."""
    retention_metric: str
    """The retention cost or quality: ``text_retention_drift`` (proxy, min), ``KID`` (world, min) or
    ``retention_acc`` (world, max)."""
    retention_mode: Mode = "min"
    """"min" for a cost (drift, KID), "max" for an accuracy."""
    single_metric: str = "text_score"
    """Single-objective mode's target (max); must be reported at every checkpoint for ASHA."""

    @property
    def metrics(self) -> list[str]:
        return [self.erasure_metric, self.retention_metric]

    @property
    def modes(self) -> list[Mode]:
        return ["max", self.retention_mode]


def default_objectives(model_id: str) -> Objectives:
    """Image-space metrics on the bundled world, else the text proxy."""
    if is_world(model_id):
        return Objectives(erasure_metric="RER_domain", retention_metric="KID", retention_mode="min")
    return Objectives(erasure_metric="text_erasure", retention_metric="text_retention_drift", retention_mode="min")


def concept_domain_prompts(cfg: StudyConfig) -> list[str]:
    """Prompts naming the erased concept(s): every phrase of the domain in each of :data:`EVAL_TEMPLATES`."""
    phrases: list[str] = []
    for concept in cfg.erase.erase_concept:
        phrases += list(world_phrases(concept)) if is_world(cfg.model.model_id) else [concept]
    return [t.format(p) for p in phrases for t in EVAL_TEMPLATES]


def _pooled(encoder: torch.nn.Module, tokenizer, prompts: list[str]) -> torch.Tensor:
    """g(·): the final-LN EOT state, L2-normalised, ``[B, D]`` float32."""
    ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    device = next(encoder.parameters()).device
    with torch.no_grad():
        out = encoder(ids.to(device), output_hidden_states=False)
        final = out.last_hidden_state
        eot = (ids == tokenizer.eos_token_id).int().argmax(dim=1).to(device)
        feat = final[torch.arange(final.shape[0], device=device), eot]
    return torch.nn.functional.normalize(feat.float(), dim=-1)


def text_proxy_metrics(cfg: StudyConfig, original: dict[int, torch.nn.Module], trained: dict[int, torch.nn.Module],
                       tokenizer, retain_prompts: list[str]) -> dict[str, float]:
    """``text_erasure``, ``text_retention_drift``, ``text_score`` (see module docstring), averaged over the
    trained encoders (index -> CLIP text model; ``original`` holds the frozen ones).

    Raises:
        ValueError: ``trained`` is empty (a UNet edit such as ESD-x has no text-space proxy).
    """
    if not trained:
        raise ValueError("the text-space proxy needs a trained text encoder; a UNet edit (ESD-x) has none")
    domain = concept_domain_prompts(cfg)
    retain = retain_prompts[:NUM_RETAIN_EVAL]
    erasure, drift = [], []
    for e, enc_n in trained.items():
        enc_o = original[e]
        erasure.append(float((1 - (_pooled(enc_n, tokenizer, domain) * _pooled(enc_o, tokenizer, domain)).sum(-1)).mean()))
        if retain:
            drift.append(float((1 - (_pooled(enc_n, tokenizer, retain) * _pooled(enc_o, tokenizer, retain)).sum(-1)).mean()))
    out = {"text_erasure": sum(erasure) / len(erasure),
           "text_retention_drift": sum(drift) / len(drift) if drift else 0.0}
    out["text_score"] = out["text_erasure"] - out["text_retention_drift"]
    return out


def run_retain_prompts(cfg: StudyConfig) -> list[str]:
    """The retain prompts of ``cfg``'s run (the text proxy measures drift on the first of them)."""
    return resolve_retain_prompts(cfg.retain.retain_prompts, model_id=cfg.model.model_id,
                                  erase_concepts=cfg.erase.erase_concept)


def evaluate_trial(cfg: StudyConfig, result, *, pipe, retain_prompts: list[str],
                   world_quick: bool = True) -> dict[str, float]:
    """Final metrics of one trial: the text proxy (text-encoder edits), plus the world's image-space evaluation
    of the edit (encoders and, for ESD-x, the trained UNet) on the bundled world.

    Args:
        cfg: the trial's configuration.
        result: :class:`sage_dist.train.loop.ErasureResult` (its ``text_encoders`` and ``unet`` are evaluated).
        pipe: the frozen pipeline the run erased from (its encoders are g_o).
        retain_prompts: the run's retain set.
        world_quick: the bundled world's quick evaluation (see :func:`world_metrics`).
    Raises:
        FloatingPointError: a metric is NaN or infinite (the trial is then recorded as failed).
    """
    metrics: dict[str, float] = {}
    if result.text_encoders:
        metrics.update(text_proxy_metrics(cfg, original_encoders(pipe), result.text_encoders, pipe.tokenizer,
                                          retain_prompts))
    if is_world(cfg.model.model_id):
        metrics.update(world_metrics(cfg, result, pipe, quick=world_quick))
    bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
    if bad:
        raise FloatingPointError(f"trial metrics are not finite: {bad}")
    return metrics


def world_metrics(cfg: StudyConfig, result, pipe, *, quick: bool = True) -> dict[str, float]:
    """The bundled world's image-space evaluation of the edit (:func:`sage_dist.eval.world.evaluate_world`: the
    trained encoders and, for ESD-x, the trained UNet), at the world's own sampling settings
    (``world_config.json``); floats only (:func:`~sage_dist.eval.world.flat_metrics`: each interval as
    ``<metric>_ci95_lo`` / ``_hi``); averaged over the erased concepts.

    ``quick`` is the quick fidelity (:data:`sage_dist.presets.WORLD_EVAL_QUICK`: 50 concept-domain and 64 held-out
    retain images, ~5-15 s on 2 cores), what a search can afford per trial; its numbers and interval widths are
    logged. ``quick=False`` is the full fidelity (:data:`sage_dist.presets.WORLD_EVAL_FULL`). With several concepts
    every key, interval bounds included, is the mean of the per-concept values (the bounds are then not an
    interval of the mean: use :func:`evaluate_edit`, which evaluates the concepts jointly).
    """
    defaults = sampling_defaults(cfg.model.model_id)
    per_concept = []
    for c in cfg.erase.erase_concept:
        res = evaluate_world(pipe, dict(result.text_encoders) or None, unet=result.unet, concept=c,
                             seed=cfg.optim.seed, fidelity="quick" if quick else "full", guidance=defaults.guidance,
                             num_inference_steps=defaults.num_inference_steps)
        log.info("trial world metrics (%s, %s): %s", res["fidelity"], c, format_metrics(res))
        per_concept.append(flat_metrics(res))
    keys = [k for k in per_concept[0] if all(k in m for m in per_concept)]
    return {k: float(sum(m[k] for m in per_concept) / len(per_concept)) for k in keys if k != "seconds"}


def evaluate_edit(model_id: str, *, concepts: tuple[str, ...], text_encoders: dict[int, torch.nn.Module] | None = None,
                  unet: torch.nn.Module | None = None, seed: int = 0, quick: bool = True) -> dict[str, float]:
    """World metrics of an edit (``text_encoders`` by slot and/or ``unet``) of world model ``model_id``, all
    ``concepts`` evaluated jointly (retain images naming none of them), as the grid studies score a trial.

    Returns:
        :func:`~sage_dist.eval.world.evaluate_world`'s metrics as floats (:func:`~sage_dist.eval.world.flat_metrics`),
        plus ``concept_rate_heldout`` = ``1 - erasure_rate_heldout``, the fraction of the edited model's held-out
        paraphrase images that still show the concept (no attack is run; and ``<concept>/concept_rate_heldout``
        for several concepts), with its interval.
    Raises:
        ValueError: unknown concept, or an encoder slot the model lacks.
    """
    result = flat_metrics(evaluate_world(model_id, text_encoders or None, concept=tuple(concepts), unet=unet,
                                         exclude=tuple(concepts), seed=seed, fidelity="quick" if quick else "full"))
    for key in [k for k in result if k.endswith("erasure_rate_heldout")]:
        renamed = key.replace("erasure_rate_heldout", "concept_rate_heldout")
        result[renamed] = 1.0 - result[key]
        result[f"{renamed}_ci95_lo"] = 1.0 - result[f"{key}_ci95_hi"]
        result[f"{renamed}_ci95_hi"] = 1.0 - result[f"{key}_ci95_lo"]
        result[f"{renamed}_n"] = result[f"{key}_n"]
    return result


def trial_image_grid(cfg: StudyConfig, pipe, trained: dict[int, torch.nn.Module], *, unet=None,
                     num_inference_steps: int = 10, guidance: float = 3.0, num_prompts: int = 4):
    """Original vs erased images at the same seeds, labelled: top row the original model, bottom row the edit
    (``trained`` encoders and/or ``unet``); columns are concept-domain prompts (the first ``num_prompts - 1``) and
    one retain prompt, each labelled with its prompt and seed (prompt ``j`` uses ``cfg.optim.seed + j``)."""
    prompts = concept_domain_prompts(cfg)[: max(1, num_prompts - 1)] + [run_retain_prompts(cfg)[0]]
    edited = edited_pipeline(pipe, trained, unet=unet)
    rows = [[generate_images(p, [prompt], seed=cfg.optim.seed + j, guidance=guidance,
                             num_inference_steps=num_inference_steps)[0] for j, prompt in enumerate(prompts)]
            for p in (pipe, edited)]
    labels = [f"{prompt} (seed {cfg.optim.seed + j})" for j, prompt in enumerate(prompts)]
    return image_grid(rows, row_labels=("original", "erased"), column_labels=labels,
                      title=f"{cfg.erase.method}: erase {', '.join(cfg.erase.erase_concept)}")

