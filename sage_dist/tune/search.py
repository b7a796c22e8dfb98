"""A search study: Ray Tune + Optuna over SAGE's hyper-parameters, each trial a Ray Train erasure.

:func:`run_search` runs (or resumes) a study from a built ``StudyConfig``, a define-by-run search space and
:class:`StudyOptions`, and returns a :class:`StudyOutcome`; the command line is :mod:`sage_dist.cli.study`.
In order:

1. :func:`plan_search`, before Ray starts and before anything is written to MLflow: the search-space bounds
   (:func:`sage_dist.tune.space.validate_search_space`), the model and concept (``validate_inputs``), what the
   mode needs (ASHA needs checkpoints; the objectives need a trained text encoder or the bundled world), the
   tracking store (:func:`sage_dist.tracking.check_tracking_reachable`), the study folder (writable; a
   ``--resume`` target that Tune can restore);
2. the Ray cluster (:mod:`sage_dist.tune.cluster`): join or start, shared storage, trials at once;
3. the MLflow parent run (params, tags; at the end the table, ``trials.json`` and Optuna's Pareto-front and
   parameter-importance plots); trials nest their child runs under it;
4. Tune: :func:`sage_dist.tune.trial.run_trial` per trial, OptunaSearch multi-objective (the result is the
   Pareto front) or single-objective with ASHA early stopping (never ASHA with several objectives: it would
   tell Optuna early-stopped trials as complete), FailureConfig retries, a resume through ``Tuner.restore``
   (finished trials are kept, unfinished ones continue from their last Train checkpoint, the searcher's state
   is restored).

Interruptions: Ray Tune catches a first Ctrl+C (SIGINT) itself, saves its state and returns early; SIGTERM is
handled the same way while the study runs (:func:`sage_dist.tune.interrupts.stop_on_sigterm`). Either way,
and for a second Ctrl+C, the parent run ends KILLED (never FINISHED), the outcome says ``interrupted`` and the
log says how to resume.
A tracking server that fails after the trials ran loses nothing: the table and ``trials.json`` are written to
the study folder first.

Output folder: ``<storage>/<study name>`` (default storage ``$SAGE_DIST_STORAGE``, else ``./runs/studies``); the
Tune experiment, the Train runs (checkpoints) and the erased encoders of all trials live there.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sage_dist.config import StudyConfig
from sage_dist.eval.objective import Objectives, default_objectives
from sage_dist.models.registry import is_world
from sage_dist.tracking import (
    MlflowTracker,
    TrackingTarget,
    check_tracking_reachable,
    ensure_experiment,
    git_sha,
    resolve_tracking,
    ui_instructions,
)
from sage_dist.tracking.mlflow_tracker import child_runs
from sage_dist.train.validate import validate_inputs
from sage_dist.tune.cluster import (
    check_writable,
    cluster_capacity,
    connect_ray,
    require_shared_storage,
    trial_concurrency,
)
from sage_dist.tune.interrupts import stop_on_sigterm, watch_tune_interrupt
from sage_dist.tune.results import (
    TrialRow,
    build_optuna_study,
    format_table,
    mark_pareto,
    optuna_plots,
    rows_from_results,
)
from sage_dist.tune.space import SearchSpaceFn, validate_search_space
from sage_dist.tune.trial import TrialSettings, run_trial, runs_in_process, trial_config, trial_resources

log = logging.getLogger(__name__)

DEFAULT_STORAGE = "runs/studies"
"""Root folder of studies when neither ``--storage`` nor ``$SAGE_DIST_STORAGE`` is set (relative to the working
directory)."""
STUDY_FILE = "sage_study.json"
"""In the study folder: the study's name, mode and number of trials (a resume checks completeness against it)."""


