"""Run grid studies as Ray Tune experiments, several at once on one Ray cluster (the open-question studies).

Each :class:`~sage_dist.tune.grid.GridStudy` is one Tune experiment: ``tune.grid_search`` over its cells
(variant, seed) still to run; each trial (:func:`grid_trial`) runs one erasure and its evaluation in its own
process with a fraction of a CPU (``cpus_per_trial``), one torch thread, writes its trial record as soon as it
ends, and logs to a child MLflow run under the study's parent run in the study's own MLflow experiment
(``<experiment_prefix><study name>``). Several studies are launched concurrently, each ``Tuner.fit()`` inside
its own Ray task, so they share the cluster's CPUs; the driver waits for all of them. Each study runs at most
its share of the cluster's trial slots (:func:`study_share`) and, beside other studies, starts a new process per
trial: a Tune experiment that reused its trial processes would keep every slot it took first, and the studies
launched after it would wait until it had run all its trials (its frozen work is on disk, so a fresh process
loses only the pipeline load).

Before Ray starts: the tracking store and the output folder are checked. An interrupt of the driver (Ctrl+C,
SIGTERM) stops every study, marks the parent runs of the unfinished ones KILLED and raises
:class:`~sage_dist.tune.interrupts.StudyInterrupted` (a ``KeyboardInterrupt``); the records of the trials that
ended are kept, and ``resume=True`` runs only the cells without an ``ok`` record, under the same parent runs.

Why no TorchTrainer per trial (the search studies of :mod:`sage_dist.tune` build one): these trials are
single-worker, and starting a Train worker group costs ~30 s on a 2-core machine, more than a short world
erasure. ``run_erasure`` runs directly in the trial process; scale a trial out with the search studies.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sage_dist.files import ensure_writable_folder
from sage_dist.tracking import (
    MlflowTracker,
    NullTracker,
    TrackingTarget,
    check_tracking_reachable,
    ensure_experiment,
    git_sha,
    resolve_tracking,
)
from sage_dist.tracking.mlflow_tracker import child_runs
from sage_dist.tune.from_mlflow import RECORD_ARTIFACT_DIR
from sage_dist.tune.cluster import (
    cluster_capacity,
    connect_ray,
    require_shared_storage,
)
from sage_dist.tune.grid import (
    GridStudy,
    Variant,
    execute_trial,
    failed_record,
    grid_cells,
    pending_cells,
    trial_path,
    write_record,
)
from sage_dist.tune.interrupts import StudyInterrupted, stop_on_sigterm

log = logging.getLogger(__name__)


class _NoResultFileWarning(logging.Filter):
    """Drops Tune's "Failed to fetch metrics" warning of a grid study: the jobs turn Tune's file loggers off
    (``TUNE_DISABLE_AUTO_CALLBACK_LOGGERS``), so no trial has a result.json for Tune to read back, and the
    records come from the results in memory instead; every other message passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Failed to fetch metrics for")


@dataclass(frozen=True, kw_only=True)
class RunSettings:
    """How the studies run (command line), shared by all studies of one launch."""
    out_dir: str
    """Absolute output folder: trial records, Tune experiments (``<out>/ray``)."""
    tracking_uri: str = ""
    """MLflow tracking URI ("" = local SQLite, see :func:`sage_dist.tracking.resolve_tracking`)."""
    experiment_prefix: str = "open_questions."
    """MLflow experiment of a study: prefix + study name."""
    ray_address: str = ""
    """"" joins a running cluster or starts one; "local" always starts one; or host:port."""
    cpus_per_trial: float = 0.5
    """Ray CPUs per trial (fractions let several trials share a small machine)."""
    torch_threads: int = 1
    """torch threads per trial process."""
    def __post_init__(self) -> None:
        if not Path(self.out_dir).is_absolute():
            raise ValueError(f"out_dir={self.out_dir!r} must be absolute (Tune trials change directory)")
        if not 0 < self.cpus_per_trial <= 64:
            raise ValueError(f"--cpus-per-trial={self.cpus_per_trial}: allowed (0, 64]; Ray rejects 0")
        if self.torch_threads < 1:
            raise ValueError(f"torch_threads={self.torch_threads}: must be >= 1")


