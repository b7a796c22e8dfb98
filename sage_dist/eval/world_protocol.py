"""``sage-dist evaluate --protocol world``: the bundled world's evaluation of an edit, written to disk.

:func:`run_world_protocol`: :func:`sage_dist.eval.world.evaluate_world` (RER per phrase set, held-out retention
and per-neighbour retention, KID against true renders, alignment; every number with its 95 % interval) plus the
red team :func:`sage_dist.eval.red_team.red_team_world` (pre-ASR; UnlearnDiffAtk prefix tokens and a
Ring-A-Bell-style concept direction, independent of the method; SAGE's inside-out attack apart), a grid of the
concept's domain prompts (original vs edited, same seeds), ``metrics.json`` (with the prompts of every scored
set), ``metrics.md`` (the table, value ± half-width of the interval) and the adversarial prompts under
``red_team/``; an MLflow run when a tracking URI is given.

:func:`run_world_comparison`: two edits (or an edit and the original) on identical noise, the difference of
every metric with its paired-bootstrap interval (``comparison.json``, ``comparison.md``).

An edit is a ``sage-dist erase`` output folder: ``text_encoder/`` (and ``text_encoder_2/``), or ``unet/`` for
ESD-x, or both; "original" is the unedited model.

    sage-dist evaluate --text-encoder runs/triangle --protocol world --concept triangle   # ~2-3 min on 2 cores
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from sage_dist.eval.generate import side_by_side
from sage_dist.eval.red_team import red_team_world
from sage_dist.eval.world import (
    HEADLINE,
    compare_world,
    domain_prompt_sets,
    evaluate_world,
    flat_metrics,
    format_metric,
    resolve_fidelity,
)
from sage_dist.files import nan_to_none
from sage_dist.models.load import (
    edited_pipeline,
    load_pipeline,
    load_text_encoders,
    original_encoders,
    text_encoder_files,
)
from sage_dist.models.registry import check_model_source, is_sdxl, sampling_defaults
from sage_dist.presets import WorldEvalFidelity
from sage_dist.tracking.evaluation import log_evaluation
from sage_dist.world.concepts import CONCEPTS

logger = logging.getLogger(__name__)
UNET_CONFIG_KEYS = ("in_channels", "out_channels", "sample_size", "cross_attention_dim", "block_out_channels",
                    "layers_per_block")
"""UNet config fields an edited UNet must share with the model's (else it was trained on another base model)."""
RED_TEAM_HEADLINE = ("pre_ASR", "ASR", "post_ASR", "ASR_prefix", "ASR_ring_max", "ASR_inside_out")


# ---------------------------------------------------------------- loading an edit

def check_edit_source(source: str | Path) -> dict[str, Any]:
    """What an edit folder holds, checked without loading anything: {"text_encoder": files or None,
    "unet": folder or None}; "original" holds neither.

    Raises:
        ValueError: neither a text encoder (see :func:`sage_dist.models.load.text_encoder_files`) nor ``unet/``.
    """
    if str(source) == "original":
        return {"text_encoder": None, "unet": None}
    root = Path(source).expanduser()
    unet = root / "unet" if (root / "unet" / "config.json").is_file() else None
    try:
        encoders = text_encoder_files(root)
    except ValueError as err:
        if unet is None:
            raise ValueError(f"{err}; or an ESD-x output with unet/ (config.json)") from err
        encoders = None
    return {"text_encoder": encoders, "unet": unet}


def _load_unet_edit(folder: Path, like: torch.nn.Module, source) -> torch.nn.Module:
    """The edited UNet saved by ``sage-dist erase`` (``save_pretrained``), frozen, on ``like``'s device and dtype.

    Raises:
        ValueError: its config differs from the model's UNet in :data:`UNET_CONFIG_KEYS`.
    """
    config = json.loads((folder / "config.json").read_text())
    for key in UNET_CONFIG_KEYS:
        want = like.config.get(key)
        got = config.get(key)
        if isinstance(want, (list, tuple)) or isinstance(got, (list, tuple)):
            want, got = list(want or []), list(got or [])
        if got != want:
            raise ValueError(f"{source}: unet/ has {key}={got}, the model's UNet {want}; it was trained on another "
                             "base model")
    unet = type(like).from_pretrained(str(folder), torch_dtype=like.dtype)
    return unet.to(like.device).eval().requires_grad_(False)