@dataclass(frozen=True, kw_only=True)
class StudyOptions:
    """How a study runs (the command line), separate from what each trial computes (``StudyConfig``)."""
    name: str
    """Study name prefix, e.g. "tune_gamma"; the folder is ``<name>-<model>-<concept>-<timestamp>``."""
    num_samples: int = 12
    """Trials to run (in total, counting those of a resumed study)."""
    mode: Literal["multi", "single"] = "multi"
    """"multi": Optuna multi-objective, Pareto front; "single": maximise ``text_score`` with ASHA."""
    resume: str = ""
    """"" starts a new study; "latest" continues the newest matching study; else a study folder name."""
    storage: str = ""
    """Root folder of studies (made absolute); "" means ``$SAGE_DIST_STORAGE`` if set (the cluster configs set it
    to a folder that outlives a Ray job's temporary working directory), else :data:`DEFAULT_STORAGE`."""
    ray_address: str = ""
    """"" joins a running cluster if there is one, else starts a local instance; "local" always starts one;
    or host:port."""
    max_concurrent: int = 0
    """Trials at once; 0 derives it from the cluster's resources."""
    driver_cpus: float = 0.2
    """CPUs reserved by each trial's own process."""
    max_failures: int = 1
    """Tune retries of a failed trial (worker crashes; deterministic failures are not retried)."""
    seed: int = 0
    """Seed of the Optuna sampler."""
    log_images: bool = True
    """Log an image grid per trial."""
    log_encoder: bool = True
    """Log each trial's erased encoder as an artifact."""

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ValueError(f"--num-samples={self.num_samples}: must be >= 1")
        if self.max_concurrent < 0:
            raise ValueError(f"--max-concurrent={self.max_concurrent}: must be >= 0 (0 = from the cluster)")
        if not 0 < self.driver_cpus <= 1:
            raise ValueError(f"driver_cpus={self.driver_cpus}: allowed (0, 1]; Ray rejects 0")
        if self.max_failures < 0:
            raise ValueError(f"max_failures={self.max_failures}: must be >= 0")
        if self.mode not in ("multi", "single"):
            raise ValueError(f"--mode={self.mode!r}: allowed 'multi' (Pareto front) or 'single' (ASHA)")


@dataclass(frozen=True, kw_only=True)
class SearchPlan:
    """Everything :func:`plan_search` checked and resolved before Ray starts."""
    cfg: StudyConfig
    opts: StudyOptions
    objectives: Objectives
    distributions: dict[str, Any]
    """Optuna distributions of the search space (name -> distribution)."""
    target: TrackingTarget
    study_dir: Path
    resuming: bool


@dataclass
class StudyOutcome:
    """What :func:`run_search` returns."""
    study_dir: Path
    rows: list[TrialRow]
    table: str
    parent_run_id: str
    tracking_uri: str
    wall_time_s: float
    objectives: Objectives
    interrupted: bool = False
    """The study stopped before all its trials ended (Ctrl+C, SIGTERM): resume it with ``resume=study_dir.name``."""
    tracking_error: str = ""
    """Why the study's results could not be logged to MLflow ("" when they were); they are in ``study_dir``."""


# ---- before Ray ----------------------------------------------------------------------------------------
def storage_root(opts: StudyOptions) -> Path:
    """The absolute root folder of studies (:attr:`StudyOptions.storage`)."""
    return Path(opts.storage or os.environ.get("SAGE_DIST_STORAGE", "") or DEFAULT_STORAGE).expanduser().resolve()


def study_prefix(opts: StudyOptions, cfg: StudyConfig) -> str:
    model = Path(cfg.model.model_id).name.replace("/", "_")
    return f"{opts.name}-{model}-{'+'.join(c.replace(' ', '_') for c in cfg.erase.erase_concept)}"