def grid_trial(config: dict[str, Any], *, study: GridStudy, settings: RunSettings, experiment_id: str,
               parent_run_id: str) -> None:
    """Tune function trainable: one (variant, seed) of ``study``; writes the trial record under
    ``settings.out_dir`` (so it survives an interrupted launch) and reports it as JSON."""
    import ray.tune
    import torch

    torch.set_num_threads(settings.torch_threads)
    variant, seed = Variant.from_dict(config["cell"]["variant"]), int(config["cell"]["seed"])
    tracker = NullTracker()
    if experiment_id:
        tracker = MlflowTracker.start(resolve_tracking(settings.tracking_uri), experiment_id,
                                      run_name=f"{variant.name}-s{seed}", parent_run_id=parent_run_id,
                                      tags={"study": study.name, "variant": variant.name, "seed": seed,
                                            "procedure": variant.procedure, "git_sha": git_sha(),
                                            "trial_id": ray.tune.get_context().get_trial_id()})
    try:
        tracker.log_params(study.variant_config(variant, seed).to_flat_dict())
        record = execute_trial(study, variant, seed, tracker=tracker, out_dir=settings.out_dir)
    except BaseException as err:
        _log_record(tracker, write_record(settings.out_dir, failed_record(study, variant, seed, err)))
        _end_quietly(tracker, "FAILED", f"{type(err).__name__}: {err}"[:2000])
        raise
    path = write_record(settings.out_dir, record)  # the KID inputs go to the record's side file
    _log_record(tracker, path)
    _end_quietly(tracker, "FINISHED")
    numeric = {k: v for k, v in record["metrics"].items() if isinstance(v, float) and "/" not in k}
    ray.tune.report({**numeric, "record_json": path.read_text()})


def _log_record(tracker, path: Path) -> None:
    """The trial record (and its KID side file) as artifacts of the trial's run, under
    :data:`~sage_dist.tune.from_mlflow.RECORD_ARTIFACT_DIR`, so a report can be rebuilt from MLflow alone
    (:mod:`sage_dist.tune.from_mlflow`); a tracking error is logged (the record on disk stands)."""
    record = json.loads(path.read_text())
    files = [path] + ([path.parent / record["features_file"]] if record.get("features_file") else [])
    try:
        for f in files:
            tracker.log_artifact(f, RECORD_ARTIFACT_DIR)
    except Exception as err:  # noqa: BLE001 - the trial's outcome does not depend on its tracking
        log.warning("could not log the trial record %s to MLflow: %s: %s", path, type(err).__name__, err)


def _end_quietly(tracker, status: str, reason: str = "") -> None:
    """Close a run; a tracking error is logged (the trial's record on disk is what the report reads)."""
    try:
        tracker.end(status, reason)
    except Exception as err:  # noqa: BLE001 - the trial's own outcome stands
        log.warning("could not close MLflow run %s as %s: %s: %s", tracker.run_id, status, type(err).__name__, err)


def _kill_runs(parent, reason: str) -> None:
    """End a study's parent run and its child runs still RUNNING (trials an interrupt stopped) as KILLED; a
    tracking error is logged (the driver is exiting on an interrupt)."""
    try:
        for run in child_runs(parent.tracking_uri, parent.run_id, status="RUNNING"):
            MlflowTracker(parent.tracking_uri, run.info.run_id).end("KILLED", reason)
    except Exception as err:  # noqa: BLE001 - the interrupt is what the driver reports
        log.warning("could not close the trial runs of %s: %s: %s", parent.run_id, type(err).__name__, err)
    _end_quietly(parent, "KILLED", reason)


def _trial_name(trial) -> str:
    cell = trial.config["cell"]
    return f"{cell['variant']['name']}-s{cell['seed']}-{trial.trial_id}"


def parent_key(settings: RunSettings, study: GridStudy) -> str:
    """The ``sage_dist.key`` tag of a study's parent run: one per study and output folder, found again by a
    resumed launch."""
    return f"grid:{Path(settings.out_dir) / study.name}"


def _start_parent(study: GridStudy, settings: RunSettings, *, resume: bool):
    """The study's MLflow experiment and parent run (created by the driver, one study after another: several
    processes creating a fresh SQLite store at once race on its tables); ``resume`` reopens the newest parent
    run of this study and output folder."""
    target = resolve_tracking(settings.tracking_uri)
    experiment_id = ensure_experiment(target, settings.experiment_prefix + study.name)
    tags = {"study": study.name, "git_sha": git_sha(), "sage_dist.kind": "grid_study", "question": study.question}
    name = f"{study.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if resume:
        parent = MlflowTracker.find_or_start(target, experiment_id, key=parent_key(settings, study), run_name=name,
                                             tags=tags)
    else:
        parent = MlflowTracker.start(target, experiment_id, run_name=name,
                                     tags={**tags, "sage_dist.key": parent_key(settings, study)})
    parent.log_params({**study.base.to_flat_dict(), "grid.variants": ",".join(v.name for v in study.variants),
                       "grid.seeds": ",".join(map(str, study.seeds))})
    return experiment_id, parent


