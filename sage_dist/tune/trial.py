"""One Tune trial: one erasure, in the trial's own long-lived process or under its own TorchTrainer.

Two ways to run a trial (:func:`runs_in_process`):

* **One worker** (``scaling.num_workers=1``, the default and the world's main job): the erasure runs in the
  trial's own process (:func:`sage_dist.train.ray_worker.run_worker`), and the study reuses that process for
  its next trial (``TuneConfig(reuse_actors=True)``; Ray 2.60 reuses a function trainable's actor once the
  function has returned). What a trial computes from the frozen model alone is therefore paid once per process
  or once per study (:mod:`sage_dist.train.shared`): the pipeline stays loaded in the actor, the τ_o
  conditioning of the retain prompts and the trajectory bank come from the study's frozen cache, and the
  original model's evaluation images from their disk cache; nor does a trial start a Train controller and
  worker group (the start-up that made Ray 41 % of a short trial, ``reports/benchmarks.md``). A one-worker
  TorchTrainer would add nothing to a one-process erasure but that start-up: it has no data parallelism to run.
  Checkpoints go to ``<study_dir>/train/<trial id>/step_N`` (the latest kept); a retried or resumed trial
  continues from there and ends bit-identical to an uninterrupted run. Reports reach Tune through
  ``ray.tune.report``.
* **Several workers** (``scaling.num_workers > 1``, DDP; or ``TrialSettings.in_process=False``): the Ray 2.60
  Train V2 driver-function pattern. A ``TorchTrainer`` can no longer be passed to ``Tuner``, so each trial is
  a Tune function trainable that builds a TorchTrainer with ``RunConfig(callbacks=[TuneReportCallback()])``,
  which forwards rank 0's ``ray.train.report`` metrics (and checkpoint paths) to Tune. Its Train run is named
  after the trial id inside the study folder, so a retried or resumed trial continues from its latest Train
  checkpoint. The workers read and extend the same study cache from disk.

Either way Tune sees only the reports that carry every metric its searcher or scheduler reads
(``TrialSettings.tune_metrics``), and per trial this module

1. merges the searcher's suggestions (dotted keys) into the study's base configuration;
2. opens (or, on a retry or a resumed study, re-opens) the trial's nested MLflow child run and logs the
   flattened config as params plus tags (git sha, model, concept, seed, trial id);
3. runs the erasure (above);
4. on failure, records the root cause on the child run (status FAILED, tag ``failure_reason``) and re-raises
   so Tune marks the trial ERROR and the study goes on. Deterministic failures (NaN loss, invalid config) are
   remembered in ``<study>/failed/<trial id>.txt`` and not re-run by Tune's retries. A tracking error while the
   run is closed is logged and changes nothing about the trial's outcome. A trial that the scheduler stops
   (ASHA) leaves its run to the study driver, which closes it from Tune's outcome.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sage_dist.config import StudyConfig
from sage_dist.models.load import resolve_device
from sage_dist.tracking import MlflowTracker, NullTracker, resolve_tracking
from sage_dist.train.checkpoint import latest_checkpoint
from sage_dist.train.ray_worker import (
    WorkerRun,
    run_worker,
    torch_backend,
    train_fn_per_worker,
    worker_config,
)

log = logging.getLogger(__name__)

RESERVED_KEYS = ("study", "trial")
"""Top-level keys of a trial's config that are not searched parameters."""
DETERMINISTIC_ERRORS = ("FloatingPointError", "ValueError")
"""Root causes that a retry would only repeat."""


@dataclass(frozen=True, kw_only=True)
class TrialSettings:
    """Study-level settings every trial needs (part of Tune's ``param_space``, so they survive a resume)."""
    study_dir: str
    """Absolute folder of the study (Tune experiment); Train runs go to ``<study_dir>/train/<trial id>``."""
    tracking_uri: str = ""
    """Absolute MLflow tracking URI; "" disables tracking."""
    experiment_id: str = ""
    """MLflow experiment id."""
    parent_run_id: str = ""
    """The study's parent run (child runs nest under it)."""
    git_sha: str = "unknown"
    """Commit the study runs from (tag)."""
    driver_cpus: float = 0.2
    """CPUs reserved for the trial's own process beyond its workers' (under a TorchTrainer it only waits)."""
    tune_metrics: tuple[str, ...] = ()
    """Metrics Tune's searcher (and scheduler) read: a worker report reaches Tune only when it carries all of
    them (multi-objective: the final report; ASHA: every checkpoint's ``text_score``)."""
    log_images: bool = True
    """Log the original-vs-erased image grid of every trial."""
    log_encoder: bool = True
    """Log every trial's erased encoder as an artifact."""
    in_process: bool = True
    """Run a one-worker trial in the trial's own (reused) process instead of a one-worker TorchTrainer
    (:func:`runs_in_process`); False keeps the TorchTrainer for every trial (for comparisons)."""
    share_frozen: bool = True
    """Share frozen-model work between the study's trials through ``<study_dir>/frozen_cache``
    (:mod:`sage_dist.train.shared`; the numbers are identical without it)."""