def locate_study(opts: StudyOptions, cfg: StudyConfig) -> tuple[Path, bool]:
    """``(study folder, is_resume)``.

    Raises:
        ValueError: ``--resume`` names nothing that can be restored.
    """
    root = storage_root(opts)
    prefix = study_prefix(opts, cfg)
    if not opts.resume:
        return root / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}", False
    if opts.resume == "latest":
        found = sorted(p for p in root.glob(f"{prefix}-*") if p.is_dir()) if root.is_dir() else []
        if not found:
            raise ValueError(f"--resume: no study {prefix}-* under {root}; start one without --resume")
        path = found[-1]
    else:
        path = root / opts.resume
    from ray.tune import Tuner

    if not Tuner.can_restore(str(path)):
        raise ValueError(f"--resume: {path} is not a restorable Tune experiment (no experiment state); "
                         "start a new study without --resume")
    return path, True


def plan_search(cfg: StudyConfig, search_space: SearchSpaceFn, opts: StudyOptions,
                objectives: Objectives | None = None) -> SearchPlan:
    """Every check of a study that needs no Ray cluster (module docstring, step 1).

    Raises:
        ValueError: a bad search-space bound, model, concept, mode, tracking URI, storage folder or ``--resume``
            target, each naming the field or option and the fix.
        ConnectionError: the MLflow server does not answer.
    """
    objectives = objectives or default_objectives(cfg.model.model_id)
    dists = validate_search_space(search_space, cfg)
    validate_inputs(cfg)
    if opts.mode == "single":
        if not cfg.scaling.checkpoint_every:
            raise ValueError("--mode single uses ASHA, which needs intermediate results: set "
                             "--scaling.checkpoint_every to a few steps (e.g. a quarter of optim.num_steps)")
        if cfg.erase.method == "esd-x":
            raise ValueError("--mode single maximises text_score, which needs a trained text encoder; "
                             "erase.method=esd-x trains the UNet: use --mode multi on the bundled world")
    elif cfg.erase.method == "esd-x" and not is_world(cfg.model.model_id):
        raise ValueError(f"erase.method=esd-x trains the UNet, and the objectives {objectives.metrics} on "
                         f"{cfg.model.model_id!r} are text-space proxies of a trained text encoder: search esd-x on "
                         "the bundled world (image-space objectives) or choose another method")
    target = resolve_tracking(cfg.tracking.tracking_uri)
    check_tracking_reachable(target)
    check_writable(storage_root(opts), "study storage (--storage / $SAGE_DIST_STORAGE)")
    study_dir, resuming = locate_study(opts, cfg)
    return SearchPlan(cfg=cfg, opts=opts, objectives=objectives, distributions=dists, target=target,
                      study_dir=study_dir, resuming=resuming)


# ---- interruptions -------------------------------------------------------------------------------------
def results_complete(rows: list[TrialRow], expected: int, *, mode: str) -> bool:
    """Whether the study's ``rows`` hold ``expected`` trials that all ended. A multi-objective trial ends with
    its final result or an error, so one without either ("stopped") was cut short; with ASHA a stopped trial
    is the scheduler's decision (an interrupt of such a study is seen by
    :func:`sage_dist.tune.interrupts.watch_tune_interrupt`)."""
    if len(rows) < expected:
        return False
    return mode == "single" or all(r.status in ("ok", "failed") for r in rows)


def _saved_study(plan: SearchPlan) -> tuple[int, str]:
    """``(num_samples, mode)`` the study was started with: for a resumed study those of its :data:`STUDY_FILE`
    (Tune restores the original search, whatever this run's options say)."""
    saved = plan.study_dir / STUDY_FILE
    if plan.resuming and saved.is_file():
        meta = json.loads(saved.read_text())
        return int(meta["num_samples"]), str(meta["mode"])
    return plan.opts.num_samples, plan.opts.mode


