"""The Ray Train worker function: one SAGE erasure, data-parallel over the Train worker group.

Distribution lives here and nowhere else (the torchtitan rule): :func:`run_erasure` is single-device code;
this module adds

* rank and world size from ``ray.train.get_context()``; DDP on the trainable encoder through
  ``ray.train.torch.prepare_model`` (gloo on CPU, NCCL on GPU: :func:`torch_backend`). The step already
  splits its work by rank: each worker draws its own rollout noise and attack templates and takes its shard
  of the retain batch (``sage_dist/train/step.py``), so more workers explore more of the concept domain;
* a checkpoint every ``scaling.checkpoint_every`` steps, reported with ``ray.train.report`` (rank 0 uploads
  the folder ``run_erasure`` wrote: safetensors weights, optimizer, RNG and attack state); a restarted
  worker group resumes from ``ray.train.get_checkpoint()`` and ends bit-identical to an uninterrupted run;
* intermediate metrics at each checkpoint (losses and the text-space proxy, so ASHA can stop a trial) and the
  final metrics of :func:`sage_dist.eval.objective.evaluate_trial`;
* MLflow logging on rank 0 only (per-step losses, final metrics, the original-vs-erased image grid, the
  erased encoder), into the child run the Tune trial created;
* the study's shared frozen-model work (:mod:`sage_dist.train.shared`): the pipeline loaded once per process,
  the τ_o conditioning of the retain prompts and the trajectory bank read from and added to the study's cache
  (``WorkerRun.frozen_cache_dir``), with the same numbers as a run that computes them itself.

:func:`run_worker` is the worker's body without Ray Train: a one-worker Tune trial runs it in its own process
(:mod:`sage_dist.tune.trial`), reporting to Tune instead of Ray Train.

Called directly (no Ray session), it runs as rank 0 of 1 and returns the final metrics (tests)::

    python -c "from sage_dist.config import *; from sage_dist.train.ray_worker import train_fn_per_worker, \
worker_config; print(train_fn_per_worker(worker_config(StudyConfig(model=ModelConfig(model_id='tiny-sd'), \
optim=OptimConfig(num_steps=4), erase=EraseConfig(warmup_steps=2, ddim_steps=4), \
attack=AttackConfig(attack_steps=3), retain=RetainConfig(retain_batch_size=4, top_k=2)))))"
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from sage_dist.config import StudyConfig
from sage_dist.eval.objective import (
    evaluate_trial,
    text_proxy_metrics,
    trial_image_grid,
)
from sage_dist.files import ensure_writable_folder
from sage_dist.models.load import (
    frozen_dtype,
    load_text_encoders,
    original_encoders,
    resolve_device,
)
from sage_dist.models.registry import is_sdxl
from sage_dist.tracking import MlflowTracker, NullTracker
from sage_dist.train.loop import run_erasure, save_outputs
from sage_dist.train.shared import cache_fields, frozen_pipeline, open_frozen_cache
from sage_dist.train.validate import validate_inputs

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class WorkerRun:
    """Per-run settings of a worker that are not part of the study configuration."""
    tracking_uri: str = ""
    """Absolute MLflow tracking URI of ``run_id``; "" logs nothing."""
    run_id: str = ""
    """MLflow run (the trial's child run) that rank 0 logs to; "" logs nothing."""
    out_dir: str = ""
    """Where rank 0 saves the erased encoder (``save_outputs``); "" uses a temporary folder."""
    log_images: bool = True
    """Log the original-vs-erased image grid."""
    log_encoder: bool = True
    """Log the erased encoder folder as an MLflow artifact."""
    frozen_cache_dir: str = ""
    """Folder of the study's cache of frozen-model work (:mod:`sage_dist.train.shared`; τ_o of the retain prompts,
    the trajectory bank), read and extended by this run; "" computes everything in this run (same numbers)."""
    grid_steps: int = 10
    """DDIM steps of the image grid."""
    world_quick: bool = True
    """Quick image-space evaluation on the bundled world (half the prompts)."""
    def __post_init__(self) -> None:
        if bool(self.tracking_uri) != bool(self.run_id):
            raise ValueError("WorkerRun: give both tracking_uri and run_id, or neither")
        if self.grid_steps < 1:
            raise ValueError(f"WorkerRun.grid_steps={self.grid_steps}: must be >= 1")


def worker_config(cfg: StudyConfig, run: WorkerRun | None = None) -> dict[str, Any]:
    """The ``train_loop_config`` dict of :func:`train_fn_per_worker` (plain, picklable, flat config)."""
    return {"study": cfg.to_flat_dict(), "run": dataclasses.asdict(run or WorkerRun())}


def torch_backend(use_gpu: bool) -> str:
    """The process-group backend: NCCL on GPUs, gloo on CPUs."""
    return "nccl" if use_gpu else "gloo"


def _train_context():
    """``ray.train.get_context()`` inside a Ray Train worker, else None."""
    try:
        import ray.train

        ctx = ray.train.get_context()
        ctx.get_world_rank()
        return ctx
    except (ImportError, RuntimeError, AttributeError):
        return None


def _process_start_time() -> float:
    """When this process started (Unix time), to measure worker start-up."""
    import psutil

    return psutil.Process().create_time()


def _tracker(run: WorkerRun, rank: int):
    if rank != 0 or not run.run_id:
        return NullTracker()
    return MlflowTracker(run.tracking_uri, run.run_id)


def ddp_options(cfg: StudyConfig, pipe) -> dict[str, Any]:
    """DistributedDataParallel keyword arguments for the trainable encoders of ``cfg`` on ``pipe``.

    SDXL conditions its UNet on the *penultimate* states (``hidden_states[-2]``) of both encoders, and only the
    second encoder's final states feed the UNet (``text_embeds``). So when the first encoder (index 0 in
    ``model.train_encoders``) is trained, its last block and final LayerNorm reach the loss only through the
    pooled features of SAGE's graph loss. In steps without that loss (ESD, AdvUnlearn, ``retain.graph_weight=0``, a
    retain shard of one prompt) they get no gradient, and DDP's reducer fails at the next forward ("Expected to
    have finished reduction in the prior iteration") unless told to look for unused parameters. SD 1.x/2.x
    condition on the final states, so every trainable parameter is used and the cheaper default stays.
    """
    return {"find_unused_parameters": True} if is_sdxl(pipe) and 0 in cfg.model.train_encoders else {}


def train_fn_per_worker(config: dict[str, Any]) -> dict[str, float]:
    """Run one erasure on this Ray Train worker (see module docstring); returns the final metrics (rank 0;
    others {}). Called directly (no Ray session), it runs :func:`run_worker` as rank 0 of 1.

    Args:
        config: from :func:`worker_config`: ``{"study": flat StudyConfig, "run": WorkerRun fields}``.
    Raises:
        ValueError: bad configuration or inputs (before the model is loaded).
        FloatingPointError: a loss or a final metric is NaN / infinite.
    """
    cfg = StudyConfig.from_flat_dict(config["study"])
    run = WorkerRun(**config["run"])
    retain_prompts = validate_inputs(cfg)
    ctx = _train_context()
    if ctx is None:  # checkpoints (and the text proxy logged at each) as under Ray, into a folder of its own
        with tempfile.TemporaryDirectory(prefix="sage_ckpt_") as ckpt_root:
            return run_worker(cfg, run, checkpoint_dir=ckpt_root, keep_checkpoints=1, retain_prompts=retain_prompts,
                              t_start=_process_start_time())
    import ray.train
    import ray.train.torch

    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    device = ray.train.torch.get_device() if cfg.scaling.use_gpu else resolve_device(cfg.model.device)

    def prepare(pipe):
        return functools.partial(ray.train.torch.prepare_model, parallel_strategy_kwargs=ddp_options(cfg, pipe))

    def report(metrics: dict[str, float], folder: Path | None) -> None:
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(folder)) if folder else None,
                         checkpoint_dir_name=f"step_{int(metrics['step']):06d}")

    checkpoint = ray.train.get_checkpoint()
    with tempfile.TemporaryDirectory(prefix="sage_ckpt_") as ckpt_root, \
            (checkpoint.as_directory() if checkpoint is not None else contextlib.nullcontext()) as resume_dir:
        if resume_dir is not None:
            log.info("rank %d resumes from %s", rank, resume_dir)
        final = run_worker(cfg, run, rank=rank, world_size=world_size, device=device, prepare=prepare,
                           resume_from=resume_dir, checkpoint_dir=ckpt_root, report=report,
                           retain_prompts=retain_prompts, t_start=_process_start_time())
    # not "done": Tune reads a "done" key as "stop this trial now" and would kill the trial mid-teardown
    ray.train.report({"step": cfg.optim.num_steps, "trial_finished": 1, **final})
    return final


