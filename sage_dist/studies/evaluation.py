"""Evaluate a study's edit against the original model (the open-question studies, issue 6).

On the bundled world ("world", "world-xl", or a world folder) every study uses
:func:`sage_dist.world.evaluate.evaluate_world` (``RER_*``, ``erasure_rate_*``, ``retention_acc``, ``FID``,
``alignment``, spec §3) with its quick prompt sets, given the edit as encoder(s) and/or an edited UNet (ESD-x),
several concepts at once (multi-concept runs) and ``exclude`` = all erased concepts, so erasing concept B does not
count as a retention loss when concept A is evaluated. Studies add one derived metric:

* ``ASR_heldout`` (template-bias study): the fraction of the edited model's held-out-paraphrase images in which
  the detector still finds the concept, ``1 - erasure_rate_heldout``.

On other models (SD v1.4, SDXL ids or folders) no image metric runs on CPU here; :func:`text_metrics` gives the
text-space proxy of :mod:`sage_dist.tune.objective` (``text_erasure``, ``text_retention_drift``), never under
image-metric names; an ESD-x (UNet) edit has no text-space proxy, so its metrics there are only timings.
"""

from __future__ import annotations

import torch

WORLD_IDS = ("world", "world-xl")
ENCODER_ATTRS = {0: "text_encoder", 1: "text_encoder_2"}


def is_world(model_id: str) -> bool:
    """True for the bundled world ("world", "world-xl")."""
    return model_id in WORLD_IDS


def evaluate_edit(model_id: str, *, concepts: tuple[str, ...], text_encoders: dict[int, torch.nn.Module] | None = None,
                  unet: torch.nn.Module | None = None, seed: int = 0, quick: bool = True) -> dict[str, float]:
    """World metrics of the edit (``text_encoders`` by slot and/or ``unet``) of world model ``model_id`` for
    ``concepts``, retain prompts naming none of them; the original's images are cached per process.

    Returns:
        :func:`~sage_dist.world.evaluate.evaluate_world`'s metrics plus ``ASR_heldout`` (and
        ``<concept>/ASR_heldout`` for several concepts).
    Raises:
        ValueError: unknown concept, or an encoder slot the model lacks.
    """
    from sage_dist.world.evaluate import evaluate_world

    result = evaluate_world(model_id, text_encoders or None, concept=tuple(concepts), unet=unet,
                            exclude=tuple(concepts), seed=seed, quick=quick)
    for key in [k for k in result if k.endswith("erasure_rate_heldout")]:
        result[key.replace("erasure_rate_heldout", "ASR_heldout")] = 1.0 - result[key]
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
