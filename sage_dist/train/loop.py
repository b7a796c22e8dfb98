"""The single-process erasure loop: validate, load, train, checkpoint, save (docs/METHOD.md "Warm-up", §7).

Tiny CPU run (seconds)::

    python -c "from sage_dist.config import *; from sage_dist.train.loop import run_erasure; \
run_erasure(StudyConfig(model=ModelConfig(model_id='tiny-sd'), optim=OptimConfig(num_steps=4), \
erase=EraseConfig(warmup_steps=2, ddim_steps=4), attack=AttackConfig(attack_steps=3), \
retain=RetainConfig(retain_batch_size=4, top_k=2)), out_dir='out/tiny')"

Ray Train calls the same function on each worker with ``rank``, ``world_size`` and a DDP wrapper
(``sage_dist/train/ray_worker.py``); nothing here imports Ray.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from sage_dist.config import StudyConfig
from sage_dist.models.load import frozen_dtype, load_pipeline, resolve_device
from sage_dist.tracking import NullTracker
from sage_dist.train.checkpoint import load_checkpoint, save_checkpoint
from sage_dist.train.step import Eraser
from sage_dist.train.validate import validate_inputs

log = logging.getLogger(__name__)


@dataclass
class ErasureResult:
    """What :func:`run_erasure` returns."""

    text_encoders: dict[int, torch.nn.Module]
    """Trained text encoder per encoder index (0: ``text_encoder``, 1: ``text_encoder_2``), float32."""
    history: list[dict[str, float]]
    """Per-step scalars (losses, attack statistics)."""
    wall_time_s: float
    """Wall time of the training loop (model loading excluded), seconds."""
    out_dir: Path | None
    """Where outputs were saved (rank 0 only), or None."""
    attack_log: dict[str, list[dict]] = field(default_factory=dict)
    """Per concept: template, first/last attack loss, H1, H2 of each attack."""
    eraser: Eraser | None = None
    """The training state (for evaluation right after training)."""
    unet: torch.nn.Module | None = None
    """The edited UNet (ESD-x only; text-encoder methods leave the UNet untouched)."""


def package_versions() -> dict[str, str]:
    """Versions of the packages that shape the numbers (recorded with every run)."""
    out = {"python": platform.python_version()}
    for name in ("sage_dist", "torch", "diffusers", "transformers", "safetensors"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def save_outputs(out_dir: str | Path, result: ErasureResult, cfg: StudyConfig) -> Path:
    """Save each trained encoder with ``save_pretrained`` (safetensors) as ``text_encoder/`` (and
    ``text_encoder_2/``; ESD-x: ``unet/``), plus ``record.json`` (config, seed, versions, per-step losses,
    wall time)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for e, enc in result.text_encoders.items():
        enc.save_pretrained(out / ("text_encoder" if e == 0 else "text_encoder_2"), safe_serialization=True)
    if result.unet is not None:
        result.unet.save_pretrained(out / "unet", safe_serialization=True)
    record = {"config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.to_flat_dict().items()},
              "seed": cfg.optim.seed, "versions": package_versions(), "wall_time_s": result.wall_time_s,
              "history": result.history, "attacks": result.attack_log}
    (out / "record.json").write_text(json.dumps(record, indent=1))
    return out