# ---- the study -----------------------------------------------------------------------------------------
def run_search(cfg: StudyConfig, search_space: SearchSpaceFn, opts: StudyOptions,
               objectives: Objectives | None = None) -> StudyOutcome:
    """Run (or resume) a search study (module docstring); returns its outcome, also when it was interrupted
    by a first Ctrl+C or SIGTERM (``outcome.interrupted``).

    Raises:
        ValueError: bad config, search space, model, concept, options or ``--resume`` target (before Ray starts).
        ConnectionError: the tracking server or the Ray cluster cannot be reached.
        KeyboardInterrupt: a second Ctrl+C (the parent run is then KILLED).
    """
    t0 = time.perf_counter()
    plan = plan_search(cfg, search_space, opts, objectives)
    log.info("study %s (%s), objectives %s", plan.study_dir, "resume" if plan.resuming else "new", plan.objectives)
    where = connect_ray(opts.ray_address)
    capacity, multi_node, can_grow = cluster_capacity()
    require_shared_storage(plan.study_dir, multi_node)
    concurrency = trial_concurrency(cfg, capacity, driver_cpus=opts.driver_cpus, num_samples=opts.num_samples,
                                    max_concurrent=opts.max_concurrent, can_grow=can_grow)
    with stop_on_sigterm():  # after ray.init, which installs its own SIGTERM handler (sys.exit)
        return _run(plan, search_space, t0, where=where, concurrency=concurrency)


def _run(plan: SearchPlan, search_space: SearchSpaceFn, t0: float, *, where: str, concurrency: int) -> StudyOutcome:
    cfg, opts, objectives, target, study_dir = plan.cfg, plan.opts, plan.objectives, plan.target, plan.study_dir
    from ray import tune

    expected, mode = _saved_study(plan)
    if not plan.resuming:
        study_dir.mkdir(parents=True, exist_ok=True)
        (study_dir / STUDY_FILE).write_text(json.dumps({"name": opts.name, "mode": opts.mode,
                                                        "num_samples": opts.num_samples}))

    experiment_id = ensure_experiment(target, cfg.tracking.experiment_name)
    sha = git_sha()
    parent = MlflowTracker.find_or_start(
        target, experiment_id, key=f"study:{study_dir}", run_name=study_dir.name,
        tags={"git_sha": sha, "model": cfg.model.model_id, "concept": ",".join(cfg.erase.erase_concept),
              "seed": cfg.optim.seed, "study_dir": str(study_dir), "sage_dist.kind": "study"})
    try:
        objective_list = ",".join(f"{m}:{d}" for m, d in zip(objectives.metrics, objectives.modes))
        parent.log_params({**cfg.to_flat_dict(), "study.num_samples": opts.num_samples, "study.mode": opts.mode,
                           "study.objectives": objective_list,
                           "study.search_space": "; ".join(f"{k}={v}" for k, v in plan.distributions.items())})
        log.info("%s", ui_instructions(target, cfg.tracking.experiment_name))
        parent.set_tags({"ray": where, "max_concurrent_trials": concurrency})
        log.info("Ray: %s; %d trial(s) at once", where, concurrency)

        tune_metrics = objectives.metrics if opts.mode == "multi" else [objectives.single_metric]
        settings = TrialSettings(study_dir=str(study_dir), tracking_uri=target.tracking_uri,
                                 experiment_id=experiment_id, parent_run_id=parent.run_id, git_sha=sha,
                                 driver_cpus=opts.driver_cpus, tune_metrics=tuple(tune_metrics),
                                 log_images=opts.log_images, log_encoder=opts.log_encoder)
        trainable = tune.with_resources(run_trial, trial_resources(cfg, settings))
        if plan.resuming:
            tuner = tune.Tuner.restore(str(study_dir), trainable=trainable, resume_unfinished=True,
                                       resume_errored=False, restart_errored=False)
        else:
            tuner = build_tuner(cfg, search_space, opts, objectives, settings, trainable, concurrency)
        with watch_tune_interrupt() as watch:
            results = tuner.fit()
        rows = rows_from_results(results, objectives)
        interrupted = watch["interrupted"] or not results_complete(rows, expected, mode=mode)
        ostudy = build_optuna_study(rows, objectives, search_space)
        mark_pareto(rows, ostudy)
        table = format_table(rows, objectives)
        wall = time.perf_counter() - t0
        # the study folder first: a tracking server that is down now must not cost the results
        (study_dir / "pareto_table.md").write_text(table)
        trials_json = json.dumps([dataclasses.asdict(r) for r in rows], indent=1, default=str)
        (study_dir / "trials.json").write_text(trials_json)
        tracking_error = _log_results(parent, target, rows, table, trials_json, ostudy, objectives, wall,
                                      interrupted=interrupted)
    except BaseException as err:
        _close_failed_parent(parent, err)
        if isinstance(err, KeyboardInterrupt):
            log.warning("study interrupted (%s); resume it with --resume %s", type(err).__name__, study_dir.name)
        raise
    outcome = StudyOutcome(study_dir=study_dir, rows=rows, table=table, parent_run_id=parent.run_id,
                           tracking_uri=target.tracking_uri, wall_time_s=wall, objectives=objectives,
                           interrupted=interrupted, tracking_error=tracking_error)
    if interrupted:
        ended = sum(r.status in ("ok", "failed") for r in rows)
        reason = f"interrupted with {ended} of {expected} trials finished or failed"
        _end_parent(parent, "KILLED", reason)
        log.warning("study %s; its state is saved in %s; resume it with --resume %s", reason, study_dir,
                    study_dir.name)
    elif tracking_error:
        _end_parent(parent, "FAILED", f"results not logged ({tracking_error}); they are in {study_dir}")
    else:
        _end_parent(parent, "FINISHED")
    return outcome