def study_share(cpus: float, cpus_per_trial: float, studies: int) -> int:
    """Most trials one of ``studies`` concurrent studies runs at once: the cluster's trial slots
    (``cpus / cpus_per_trial``, at least 1) divided among the studies, rounded up so that no slot stays idle
    (a study under its share always has a trial waiting for the next freed slot).

    Raises:
        ValueError: ``studies`` < 1 or ``cpus_per_trial`` <= 0.
    """
    if studies < 1 or cpus_per_trial <= 0:
        raise ValueError(f"study_share(cpus={cpus}, cpus_per_trial={cpus_per_trial}, studies={studies}): need "
                         "at least one study and a positive CPU share per trial")
    slots = max(1, int(cpus / cpus_per_trial + 1e-9))
    return -(-slots // studies)


def _fit_study(study: GridStudy, cells: list[tuple[Variant, int]], settings: RunSettings, experiment_id: str,
               parent_run_id: str, max_concurrent: int = 0, reuse_actors: bool = True) -> list[dict[str, Any]]:
    """Run one study's ``cells`` as a Tune experiment (in a Ray task) and return their trial records; at most
    ``max_concurrent`` trials at once (0: as many as fit), in reused trial processes if ``reuse_actors``."""
    from ray import tune

    t0 = time.time()
    parent = MlflowTracker(_resolved(settings.tracking_uri), parent_run_id)
    # Tune registers a trainable by its function name in a registry shared by the whole Ray job: studies
    # running at once must not share a name, or each would run with another study's parameters.
    def study_trial(config, **kwargs):
        return grid_trial(config, **kwargs)

    study_trial.__name__ = study_trial.__qualname__ = f"grid_trial_{study.name}"
    trainable = tune.with_resources(
        tune.with_parameters(study_trial, study=study, settings=settings, experiment_id=experiment_id,
                             parent_run_id=parent.run_id),
        {"cpu": settings.cpus_per_trial})
    tuner = tune.Tuner(
        trainable,
        param_space={"cell": tune.grid_search([{"variant": v.to_dict(), "seed": seed} for v, seed in cells])},
        tune_config=tune.TuneConfig(reuse_actors=reuse_actors, max_concurrent_trials=max_concurrent or None,
                                    trial_name_creator=_trial_name,
                                    trial_dirname_creator=_trial_name),
        run_config=tune.RunConfig(name=f"{study.name}-{time.strftime('%Y%m%d-%H%M%S')}",
                                  storage_path=str(Path(settings.out_dir) / "ray"), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=0)))
    quiet = _NoResultFileWarning()
    analysis_log = logging.getLogger("ray.tune.analysis.experiment_analysis")
    analysis_log.addFilter(quiet)
    try:
        grid = tuner.fit()
    except BaseException as err:
        parent.end("FAILED", f"{type(err).__name__}: {err}"[:2000])
        raise
    finally:
        analysis_log.removeFilter(quiet)
    variants = {v.name: v for v in study.variants}
    records = []
    for result in grid:
        cell = (result.config or {})["cell"]
        variant = variants[cell["variant"]["name"]]
        if result.error is not None or not result.metrics or "record_json" not in result.metrics:
            records.append(failed_record(study, variant, int(cell["seed"]), result.error or RuntimeError("no result")))
        else:
            record = json.loads(result.metrics["record_json"])
            if record["study"] != study.name:
                raise AssertionError(f"trial of study {study.name} ran study {record['study']}")
            records.append(record)
    ok = sum(r["status"] == "ok" for r in records)
    parent.log_metrics({"trials_ok": ok, "trials_failed": len(records) - ok, "study_wall_time_s": time.time() - t0}, 0)
    parent.end("FINISHED")
    return records


def _resolved(uri: str) -> str:
    return resolve_tracking(uri).tracking_uri


