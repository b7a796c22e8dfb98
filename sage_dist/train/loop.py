"""The single-process erasure loop: validate, load, train, checkpoint, save (docs/METHOD.md "Warm-up", §7).

Checkpoints (``sage_dist/train/checkpoint.py``, each written atomically) come every
``scaling.checkpoint_every`` steps, and with ``checkpoint_interval_s`` also after the first step that ends that
many seconds after the previous checkpoint (or the start); ``keep_checkpoints`` bounds how many stay on disk.
``stop_requested`` (e.g. set by a SIGINT handler) ends the run after the current step with a checkpoint of
the completed steps and :class:`TrainingInterrupted`. The final outputs are written into a staging folder and
moved into place only when complete, so a failed save never damages what ``out_dir`` held before.

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
from sage_dist.files import ensure_writable_folder
from sage_dist.models.load import frozen_dtype, load_pipeline, resolve_device
from sage_dist.tracking import NullTracker
from sage_dist.train.checkpoint import (
    checkpoint_name,
    load_checkpoint,
    prune_checkpoints,
    publish_entries,
    save_checkpoint,
)
from sage_dist.train.shared import FrozenCache
from sage_dist.train.step import Eraser
from sage_dist.train.validate import validate_inputs

log = logging.getLogger(__name__)

OUTPUT_NAMES = ("text_encoder", "text_encoder_2", "unet", "record.json")
"""What :func:`save_outputs` writes into ``out_dir``; ``record.json`` is moved in last and marks a finished run."""


class TrainingInterrupted(Exception):
    """``stop_requested`` ended :func:`run_erasure` early."""

    def __init__(self, step: int, checkpoint: Path | None):
        self.step = step
        """Completed steps (the checkpoint holds the state after them)."""
        self.checkpoint = checkpoint
        """The checkpoint of the completed steps, or None (no step had run in this process, or no
        ``checkpoint_dir``)."""
        where = f"; checkpoint {checkpoint}" if checkpoint is not None else ""
        super().__init__(f"interrupted after {step} completed steps{where}")


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
    retain_prompts: list[str] = field(default_factory=list)
    """The retain prompts the run trained on (after cleaning), in the order of the retain set."""
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
    wall time). Everything is written into a staging folder first and then moved into place, replacing any
    earlier run's :data:`OUTPUT_NAMES` (other files in ``out_dir``, such as ``checkpoints/``, are kept).

    Raises:
        ValueError: ``out_dir`` cannot be created or written.
        OSError: the write failed (a full disk says so); ``out_dir`` is then unchanged.
    """
    out = ensure_writable_folder(out_dir, "output folder")
    record = {"config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.to_flat_dict().items()},
              "seed": cfg.optim.seed, "versions": package_versions(), "wall_time_s": result.wall_time_s,
              "history": result.history, "attacks": result.attack_log,
              "retain_prompts": result.retain_prompts}

    def write(folder: Path) -> None:
        for e, enc in result.text_encoders.items():
            enc.save_pretrained(folder / ("text_encoder" if e == 0 else "text_encoder_2"), safe_serialization=True)
        if result.unet is not None:
            result.unet.save_pretrained(folder / "unet", safe_serialization=True)
        (folder / "record.json").write_text(json.dumps(record, indent=1))

    return publish_entries(out, write, names=OUTPUT_NAMES, what=f"the outputs to {out}",
                           intact=f"nothing in {out} was replaced")