def _log_results(parent, target, rows: list[TrialRow], table: str, trials_json: str, ostudy, objectives: Objectives,
                 wall: float, *, interrupted: bool) -> str:
    """The study's results on its parent run and child runs left RUNNING closed; returns "" or, when the
    tracking store fails, the error (logged; the results are in the study folder)."""
    try:
        _close_orphan_children(target, parent.run_id, rows, interrupted=interrupted)
        parent.log_text(table, "pareto_table.md")
        parent.log_text(trials_json, "trials.json")
        for fname, html in optuna_plots(ostudy, objectives).items():
            parent.log_text(html, f"plots/{fname}")
        counts = {s: sum(r.status == s for r in rows) for s in ("ok", "failed", "stopped")}
        parent.log_metrics({"trials_ok": counts["ok"], "trials_failed": counts["failed"],
                            "trials_stopped": counts["stopped"], "pareto_size": sum(r.pareto for r in rows),
                            "study_wall_time_s": wall}, 0)
    except Exception as err:  # noqa: BLE001 - the trials ran; their results must survive a tracking outage
        error = f"{type(err).__name__}: {err}"[:500]
        log.warning("could not log the study's results to MLflow %s (%s); they are in the study folder "
                    "(pareto_table.md, trials.json)", target.tracking_uri, error)
        return error
    return ""


def _end_parent(parent, status: str, reason: str = "") -> None:
    """End the parent run (an interrupt's reason also goes to the ``interrupted`` tag); a tracking error is
    logged, since the outcome is returned either way."""
    try:
        if status == "KILLED":
            parent.set_tags({"interrupted": reason})
        parent.end(status, reason=reason)
    except Exception as err:  # noqa: BLE001 - the outcome is returned either way
        log.warning("could not end the parent MLflow run %s as %s: %s", parent.run_id, status, err)


def _close_failed_parent(parent, err: BaseException) -> None:
    """End the study's parent run after ``err`` so the UI does not show it RUNNING forever: KILLED for an
    interrupt (Ctrl+C, SIGTERM), FAILED for any other error. A resume sets the run back to RUNNING. MLflow
    errors here are only logged, so they never replace ``err``."""
    reason = f"{type(err).__name__}: {err}"[:500]
    try:
        parent.set_tags({"interrupted": reason})
        parent.end("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED", reason=reason)
    except Exception as mlflow_err:  # noqa: BLE001 - the study's own error is the one to raise
        log.warning("could not close the parent MLflow run after %s: %s", reason, mlflow_err)