def load_world_edit(pipe, source: str | Path) -> tuple[dict[int, torch.nn.Module] | None, torch.nn.Module | None]:
    """(text encoders by index or None, edited UNet or None) of an edit folder (:func:`check_edit_source`).

    Raises:
        ValueError: nothing loadable, or encoders / UNet of another base model (hidden size, UNet config).
    """
    found = check_edit_source(source)
    encoders = load_text_encoders(source, original_encoders(pipe)) if found["text_encoder"] else None
    unet = _load_unet_edit(found["unet"], pipe.unet, source) if found["unet"] is not None else None
    return encoders, unet


# ---------------------------------------------------------------- tables

def world_table(metrics: dict[str, Any], keys: tuple[str, ...] = HEADLINE + RED_TEAM_HEADLINE) -> str:
    """Markdown table: metric | value ± half-width [95 % interval] | images (or prompts)."""
    lines = ["| metric | value ± 95 % half-width [interval] | n |", "|---|---|---|"]
    extra = tuple(k for k in metrics if (k.startswith(("neighbour_acc_", "ASR_ring_", "delta_")) and
                                         not k.endswith(("_ci95", "_n")) and k not in keys and
                                         f"{k}_ci95" in metrics))
    for key in (*keys, *extra):
        if key in metrics and metrics[key] is not None:
            text = format_metric(metrics, key)
            value, n = text.rsplit(" (n=", 1)
            lines.append(f"| {key} | {value} | {n.rstrip(')')} |")
    return "\n".join(lines)


def _write(out: Path, name: str, payload: dict[str, Any], table: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(nan_to_none(payload), indent=1))
    (out / f"{name}.md").write_text(table + "\n")
    return path


# ---------------------------------------------------------------- the protocol

def _remove_saved_attacks(folder: Path) -> None:
    """Delete the adversarial prompts an earlier run saved in ``folder`` (only the red team's own files), so the
    folder never mixes attacks found on two models."""
    if folder.is_dir():
        for path in folder.iterdir():
            if path.suffix in (".json", ".safetensors") and path.stem.startswith(("prefix", "ring_", "inside_out")):
                path.unlink()


def run_world_protocol(*, model: str, text_encoder: str, concept: str, out: str | Path, attack_steps: int | None = None,
                       tracking_uri: str | None = None, experiment: str = "sage_dist-eval",
                       run_name: str | None = None, fidelity: str | WorldEvalFidelity = "full", seed: int = 0,
                       red_team: bool = True, num_inference_steps: int | None = None) -> dict[str, Any]:
    """Evaluate an edit (a ``sage-dist erase`` output: text encoder(s) and/or ``unet/``, or "original") on
    world model ``model`` for ``concept``; writes ``out/metrics.json``, ``out/metrics.md``, ``out/red_team/`` and
    ``out/grid_domain.png``; returns the metrics.

    Args:
        attack_steps: J of SAGE's inside-out attack (default: the fidelity's ``inside_out_steps``).
        fidelity: "full" (default; the powered protocol) or "quick".
        red_team: run the red team (needs the fidelity's ``red_team_prompts`` >= 2; SD pipelines only, skipped
            with a warning for "world-xl").
        num_inference_steps: denoising steps (default: the world's own, ``world_config.json``; fewer for smoke runs).
    Raises:
        ValueError: an unknown concept, a bad model id, an unreadable edit folder, or an edit of another base
            model (all before any image is generated).
    """
    if concept not in CONCEPTS:
        raise ValueError(f"--protocol world needs --concept, one of {list(CONCEPTS)} (got {concept!r})")
    check_model_source(model)
    check_edit_source(text_encoder)
    fid = resolve_fidelity(fidelity)
    if attack_steps is not None:
        import dataclasses

        fid = dataclasses.replace(fid, inside_out_steps=int(attack_steps))
    out = Path(out)
    t0 = time.perf_counter()
    pipe = load_pipeline(model)
    encoders, unet = load_world_edit(pipe, text_encoder)
    steps = num_inference_steps or sampling_defaults(pipe).num_inference_steps
    if red_team and is_sdxl(pipe):
        logger.warning("the world red team attacks SD pipelines only; skipped for %s", model)
        red_team = False
    metrics: dict[str, Any] = dict(evaluate_world(pipe, encoders, unet=unet, concept=concept, seed=seed, fidelity=fid,
                                                  num_inference_steps=steps))
    if red_team and fid.red_team_prompts >= 2:
        _remove_saved_attacks(out / "red_team")
        metrics.update(red_team_world(pipe, encoders, unet=unet, concept=concept, fidelity=fid, seed=seed,
                                      num_inference_steps=steps, out_dir=out / "red_team"))
    metrics["wall_time_s"] = time.perf_counter() - t0
    grid = None
    if encoders or unet is not None:
        sets = domain_prompt_sets(concept, 1)
        grid_prompts = [p for name in ("word", "synonyms", "heldout") for p in sets[name]]
        out.mkdir(parents=True, exist_ok=True)
        grid = out / "grid_domain.png"
        side_by_side(pipe, grid_prompts, edited=edited_pipeline(pipe, encoders, unet=unet), seed=seed,
                     num_inference_steps=steps, guidance=sampling_defaults(pipe).guidance).save(grid)
    metrics["config"] = {"model": model, "text_encoder": str(text_encoder), "protocol": "world", "concept": concept,
                         "out": str(out), "fidelity": fid.name, "seed": seed, "red_team": red_team,
                         "unet_edit": unet is not None, "inside_out_steps": fid.inside_out_steps,
                         "num_inference_steps": steps}
    table = world_table(metrics)
    path = _write(out, "metrics", metrics, table)
    logger.info("world protocol %s on %s:\n%s", text_encoder, concept, table)
    if tracking_uri:
        log_evaluation(tracking_uri, experiment=experiment, run_name=run_name or f"world-{concept}",
                       params=metrics["config"], metrics=flat_metrics(metrics),
                       artifacts=[path, out / "metrics.md"] + ([grid] if grid else []))
    return metrics


