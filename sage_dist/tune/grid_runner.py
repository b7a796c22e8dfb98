"""Run grid studies as Ray Tune experiments, several at once on one Ray cluster (the open-question studies).

Each :class:`~sage_dist.tune.grid.GridStudy` is one Tune experiment: ``tune.grid_search`` over its variants
x ``tune.grid_search`` over its seeds; each trial (:func:`grid_trial`) runs one erasure and its evaluation in
its own process with a fraction of a CPU (``cpus_per_trial``), one torch thread, and logs to a child MLflow
run under the study's parent run in the study's own MLflow experiment (``<experiment_prefix><study name>``).
Several studies are launched concurrently, each ``Tuner.fit()`` inside its own Ray task, so they share the
cluster's CPUs; the driver waits for all of them.

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

from sage_dist.tracking import (
    MlflowTracker,
    NullTracker,
    check_tracking_reachable,
    ensure_experiment,
    git_sha,
    resolve_tracking,
)
from sage_dist.tune.grid import (
    GridStudy,
    Variant,
    execute_trial,
    failed_record,
    write_record,
)
from sage_dist.tune.study import cluster_capacity, connect_ray, require_shared_storage

log = logging.getLogger(__name__)


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
    """Tune function trainable: one (variant, seed) of ``study``; reports the trial record as JSON."""
    import ray.tune
    import torch


    torch.set_num_threads(settings.torch_threads)
    variant, seed = Variant.from_dict(config["variant"]), int(config["seed"])
    tracker = NullTracker()
    if experiment_id:
        tracker = MlflowTracker.start(resolve_tracking(settings.tracking_uri), experiment_id,
                                      run_name=f"{variant.name}-s{seed}", parent_run_id=parent_run_id,
                                      tags={"study": study.name, "variant": variant.name, "seed": seed,
                                            "procedure": variant.procedure, "git_sha": git_sha(),
                                            "trial_id": ray.tune.get_context().get_trial_id()})
    try:
        tracker.log_params(study.variant_config(variant, seed).to_flat_dict())
        record = execute_trial(study, variant, seed, tracker=tracker)
    except BaseException as err:
        tracker.end("FAILED", f"{type(err).__name__}: {err}"[:2000])
        raise
    tracker.end("FINISHED")
    numeric = {k: v for k, v in record["metrics"].items() if isinstance(v, float) and "/" not in k}
    ray.tune.report({**numeric, "record_json": json.dumps(record, default=float)})


def _trial_name(trial) -> str:
    return f"{trial.config['variant']['name']}-s{trial.config['seed']}-{trial.trial_id}"


def _start_parent(study: GridStudy, settings: RunSettings):
    """The study's MLflow experiment and parent run (created by the driver, one study after another: several
    processes creating a fresh SQLite store at once race on its tables)."""
    target = resolve_tracking(settings.tracking_uri)
    experiment_id = ensure_experiment(target, settings.experiment_prefix + study.name)
    parent = MlflowTracker.start(target, experiment_id, run_name=f"{study.name}-{time.strftime('%Y%m%d-%H%M%S')}",
                                 tags={"study": study.name, "git_sha": git_sha(), "sage_dist.kind": "grid_study",
                                       "question": study.question})
    parent.log_params({**study.base.to_flat_dict(), "grid.variants": ",".join(v.name for v in study.variants),
                       "grid.seeds": ",".join(map(str, study.seeds))})
    return experiment_id, parent


def _fit_study(study: GridStudy, settings: RunSettings, experiment_id: str, parent_run_id: str) -> list[dict[str, Any]]:
    """Run one study's Tune experiment (in a Ray task) and return its trial records."""
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
        param_space={"variant": tune.grid_search([v.to_dict() for v in study.variants]),
                     "seed": tune.grid_search(list(study.seeds))},
        tune_config=tune.TuneConfig(reuse_actors=True, trial_name_creator=_trial_name,
                                    trial_dirname_creator=_trial_name),
        run_config=tune.RunConfig(name=f"{study.name}-{time.strftime('%Y%m%d-%H%M%S')}",
                                  storage_path=str(Path(settings.out_dir) / "ray"), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=0)))
    try:
        grid = tuner.fit()
    except BaseException as err:
        parent.end("FAILED", f"{type(err).__name__}: {err}"[:2000])
        raise
    variants = {v.name: v for v in study.variants}
    records = []
    for result in grid:  # (Tune warns that result.json is missing: file loggers are off, metrics come from memory)
        cfg = result.config or {}
        variant = variants[cfg["variant"]["name"]]
        if result.error is not None or not result.metrics or "record_json" not in result.metrics:
            records.append(failed_record(study, variant, int(cfg["seed"]), result.error or RuntimeError("no result")))
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


def launch(studies: list[GridStudy], settings: RunSettings) -> dict[str, list[dict[str, Any]]]:
    """Run ``studies`` concurrently on one Ray cluster (module docstring); writes every trial record under
    ``settings.out_dir`` and returns them per study.

    Raises:
        ValueError: bad settings or tracking URI (before Ray starts).
        ConnectionError: the tracking server or the Ray cluster cannot be reached.
    """
    import ray


    target = resolve_tracking(settings.tracking_uri)
    check_tracking_reachable(target)
    # resolved once here: trials and the per-study Ray tasks may run where $MLFLOW_TRACKING_URI differs
    settings = dataclasses.replace(settings, tracking_uri=target.tracking_uri)
    where = connect_ray(settings.ray_address)
    require_shared_storage(settings.out_dir, cluster_capacity()[1])
    log.info("Ray: %s; %d studies, %s trials", where, len(studies),
             "+".join(str(len(s.variants) * len(s.seeds)) for s in studies))
    fit = ray.remote(num_cpus=0)(_fit_study)
    parents = {s.name: _start_parent(s, settings) for s in studies}
    refs = {s.name: fit.remote(s, settings, parents[s.name][0], parents[s.name][1].run_id) for s in studies}
    by_name = {s.name: s for s in studies}
    out: dict[str, list[dict[str, Any]]] = {}
    pending = dict(refs)
    while pending:
        done, _ = ray.wait(list(pending.values()), num_returns=1)
        name = next(k for k, v in pending.items() if v == done[0])
        del pending[name]
        try:
            out[name] = ray.get(done[0])
        except Exception as err:  # one broken study must not take the others down
            log.error("study %s failed: %s", name, err)
            parents[name][1].end("FAILED", f"{type(err).__name__}: {err}"[:2000])
            study = by_name[name]
            out[name] = [failed_record(study, v, seed, err) for v in study.variants for seed in study.seeds]
        for record in out[name]:
            write_record(settings.out_dir, record)
        log.info("study %s finished: %d/%d trials ok", name, sum(r["status"] == "ok" for r in out[name]),
                 len(out[name]))
    return out