def build_tuner(cfg: StudyConfig, search_space: SearchSpaceFn, opts: StudyOptions, objectives: Objectives,
                settings: TrialSettings, trainable, concurrency: int):
    """The ``Tuner`` of a new study (module docstring); :func:`plan_search` has checked what each mode needs."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    study_dir = Path(settings.study_dir)
    if opts.mode == "multi":
        searcher = OptunaSearch(space=search_space, metric=objectives.metrics, mode=objectives.modes, seed=opts.seed)
        tune_config = tune.TuneConfig(search_alg=searcher, num_samples=opts.num_samples,
                                      max_concurrent_trials=concurrency, reuse_actors=runs_in_process(cfg, settings))
    else:
        reports = cfg.optim.num_steps // cfg.scaling.checkpoint_every + 1
        searcher = OptunaSearch(space=search_space, metric=objectives.single_metric, mode="max", seed=opts.seed)
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=reports, grace_period=1, reduction_factor=2)
        tune_config = tune.TuneConfig(search_alg=searcher, scheduler=scheduler, metric=objectives.single_metric,
                                      mode="max", num_samples=opts.num_samples, max_concurrent_trials=concurrency,
                                      reuse_actors=runs_in_process(cfg, settings))
    run_config = tune.RunConfig(name=study_dir.name, storage_path=str(study_dir.parent),
                                failure_config=tune.FailureConfig(max_failures=opts.max_failures), verbose=0,
                                callbacks=[ProgressLog()])
    return tune.Tuner(trainable, param_space=trial_config(cfg.to_flat_dict(), settings), tune_config=tune_config,
                      run_config=run_config)


def _progress_callback_class():
    from ray import tune

    class _ProgressLog(tune.Callback):
        """One log line per trial start, end and failure (instead of Tune's full tables)."""

        def on_trial_start(self, iteration, trials, trial, **info):
            params = {k: v for k, v in trial.config.items() if k not in ("study", "trial")}
            log.info("trial %s started: %s", trial.trial_id, _short(params))

        def on_trial_complete(self, iteration, trials, trial, **info):
            metrics = {k: v for k, v in (trial.last_result or {}).items()
                       if k.startswith(("text_", "RER", "KID", "concept_rate", "retention_acc", "time_"))}
            log.info("trial %s finished: %s", trial.trial_id, _short(metrics))

        def on_trial_error(self, iteration, trials, trial, **info):
            log.warning("trial %s failed (see its MLflow run's failure_reason)", trial.trial_id)

    return _ProgressLog


def ProgressLog():  # noqa: N802 - a factory that keeps Ray out of import time
    return _progress_callback_class()()


def _short(values: dict) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())


def _close_orphan_children(target, parent_run_id: str, rows: list[TrialRow], *, interrupted: bool) -> None:
    """Close child runs still RUNNING after the study: their trial process died, could not close its run (a
    tracking outage), or was stopped by an interrupt. Tune's outcome decides: FINISHED for a trial with final
    or (ASHA) intermediate results, KILLED for one an interrupt cut short (also when its process saw that as a
    failure; a resume continues it), else FAILED with the trial's error."""
    by_id = {r.trial_id: r for r in rows}
    for run in child_runs(target.tracking_uri, parent_run_id):
        row = by_id.get(run.data.tags.get("trial_id", ""))
        status = run.info.status
        tracker = MlflowTracker(target.tracking_uri, run.info.run_id)
        if interrupted and row is not None and row.status == "stopped" and status in ("RUNNING", "FAILED"):
            tracker.end("KILLED", "the study was interrupted; --resume continues this trial")
        elif status != "RUNNING":
            continue
        elif row is not None and (row.status == "ok" or (row.status == "stopped" and row.metrics)):
            tracker.end("FINISHED")
        else:
            reason = row.error if row is not None and row.error else ""
            tracker.end("FAILED", reason or "the trial process ended without closing its run (killed or crashed)")