def trial_config(cfg_flat: dict[str, Any], settings: TrialSettings) -> dict[str, Any]:
    """Tune ``param_space`` of a study: ``{"study": base flat config, "trial": TrialSettings}``; the searcher
    adds one top-level entry per searched dotted key."""
    return {"study": cfg_flat, "trial": dataclasses.asdict(settings)}


def trial_study_config(config: dict[str, Any]) -> StudyConfig:
    """The trial's StudyConfig: base config with the searcher's suggestions applied (validated)."""
    suggested = {k: v for k, v in config.items() if k not in RESERVED_KEYS}
    return StudyConfig.from_flat_dict({**config["study"], **suggested})


def root_cause(err: BaseException) -> tuple[str, str]:
    """``(kind, message)`` of a trial failure: the first worker's error inside a Ray Train failure, its type
    name (``FloatingPointError`` / ``ValueError`` also when Ray wrapped it) and its last message line."""
    failures = getattr(err, "worker_failures", None)
    if failures:
        err = failures[min(failures)]
    cause = getattr(err, "cause", None)
    if isinstance(cause, BaseException):
        err = cause
    kind = ("FloatingPointError" if isinstance(err, FloatingPointError)
            else "ValueError" if isinstance(err, ValueError) else type(err).__name__)
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return kind, (lines[-1] if lines else kind)


def runs_in_process(cfg: StudyConfig, settings: TrialSettings) -> bool:
    """Whether a trial of ``cfg`` runs its erasure in the trial's own process (one worker, ``settings.in_process``);
    such trials reserve their worker's resources themselves (:func:`trial_resources`) and the study reuses their
    processes (``TuneConfig(reuse_actors=True)``)."""
    return settings.in_process and cfg.scaling.num_workers == 1


def trial_resources(cfg: StudyConfig, settings: TrialSettings) -> dict[str, float]:
    """The Tune resources of one trial of ``cfg``: ``driver_cpus`` plus, when it runs in process, its worker's
    ``cpus_per_worker`` and GPU (the same total per trial that :func:`sage_dist.tune.cluster.trial_concurrency`
    plans with); under a TorchTrainer the workers request theirs."""
    if not runs_in_process(cfg, settings):
        return {"cpu": settings.driver_cpus}
    s = cfg.scaling
    return {"cpu": settings.driver_cpus + s.cpus_per_worker, **({"gpu": 1.0} if s.use_gpu else {})}


def run_trial(config: dict[str, Any]) -> None:
    """Tune function trainable: one erasure, in this process or under its own TorchTrainer (module docstring)."""
    import ray.tune

    t_enter = time.time()
    _log_to_stderr()
    settings = TrialSettings(**config["trial"])
    context = ray.tune.get_context()
    trial_id, trial_name = context.get_trial_id(), context.get_trial_name()
    study_dir = Path(settings.study_dir)
    failed_marker = study_dir / "failed" / f"{trial_id}.txt"

    tracker = NullTracker()
    if settings.tracking_uri:
        target = resolve_tracking(settings.tracking_uri)
        tracker = MlflowTracker.find_or_start(target, settings.experiment_id, key=f"{study_dir}/{trial_id}",
                                              run_name=trial_name, parent_run_id=settings.parent_run_id,
                                              tags={"trial_id": trial_id, "git_sha": settings.git_sha,
                                                    "study_dir": str(study_dir)})
    final = None
    try:
        if failed_marker.is_file():
            raise RuntimeError(f"not retried, failed deterministically before: {failed_marker.read_text()}")
        cfg = trial_study_config(config)
        tracker.set_tags({"model": cfg.model.model_id, "concept": ",".join(cfg.erase.erase_concept),
                          "seed": cfg.optim.seed, "method": cfg.erase.method,
                          "trial_runner": "in_process" if runs_in_process(cfg, settings) else "torch_trainer"})
        tracker.log_params({**cfg.to_flat_dict(), "searched": ",".join(k for k in config if k not in RESERVED_KEYS)})
        run = WorkerRun(tracking_uri=settings.tracking_uri if tracker.run_id else "", run_id=tracker.run_id,
                        out_dir=str(study_dir / "encoders" / trial_id),
                        log_images=settings.log_images, log_encoder=settings.log_encoder,
                        frozen_cache_dir=str(study_dir / "frozen_cache") if settings.share_frozen else "")
        t_fit = time.time()
        if runs_in_process(cfg, settings):
            final = _run_in_process(cfg, run, settings, trial_id, t_enter)
        else:
            _fit_torch_trainer(cfg, run, settings, trial_id)
        t_done = time.time()
    except SystemExit:
        raise  # Tune stopped the trial inside a report (ASHA): not a failure; the study driver closes its run
    except BaseException as err:
        kind, message = root_cause(err)
        reason = f"{kind}: {message}"[:2000]
        if kind in DETERMINISTIC_ERRORS and not failed_marker.is_file():
            failed_marker.parent.mkdir(parents=True, exist_ok=True)
            failed_marker.write_text(reason)
        _close_run(tracker, "FAILED", reason)
        log.error("trial %s failed: %s", trial_id, reason)
        raise RuntimeError(f"trial {trial_id} failed: {reason}") from err
    # Where the trial's wall time went (the worker's own split is in its final metrics): MLflow only, since a
    # report from here would replace the worker's final result as the trial's last result in Tune.
    _close_run(tracker, "FINISHED", timing={"time_trial_setup_s": t_fit - t_enter, "time_trial_fit_s": t_done - t_fit,
                                            "time_trial_process_age_s": t_enter - _process_start_time()})
    if final is not None and all(k in final for k in settings.tune_metrics):
        ray.tune.report({"step": cfg.optim.num_steps, "trial_finished": 1, **final})