def run_erasure(cfg: StudyConfig, *, out_dir: str | Path | None = None, tracker=None, rank: int = 0,
                world_size: int = 1, wrap_trainable: Callable | None = None,
                on_step: Callable[[int, dict[str, float]], None] | None = None,
                on_checkpoint: Callable[[int, Path], None] | None = None, checkpoint_dir: str | Path | None = None,
                resume_from: str | Path | None = None, progress: bool = True, pipe=None) -> ErasureResult:
    """Erase ``cfg.erase.erase_concept`` from ``cfg.model.model_id`` by training its text encoder(s).

    Args:
        cfg: the study configuration (validated by its dataclasses; files checked here before loading).
        out_dir: where rank 0 saves the encoder(s) and ``record.json``; None saves nothing.
        tracker: receives per-step metrics on rank 0 (default :class:`NullTracker`).
        rank, world_size: data-parallel position (Ray Train); 0 / 1 for a single process.
        wrap_trainable: e.g. ``ray.train.torch.prepare_model`` (DDP) applied to the trainable encoders.
        on_step: called after every step with ``(step, metrics)`` (all ranks).
        on_checkpoint: called with ``(completed_steps, folder)`` after each checkpoint (all ranks write to
            their own ``checkpoint_dir``; only rank 0's matters since encoders are synchronised).
        checkpoint_dir: folder for checkpoints every ``cfg.scaling.checkpoint_every`` steps.
        resume_from: a checkpoint folder to continue from (same config).
        progress: tqdm bar on rank 0.
        pipe: an already loaded pipeline (skips loading; must match ``cfg.model``).
    Returns:
        :class:`ErasureResult`.
    Raises:
        ValueError: bad input (before any model is loaded).
        FloatingPointError: a loss became NaN/inf.
    """
    retain_prompts = validate_inputs(cfg)
    torch.set_flush_denormal(True)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True  # the fp32 trainable encoder on Ampere+ GPUs
        torch.backends.cudnn.allow_tf32 = True
    tracker = tracker or NullTracker()
    if pipe is None:
        device = resolve_device(cfg.model.device)
        pipe = load_pipeline(cfg.model.model_id, dtype=frozen_dtype(cfg.model.frozen_dtype, device), device=device)
    eraser = Eraser(cfg, pipe, retain_prompts, rank=rank, world_size=world_size)
    if wrap_trainable is not None:
        if cfg.erase.method != "esd-x":
            eraser.conditioner.wrap_trainable(wrap_trainable)
        elif world_size > 1:  # ESD-x trains its UNet copy, which is not wrapped for data parallelism
            raise ValueError("erase.method=esd-x trains the UNet and runs in a single worker; use "
                             "scaling.num_workers=1")
    start, history = 0, []
    if resume_from is not None:
        start, history = load_checkpoint(resume_from, eraser)
        log.info("resumed from %s at step %d", resume_from, start)
    if rank == 0:
        n_params = sum(p.numel() for p in eraser.trainable_parameters)
        log.info("erasing %s from %s with %s: %d steps (warm-up %d, J=%d), %d worker(s), %d trainable parameters, "
                 "%d retain prompts", cfg.erase.erase_concept, cfg.model.model_id, cfg.erase.method,
                 cfg.optim.num_steps, cfg.erase.warmup_steps, cfg.attack.attack_steps, world_size, n_params,
                 len(retain_prompts))
    t0 = time.perf_counter()
    bar = tqdm(range(start, cfg.optim.num_steps), disable=not progress or rank != 0, desc="erase", unit="step")
    every = cfg.scaling.checkpoint_every
    for step in bar:
        metrics = eraser.train_step(step)
        history.append(metrics)
        if rank == 0 and step % cfg.tracking.log_every == 0:
            tracker.log_metrics(metrics, step)
        if rank == 0:
            bar.set_postfix(loss=f"{metrics['loss']:.4f}")
        if on_step is not None:
            on_step(step, metrics)
        done = step + 1
        if every and done % every == 0 and done < cfg.optim.num_steps and checkpoint_dir is not None:
            folder = save_checkpoint(Path(checkpoint_dir) / f"step_{done:06d}", eraser, step=done, history=history)
            if on_checkpoint is not None:
                on_checkpoint(done, folder)
    wall = time.perf_counter() - t0
    encoders = {e: eraser.conditioner.trained_encoder(e) for e in eraser.conditioner.train_encoders}
    result = ErasureResult(encoders, history, wall, None,
                           {c: s.attack_log for c, s in eraser.concepts.items()}, eraser,
                           unet=eraser.trainable_module if cfg.erase.method == "esd-x" else None)
    if out_dir is not None and rank == 0:
        result.out_dir = save_outputs(out_dir, result, cfg)
    return result