def check_launch(settings: RunSettings) -> TrackingTarget:
    """The checks of a launch that need no Ray cluster: the tracking store answers, the output folder can be
    written.

    Raises:
        ValueError: a bad tracking URI or an unwritable output folder.
        ConnectionError: the MLflow server does not answer.
    """
    target = resolve_tracking(settings.tracking_uri)
    check_tracking_reachable(target)
    ensure_writable_folder(Path(settings.out_dir), "--out")
    return target


def launch(studies: list[GridStudy], settings: RunSettings, *, resume: bool = False) -> dict[str, list[dict[str, Any]]]:
    """Run ``studies`` concurrently on one Ray cluster (module docstring); every trial writes its record under
    ``settings.out_dir``; returns the records of the cells run, per study. ``resume`` runs only the cells
    without an ``ok`` record and reopens the studies' parent runs.

    Raises:
        ValueError: bad settings, tracking URI or output folder (before Ray starts).
        ConnectionError: the tracking server or the Ray cluster cannot be reached.
        StudyInterrupted: Ctrl+C or SIGTERM; the parent runs of the studies that had not finished are KILLED.
    """
    import ray

    target = check_launch(settings)
    # resolved once here: trials and the per-study Ray tasks may run where $MLFLOW_TRACKING_URI differs
    settings = dataclasses.replace(settings, tracking_uri=target.tracking_uri)
    cells = {s.name: pending_cells(s, settings.out_dir) if resume else grid_cells(s) for s in studies}
    todo = [s for s in studies if cells[s.name]]
    for s in studies:
        if not cells[s.name]:
            log.info("study %s: every trial has an ok record in %s; nothing to run", s.name, settings.out_dir)
            if resume:  # the interrupted launch may have finished its last trial: its parent run ends FINISHED
                _end_quietly(_start_parent(s, settings, resume=True)[1], "FINISHED")
    if not todo:
        return {s.name: [] for s in studies}
    where = connect_ray(settings.ray_address)
    require_shared_storage(settings.out_dir, cluster_capacity()[1])
    with stop_on_sigterm():  # after ray.init, which installs its own SIGTERM handler (sys.exit)
        log.info("Ray: %s; %d studies, %s trials", where, len(todo), "+".join(str(len(cells[s.name])) for s in todo))
        fit = ray.remote(num_cpus=0)(_fit_study)
        by_name = {s.name: s for s in todo}
        parents: dict[str, tuple[str, Any]] = {}
        refs: dict[str, Any] = {}
        out: dict[str, list[dict[str, Any]]] = {s.name: [] for s in studies}
        finished: set[str] = set()
        try:
            for s in todo:
                parents[s.name] = _start_parent(s, settings, resume=resume)
            share = study_share(cluster_capacity()[0]["CPU"], settings.cpus_per_trial, len(todo))
            log.info("each study runs at most %d trials at once", share)
            refs = {s.name: fit.remote(s, cells[s.name], settings, parents[s.name][0], parents[s.name][1].run_id,
                                       share, len(todo) == 1)
                    for s in todo}
            pending = dict(refs)
            while pending:
                done, _ = ray.wait(list(pending.values()), num_returns=1)
                name = next(k for k, v in pending.items() if v == done[0])
                del pending[name]
                try:
                    out[name] = ray.get(done[0])
                except Exception as err:  # one broken study must not take the others down
                    log.error("study %s failed: %s", name, err)
                    _end_quietly(parents[name][1], "FAILED", f"{type(err).__name__}: {err}"[:2000])
                    out[name] = [failed_record(by_name[name], v, seed, err) for v, seed in cells[name]]
                for record in out[name]:  # a trial wrote its own record (with its traceback) unless it died
                    if record["status"] == "ok" or not trial_path(settings.out_dir, name, record["variant"],
                                                                  record["seed"]).is_file():
                        write_record(settings.out_dir, record)
                finished.add(name)
                log.info("study %s finished: %d/%d trials ok", name, sum(r["status"] == "ok" for r in out[name]),
                         len(out[name]))
        except KeyboardInterrupt as err:
            for name, ref in refs.items():
                if name not in finished:
                    try:
                        ray.cancel(ref, force=True)
                    except Exception as cancel_err:  # noqa: BLE001 - the driver exits and takes its job along
                        log.warning("could not cancel study %s: %s", name, cancel_err)
            for name, (_, parent) in parents.items():
                if name not in finished:
                    _kill_runs(parent, f"interrupted ({type(err).__name__}); --resume runs the trials without a "
                                       "record")
            if isinstance(err, StudyInterrupted):
                raise
            raise StudyInterrupted(type(err).__name__) from err
    return out