def _run_in_process(cfg: StudyConfig, run: WorkerRun, settings: TrialSettings, trial_id: str,
                    t_start: float) -> dict[str, float]:
    """The erasure in this process (:func:`~sage_dist.train.ray_worker.run_worker`), resumed from the trial's
    latest checkpoint in ``<study_dir>/train/<trial id>``; intermediate reports that carry every Tune metric go
    to Tune. Returns the final metrics (reported by :func:`run_trial` after the run is closed)."""
    import ray.tune

    checkpoint_dir = Path(settings.study_dir) / "train" / trial_id
    resume = latest_checkpoint(checkpoint_dir)
    if resume is not None:
        log.info("trial %s resumes from %s", trial_id, resume)
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    device = torch.device("cuda") if cfg.scaling.use_gpu else resolve_device(cfg.model.device)
    required = settings.tune_metrics

    def report(metrics: dict[str, float], folder: Path | None) -> None:
        if all(k in metrics for k in required):
            ray.tune.report(metrics)

    return run_worker(cfg, run, device=device, resume_from=resume, checkpoint_dir=checkpoint_dir,
                      keep_checkpoints=1, report=report, t_start=t_start)


def _fit_torch_trainer(cfg: StudyConfig, run: WorkerRun, settings: TrialSettings, trial_id: str) -> None:
    """The erasure under its own TorchTrainer (module docstring); rank 0's reports reach Tune through
    ``TuneReportCallback`` when they carry every Tune metric."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    s = cfg.scaling
    trainer = TorchTrainer(
        train_fn_per_worker,
        train_loop_config=worker_config(cfg, run),
        torch_config=TorchConfig(backend=torch_backend(s.use_gpu)),
        scaling_config=ray.train.ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu,
                                               resources_per_worker={"CPU": s.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=trial_id, storage_path=str(Path(settings.study_dir) / "train"),
            callbacks=[_objective_reports(TuneReportCallback, settings.tune_metrics)],
            # a worker failure ends this attempt; Tune's FailureConfig retries the trial, whose Train run
            # (same name, same storage) continues from its latest checkpoint
            failure_config=ray.train.FailureConfig(max_failures=0),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
            worker_runtime_env={"env_vars": {"OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false"}}),
    )
    trainer.fit()


def _log_to_stderr() -> None:
    """INFO logs of the package on this trial process's stderr, which Ray forwards to the study's driver (as a
    Ray Train worker's are): the trial process is an entry point of its own. Once per process."""
    logger = logging.getLogger("sage_dist")
    if not any(getattr(h, "sage_dist_trial", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.sage_dist_trial = True
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def _close_run(tracker, status: str, reason: str = "", timing: dict[str, float] | None = None) -> None:
    """Close the trial's child run. A tracking error here is logged, not raised: the trial's outcome (its
    Tune result, its saved encoder) stands, and the study driver closes a run left RUNNING from that outcome."""
    try:
        if timing:
            tracker.log_metrics(timing, 0)
        tracker.end(status, reason)
    except Exception as err:  # noqa: BLE001 - the trial's own result or error is what counts
        log.warning("could not close MLflow run %s as %s (%s: %s); the study driver closes it at the end",
                    tracker.run_id, status, type(err).__name__, err)


def _objective_reports(callback_class, required: tuple[str, ...]):
    """A ``TuneReportCallback`` (``callback_class``) that forwards a worker report to Tune only when it carries
    every metric in ``required``: Tune refuses a result without the metrics its searcher or scheduler reads,
    and intermediate reports carry losses and the text proxy while image-space objectives (RER, KID) arrive
    only with a trial's final report."""
    required = tuple(required)

    class ObjectiveReports(callback_class):
        def after_report(self, run_context, metrics, checkpoint):
            if all(k in metrics[0] for k in required):
                super().after_report(run_context, metrics, checkpoint)

    return ObjectiveReports()


def _process_start_time() -> float:
    import psutil

    return psutil.Process().create_time()