def run_erasure(cfg: StudyConfig, *, out_dir: str | Path | None = None, tracker=None, rank: int = 0,
                world_size: int = 1, wrap_trainable: Callable | None = None,
                on_step: Callable[[int, dict[str, float]], None] | None = None,
                on_checkpoint: Callable[[int, Path], None] | None = None, checkpoint_dir: str | Path | None = None,
                checkpoint_interval_s: float | None = None, keep_checkpoints: int | None = None,
                stop_requested: Callable[[], bool] | None = None,
                resume_from: str | Path | None = None, progress: bool = True, pipe=None,
                frozen_cache: FrozenCache | None = None) -> ErasureResult:
    """Erase ``cfg.erase.erase_concept`` from ``cfg.model.model_id`` by training its text encoder(s).

    Args:
        cfg: the study configuration (validated by its dataclasses; files checked here before loading).
        out_dir: where rank 0 saves the encoder(s) and ``record.json`` (:func:`save_outputs`); None saves
            nothing. Checked for writability before any model loads.
        tracker: receives per-step metrics on rank 0 (default :class:`NullTracker`).
        rank, world_size: data-parallel position (Ray Train); 0 / 1 for a single process.
        wrap_trainable: e.g. ``ray.train.torch.prepare_model`` (DDP) applied to the trainable encoders.
        on_step: called after every step with ``(step, metrics)`` (all ranks).
        on_checkpoint: called with ``(completed_steps, folder)`` after each checkpoint (all ranks write to
            their own ``checkpoint_dir``; only rank 0's matters since encoders are synchronised).
        checkpoint_dir: folder for checkpoints (``step_N``, N completed steps) every
            ``cfg.scaling.checkpoint_every`` steps.
        checkpoint_interval_s: also checkpoint after the first step that ends this many seconds (wall time)
            after the previous checkpoint or the start; None: steps only.
        keep_checkpoints: after each checkpoint, delete every checkpoint in ``checkpoint_dir`` but the
            latest ``keep_checkpoints`` this run wrote (earlier runs' are deleted too; >= 1); None keeps all.
        stop_requested: polled after each step; when it returns True the run writes a checkpoint of the
            completed steps (if ``checkpoint_dir`` is set) and raises :class:`TrainingInterrupted`. A request
            during the last step lets the run finish and save normally.
        resume_from: a checkpoint folder to continue from (same config).
        progress: tqdm bar on rank 0.
        pipe: an already loaded pipeline (skips loading; must match ``cfg.model``).
        frozen_cache: frozen-model work shared with other runs (:mod:`sage_dist.train.shared`), passed to the
            :class:`~sage_dist.train.step.Eraser`; the numbers are identical without it.
    Returns:
        :class:`ErasureResult`.
    Raises:
        ValueError: bad input, an unwritable ``out_dir`` or ``checkpoint_dir`` (before any model is loaded).
        FloatingPointError: a loss became NaN/inf.
        TrainingInterrupted: ``stop_requested`` returned True.
        OSError: a checkpoint or the outputs could not be written (the message names what is intact).
    """
    retain_prompts = validate_inputs(cfg)
    if out_dir is not None and rank == 0:
        ensure_writable_folder(out_dir, "output folder")
    checkpointing = bool(cfg.scaling.checkpoint_every) or checkpoint_interval_s is not None or \
        stop_requested is not None
    if checkpoint_dir is not None and checkpointing:
        ensure_writable_folder(checkpoint_dir, "checkpoint folder")
    torch.set_flush_denormal(True)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True  # the fp32 trainable encoder on Ampere+ GPUs
        torch.backends.cudnn.allow_tf32 = True
    tracker = tracker or NullTracker()
    if pipe is None:
        device = resolve_device(cfg.model.device)
        pipe = load_pipeline(cfg.model.model_id, dtype=frozen_dtype(cfg.model.frozen_dtype, device), device=device)
    eraser = Eraser(cfg, pipe, retain_prompts, rank=rank, world_size=world_size, frozen_cache=frozen_cache)
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

    written: list[Path] = []

    def checkpoint(done: int) -> Path | None:
        if checkpoint_dir is None:
            return None
        folder = save_checkpoint(Path(checkpoint_dir) / checkpoint_name(done), eraser, step=done, history=history)
        written.append(folder)
        if keep_checkpoints is not None:
            prune_checkpoints(checkpoint_dir, keep=written[-keep_checkpoints:])
        if on_checkpoint is not None:
            on_checkpoint(done, folder)
        return folder

    if stop_requested is not None and stop_requested() and start < cfg.optim.num_steps:
        raise TrainingInterrupted(start, None)
    t0 = last_checkpoint_t = time.perf_counter()
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
        if done == cfg.optim.num_steps:
            break
        saved = None
        due_by_time = checkpoint_interval_s is not None and \
            time.perf_counter() - last_checkpoint_t >= checkpoint_interval_s
        if (every and done % every == 0) or due_by_time:
            saved = checkpoint(done)
            last_checkpoint_t = time.perf_counter()
        if stop_requested is not None and stop_requested():
            bar.close()
            raise TrainingInterrupted(done, saved or checkpoint(done))
    wall = time.perf_counter() - t0
    encoders = {e: eraser.conditioner.trained_encoder(e) for e in eraser.conditioner.train_encoders}
    result = ErasureResult(encoders, history, wall, None,
                           {c: s.attack_log for c, s in eraser.concepts.items()}, eraser,
                           unet=eraser.trainable_module if cfg.erase.method == "esd-x" else None,
                           retain_prompts=list(retain_prompts))
    if out_dir is not None and rank == 0:
        result.out_dir = save_outputs(out_dir, result, cfg)
    return result