def run_world_comparison(model: str, a: str, b: str, concept: str, out: str | Path, *,
                         fidelity: str | WorldEvalFidelity = "full", seed: int = 0, tracking_uri: str | None = None,
                         experiment: str = "sage_dist-eval", run_name: str | None = None,
                         num_inference_steps: int | None = None) -> dict[str, Any]:
    """Paired comparison of edits ``a`` and ``b`` (``sage-dist erase`` outputs or "original") on identical prompts
    and noise (:func:`sage_dist.eval.world.compare_world`): ``delta_<metric>`` = metric(a) - metric(b) with its
    paired-bootstrap 95 % interval; writes ``out/comparison.json`` and ``out/comparison.md``.

    Raises:
        ValueError: an unknown concept, a bad model id, an unreadable folder, or a folder of another base model
            (hidden size or UNet config; all before any image is generated).
    """
    if concept not in CONCEPTS:
        raise ValueError(f"--protocol world needs --concept, one of {list(CONCEPTS)} (got {concept!r})")
    check_model_source(model)
    check_edit_source(a)
    check_edit_source(b)
    fid = resolve_fidelity(fidelity)
    t0 = time.perf_counter()
    pipe = load_pipeline(model)
    enc_a, unet_a = load_world_edit(pipe, a)
    enc_b, unet_b = load_world_edit(pipe, b)
    result = compare_world(pipe, enc_a, enc_b, unet_a=unet_a, unet_b=unet_b, concept=concept, seed=seed, fidelity=fid,
                           num_inference_steps=num_inference_steps)
    result["wall_time_s"] = time.perf_counter() - t0
    result["config"] = {"model": model, "a": str(a), "b": str(b), "protocol": "world-compare", "concept": concept,
                        "out": str(out), "fidelity": fid.name, "seed": seed}
    keys = tuple(k for k in result if k.startswith("delta_") and not k.endswith(("_ci95", "_n")))
    table = world_table(result, keys)
    path = _write(Path(out), "comparison", result, table)
    logger.info("world comparison %s - %s on %s:\n%s", a, b, concept, table)
    if tracking_uri:
        log_evaluation(tracking_uri, experiment=experiment, run_name=run_name or f"world-compare-{concept}",
                       params=result["config"], metrics=flat_metrics(result), artifacts=[path])
    return result