def run_worker(cfg: StudyConfig, run: WorkerRun, *, rank: int = 0, world_size: int = 1,
               device: torch.device | None = None, prepare: Callable[[Any], Callable] | None = None,
               resume_from: str | Path | None = None, checkpoint_dir: str | Path | None = None,
               keep_checkpoints: int | None = None,
               report: Callable[[dict[str, float], Path | None], None] | None = None,
               retain_prompts: list[str] | None = None, t_start: float | None = None) -> dict[str, float]:
    """One erasure of ``cfg`` on this process: pipeline (:func:`sage_dist.train.shared.frozen_pipeline`, loaded
    once per process), the study's frozen cache (``run.frozen_cache_dir``), training with checkpoints, then on
    rank 0 evaluation and MLflow logging. The Ray Train worker (:func:`train_fn_per_worker`) and a one-worker Tune
    trial running in its own process (:mod:`sage_dist.tune.trial`) both call it.

    Args:
        cfg, run: the study configuration and the run's settings.
        rank, world_size: data-parallel position (0 / 1 outside a Ray Train worker group).
        device: where the frozen pipeline goes (default :func:`~sage_dist.models.load.resolve_device` of
            ``cfg.model.device``).
        prepare: ``prepare(pipe)`` returns the wrapper of the trainable encoders (DDP), or None.
        resume_from: a checkpoint folder to continue from.
        checkpoint_dir: where checkpoints go every ``scaling.checkpoint_every`` steps (None: none are written).
        keep_checkpoints: checkpoints kept in ``checkpoint_dir`` (None: all).
        report: called after each checkpoint with ``(metrics, folder)``: the step, the last step's losses and, on
            rank 0, the text-space proxy (``folder`` is None on other ranks).
        retain_prompts: from :func:`~sage_dist.train.validate.validate_inputs` (computed here when None).
        t_start: when this worker's work began (Unix time): process start for a fresh process, the trial's
            start for a reused one; ``time_worker_start_s`` is the time from it to this call.
    Returns:
        Rank 0: the final metrics of :func:`sage_dist.eval.objective.evaluate_trial`, plus ``time_*`` (seconds:
        worker start, pipeline load, training, evaluation, logging), ``pipeline_reused`` (1: the process had the
        pipeline loaded) and ``frozen_cache_*`` (entries found in the study's cache at the start, bank rows this
        run computed). Other ranks: {}.
    Raises:
        ValueError: bad configuration or inputs, an unwritable cache folder (before the model is loaded).
        FloatingPointError: a loss or a final metric is NaN / infinite.
    """
    t_enter = time.time()
    t_start = t_enter if t_start is None else t_start
    if retain_prompts is None:
        retain_prompts = validate_inputs(cfg)
    if run.frozen_cache_dir:
        ensure_writable_folder(run.frozen_cache_dir, "frozen cache folder")
    torch.set_flush_denormal(True)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    tracker = _tracker(run, rank)
    device = device if device is not None else resolve_device(cfg.model.device)
    t_load = time.time()
    pipe, reused = frozen_pipeline(cfg.model.model_id, dtype=frozen_dtype(cfg.model.frozen_dtype, device),
                                   device=device)
    timing = {"time_worker_start_s": t_enter - t_start, "time_load_s": time.time() - t_load,
              "pipeline_reused": float(reused)}
    cache = None
    if run.frozen_cache_dir:
        cache = open_frozen_cache(run.frozen_cache_dir, cache_fields(cfg, pipe, retain_prompts, rank=rank),
                                  device=pipe.unet.device)
    found = cache.counts() if cache is not None else {"tau_o": 0, "levels": 0, "targets": 0}
    originals = original_encoders(pipe)
    last = {"metrics": {}}

    def on_step(step: int, metrics: dict[str, float]) -> None:
        last["metrics"] = metrics

    def on_checkpoint(done: int, folder: Path) -> None:
        metrics = {"step": done, **{k: v for k, v in last["metrics"].items()}}
        if rank == 0 and cfg.erase.method != "esd-x":  # the text-space proxy reads trained text encoders
            trained = load_text_encoders(folder, originals, dtype=torch.float32)
            proxy = text_proxy_metrics(cfg, originals, trained, pipe.tokenizer, retain_prompts)
            metrics.update(proxy)
            tracker.log_metrics(proxy, done)
        if report is not None:
            report(metrics, folder if rank == 0 else None)

    result = run_erasure(cfg, out_dir=None, tracker=tracker, rank=rank, world_size=world_size,
                         wrap_trainable=prepare(pipe) if prepare is not None else None, on_step=on_step,
                         on_checkpoint=on_checkpoint, checkpoint_dir=checkpoint_dir, keep_checkpoints=keep_checkpoints,
                         resume_from=resume_from, progress=False, pipe=pipe, frozen_cache=cache)
    if cache is not None:
        try:
            cache.persist()
        except OSError as err:  # the trial's result stands; later trials recompute what could not be stored
            log.warning("frozen cache %s not written (%s: %s)", cache.folder, type(err).__name__, err)
    bank = result.eraser.bank if result.eraser is not None else None
    cache_use = {"frozen_cache_tau_o_found": float(found["tau_o"]),
                 "frozen_cache_levels_found": float(found["levels"]),
                 "frozen_cache_targets_found": float(found["targets"]),
                 "frozen_cache_bank_rows_computed": float(bank.num_ddim_rows + bank.num_target_rows if bank else 0)}

    final: dict[str, float] = {}
    if rank == 0:
        t_eval = time.time()
        final = evaluate_trial(cfg, result, pipe=pipe, retain_prompts=retain_prompts, world_quick=run.world_quick)
        timing.update(time_train_s=result.wall_time_s, time_eval_s=time.time() - t_eval)
        t_log = time.time()
        tracker.log_metrics(final, cfg.optim.num_steps)
        with tempfile.TemporaryDirectory(prefix="sage_out_") as tmp:
            out = Path(run.out_dir) if run.out_dir else Path(tmp)
            save_outputs(out, result, cfg)
            if run.log_encoder:
                tracker.log_artifacts(out, "erased_encoder")
        if run.log_images:
            try:
                grid = trial_image_grid(cfg, pipe, result.text_encoders, unet=result.unet,
                                        num_inference_steps=run.grid_steps)
                tracker.log_image(grid, "images/original_vs_erased.png")
            except Exception as err:  # a grid is a nicety: never fail a finished trial for it
                log.warning("image grid skipped: %s: %s", type(err).__name__, err)
        timing["time_log_s"] = time.time() - t_log
        tracker.log_metrics({**timing, **cache_use}, cfg.optim.num_steps)
        final.update(timing)
        final.update(cache_use)
    return final
