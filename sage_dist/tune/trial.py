"""One Tune trial: build and fit its own TorchTrainer (the Ray 2.60 Train V2 driver-function pattern).

Ray 2.60 runs Train V2, where a ``TorchTrainer`` can no longer be passed to ``Tuner``; instead each trial is a
Tune function trainable that builds a TorchTrainer with ``RunConfig(callbacks=[TuneReportCallback()])``, which
forwards rank 0's ``ray.train.report`` metrics (and checkpoint paths) to Tune; here only the reports that carry
every metric Tune's searcher or scheduler reads (``TrialSettings.tune_metrics``).

Per trial this function

1. merges the searcher's suggestions (dotted keys) into the study's base configuration;
2. opens (or, on a retry or a resumed study, re-opens) the trial's nested MLflow child run and logs the
   flattened config as params plus tags (git sha, model, concept, seed, trial id);
3. fits the TorchTrainer. Its Train run is named after the trial id inside the study folder, so a retried or
   resumed trial continues from its latest Train checkpoint instead of starting over;
4. on failure, records the root cause on the child run (status FAILED, tag ``failure_reason``) and re-raises
   so Tune marks the trial ERROR and the study goes on. Deterministic failures (NaN loss, invalid config) are
   remembered in ``<study>/failed/<trial id>.txt`` and not re-run by Tune's retries. A tracking error while the
   run is closed is logged and changes nothing about the trial's outcome.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sage_dist.config import StudyConfig
from sage_dist.tracking import MlflowTracker, NullTracker, resolve_tracking
from sage_dist.train.ray_worker import (
    WorkerRun,
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
    """CPUs reserved for the trial's own process (it only waits on the TorchTrainer)."""
    tune_metrics: tuple[str, ...] = ()
    """Metrics Tune's searcher (and scheduler) read: a worker report reaches Tune only when it carries all of
    them (multi-objective: the final report; ASHA: every checkpoint's ``text_score``)."""
    log_images: bool = True
    """Log the original-vs-erased image grid of every trial."""
    log_encoder: bool = True
    """Log every trial's erased encoder as an artifact."""


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


def run_trial(config: dict[str, Any]) -> None:
    """Tune function trainable: one erasure under its own TorchTrainer (see module docstring)."""
    import ray.train
    import ray.tune
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    t_enter = time.time()
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
    try:
        if failed_marker.is_file():
            raise RuntimeError(f"not retried, failed deterministically before: {failed_marker.read_text()}")
        cfg = trial_study_config(config)
        tracker.set_tags({"model": cfg.model.model_id, "concept": ",".join(cfg.erase.erase_concept),
                          "seed": cfg.optim.seed, "method": cfg.erase.method})
        tracker.log_params({**cfg.to_flat_dict(), "searched": ",".join(k for k in config if k not in RESERVED_KEYS)})
        run = WorkerRun(tracking_uri=settings.tracking_uri if tracker.run_id else "", run_id=tracker.run_id,
                        out_dir=str(study_dir / "encoders" / trial_id),
                        log_images=settings.log_images, log_encoder=settings.log_encoder)
        s = cfg.scaling
        trainer = TorchTrainer(
            train_fn_per_worker,
            train_loop_config=worker_config(cfg, run),
            torch_config=TorchConfig(backend=torch_backend(s.use_gpu)),
            scaling_config=ray.train.ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu,
                                                   resources_per_worker={"CPU": s.cpus_per_worker}),
            run_config=ray.train.RunConfig(
                name=trial_id, storage_path=str(study_dir / "train"),
                callbacks=[_objective_reports(TuneReportCallback, settings.tune_metrics)],
                # a worker failure ends this attempt; Tune's FailureConfig retries the trial, whose Train run
                # (same name, same storage) continues from its latest checkpoint
                failure_config=ray.train.FailureConfig(max_failures=0),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
                worker_runtime_env={"env_vars": {"OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false"}}),
        )
        t_fit = time.time()
        result = trainer.fit()
        t_done = time.time()
    except BaseException as err:
        kind, message = root_cause(err)
        reason = f"{kind}: {message}"[:2000]
        if kind in DETERMINISTIC_ERRORS and not failed_marker.is_file():
            failed_marker.parent.mkdir(parents=True, exist_ok=True)
            failed_marker.write_text(reason)
        _close_run(tracker, "FAILED", reason)
        log.error("trial %s failed: %s", trial_id, reason)
        raise RuntimeError(f"trial {trial_id} failed: {reason}") from err
    del result
    # Where the trial's wall time went (the worker's own split is in its final metrics): MLflow only, since a
    # report from here would replace the worker's final result as the trial's last result in Tune.
    _close_run(tracker, "FINISHED", timing={"time_trial_setup_s": t_fit - t_enter, "time_trial_fit_s": t_done - t_fit,
                                            "time_trial_process_age_s": t_enter - _process_start_time()})


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
