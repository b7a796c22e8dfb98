"""``sage-dist evaluate --protocol world``: the bundled world's evaluation of an erased encoder, written to disk.

:func:`sage_dist.eval.world.evaluate_world` (RER per phrase set, retention, FID on detector features,
alignment) plus :func:`sage_dist.eval.world_asr.world_asr`, a grid of the concept's domain prompts (original vs
erased, same seeds) and ``metrics.json``; an MLflow run when a tracking URI is given.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from sage_dist.eval.generate import side_by_side
from sage_dist.eval.world import domain_prompt_sets, evaluate_world
from sage_dist.eval.world_asr import world_asr
from sage_dist.models.load import (
    edited_pipeline,
    load_pipeline,
    load_text_encoders,
    original_encoders,
    text_encoder_files,
)
from sage_dist.models.registry import check_model_source, sampling_defaults
from sage_dist.tracking.evaluation import log_evaluation
from sage_dist.world.concepts import CONCEPTS


def _nan_to_none(x):
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    return x


def run_world_protocol(*, model: str, text_encoder: str, concept: str, out: str | Path, attack_steps: int = 30,
                       tracking_uri: str | None = None, experiment: str = "sage_dist-eval",
                       run_name: str | None = None) -> dict[str, Any]:
    """Evaluate ``text_encoder`` (a ``sage-dist erase`` output, or "original") on world model ``model`` for
    ``concept``; writes ``out/metrics.json`` and ``out/grid_domain.png``; returns the metrics.

    Raises:
        ValueError: an unknown concept, a bad model id or an unreadable encoder folder (before generating).
    """
    if concept not in CONCEPTS:
        raise ValueError(f"--protocol world needs --concept, one of {list(CONCEPTS)} (got {concept!r})")
    check_model_source(model)
    if text_encoder != "original":
        text_encoder_files(text_encoder)
    out = Path(out)
    t0 = time.perf_counter()
    pipe = load_pipeline(model)
    erased = load_text_encoders(text_encoder, original_encoders(pipe))[0]
    metrics: dict[str, Any] = dict(evaluate_world(pipe, erased, concept=concept, seed=0))
    metrics.update(world_asr(pipe, erased, concept=concept, attack_steps=attack_steps))
    metrics["wall_time_s"] = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    sets = domain_prompt_sets(concept, 1)
    grid_prompts = [p for name in ("word", "synonyms", "heldout") for p in sets[name]]
    grid = None
    if text_encoder != "original":
        defaults = sampling_defaults(pipe)
        grid = out / "grid_domain.png"
        side_by_side(pipe, grid_prompts, edited=edited_pipeline(pipe, erased), seed=0,
                     num_inference_steps=defaults.num_inference_steps, guidance=defaults.guidance).save(grid)
    metrics["config"] = {"model": model, "text_encoder": str(text_encoder), "protocol": "world", "concept": concept,
                         "out": str(out), "attack_steps": attack_steps}
    (out / "metrics.json").write_text(json.dumps(_nan_to_none(metrics), indent=1))
    if tracking_uri:
        log_evaluation(tracking_uri, experiment=experiment, run_name=run_name or f"world-{concept}",
                       params=metrics["config"], metrics={k: float(v) for k, v in metrics.items()
                                                          if isinstance(v, (int, float)) and not isinstance(v, bool)},
                       artifacts=[out / "metrics.json"] + ([grid] if grid else []))
    return metrics
