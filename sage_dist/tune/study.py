"""Run a search study: Ray Tune + Optuna over SAGE's hyper-parameters, each trial a Ray Train erasure.

A study file (``studies/*.py``) supplies ``config()`` and ``search_space(trial)`` and calls
:func:`run_study`, which owns everything else:

* command line (:func:`build_parser`): ``--model``, ``--concept``, ``--num-samples``, ``--mode``, ``--tracking-uri``,
  ``--resume``, ``--smoke-test``, ``--ray-address``, ``--storage``, plus dotted config overrides such as
  ``--optim.num_steps=60``;
* checks before anything starts: the config, the search-space bounds (:func:`validate_search_space`), the
  model and concept (``validate_inputs``), the tracking store (:func:`check_tracking_reachable`);
* Ray: joins a running cluster (``RAY_ADDRESS`` or a local ``ray start``/``ray up`` cluster) so several studies
  can share it, else starts a local instance; trial concurrency from the cluster's CPUs/GPUs;
* Tune: :func:`sage_dist.tune.trial.run_trial` per trial, OptunaSearch multi-objective (the result is the
  Pareto front) or single-objective with ASHA early stopping (never ASHA with several objectives: it would
  tell Optuna early-stopped trials as complete), FailureConfig retries, ``--resume`` via ``Tuner.restore``
  (finished trials are kept, unfinished ones continue from their last Train checkpoint, the searcher's state
  is restored);
* MLflow: the parent run (params, tags, the table, Optuna's Pareto-front and parameter-importance plots);
  trials nest their child runs under it.

Output folder: ``<storage>/<study name>`` (default storage ``$SAGE_DIST_STORAGE``, else ``./runs/studies``); the Tune experiment, the Train
runs (checkpoints) and the erased encoders of all trials live there.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

from sage_dist.config import StudyConfig
from sage_dist.eval.objective import Objectives, default_objectives
from sage_dist.tracking import (
    MlflowTracker,
    check_tracking_reachable,
    ensure_experiment,
    git_sha,
    resolve_tracking,
    ui_instructions,
)
from sage_dist.tracking.mlflow_tracker import child_runs
from sage_dist.train.validate import validate_inputs
from sage_dist.tune.results import (
    TrialRow,
    build_optuna_study,
    format_table,
    mark_pareto,
    optuna_plots,
    rows_from_results,
)
from sage_dist.tune.space import SearchSpaceFn, validate_search_space
from sage_dist.tune.trial import TrialSettings, run_trial, trial_config

log = logging.getLogger(__name__)

JOB_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false", "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
           "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_METRICS_ENABLED": "0", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
           "DIFFUSERS_VERBOSITY": "error", "TRANSFORMERS_VERBOSITY": "error"}
"""Environment of every Ray process of a study: no OpenMP spin-waiting (it slows shared CPUs 3-7x); no
per-trial preemption-watcher actor and Train metrics (each costs process start-up on small machines)."""


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
    to a folder that outlives a Ray job's temporary working directory), else ``runs/studies``."""
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


@dataclass
class StudyOutcome:
    """What :func:`run_study` returns."""
    study_dir: Path
    rows: list[TrialRow]
    table: str
    parent_run_id: str
    tracking_uri: str
    wall_time_s: float
    objectives: Objectives


# ---- command line ---------------------------------------------------------------------------------------
def build_parser(description: str, *, default_samples: int) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Any --section.field=value is a config override, e.g. --optim.num_steps=60.")
    p.add_argument("--smoke-test", action="store_true", help="2 trials with the study's smoke budget (minutes)")
    p.add_argument("--model", default=None, help="world (default), world-xl, tiny-sd, a Hub id or a local folder")
    p.add_argument("--concept", default=None, help="concept(s) to erase, comma-separated (default: the study's)")
    p.add_argument("--num-samples", type=int, default=default_samples, help="number of trials")
    p.add_argument("--mode", choices=("multi", "single"), default="multi",
                   help="multi: Pareto front of erasure vs retention; single: text_score with ASHA early stopping")
    p.add_argument("--tracking-uri", default="", help="MLflow server (http://HOST:PORT) or sqlite:////abs.db; "
                   "default: $MLFLOW_TRACKING_URI, else sqlite under ~/.sage_dist/mlflow")
    p.add_argument("--resume", nargs="?", const="latest", default="",
                   help="continue a killed study: the newest matching one, or the folder name given")
    p.add_argument("--storage", default="", help="root folder of study outputs (default: $SAGE_DIST_STORAGE "
                   "or runs/studies)")
    p.add_argument("--ray-address", default="", help="'' joins a running cluster else starts one; 'local'; host:port")
    p.add_argument("--max-concurrent", type=int, default=0, help="trials at once (0: from cluster resources)")
    p.add_argument("--seed", type=int, default=0, help="Optuna sampler seed")
    p.add_argument("--no-images", action="store_true", help="skip the per-trial image grid")
    p.add_argument("--no-encoder-artifacts", action="store_true", help="do not upload erased encoders to MLflow")
    return p


# ---- Ray ------------------------------------------------------------------------------------------------
def connect_ray(address: str, *, num_cpus: int | None = None) -> str:
    """Join a cluster or start a local Ray instance (module docstring); returns a description."""
    import ray

    if ray.is_initialized():
        return "already initialised"
    runtime_env = {"env_vars": JOB_ENV}
    if address in ("", "auto"):
        try:
            ray.init(address="auto", runtime_env=runtime_env, logging_level=logging.WARNING)
            return f"joined running cluster {ray.get_runtime_context().gcs_address}"
        except ConnectionError:
            address = "local"
        except Exception as err:
            raise ConnectionError(f"a Ray cluster is running but joining it failed ({err}); if it uses token "
                                  "authentication export RAY_AUTH_MODE=token, or pass --ray-address local") from err
    if address == "local":
        for attempt in range(3):  # Ray waits a fixed 30 s for its raylet, too short on an overloaded machine
            try:
                # a local instance listens on loopback only (it serves no other machine)
                ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
                         runtime_env=runtime_env, logging_level=logging.WARNING, _node_ip_address="127.0.0.1")
                break
            except Exception as err:
                if "timed out during startup" not in str(err) or attempt == 2:
                    raise
                log.warning("Ray start-up timed out (machine busy); retrying")
                ray.shutdown()
        return f"started local Ray ({ray.cluster_resources().get('CPU', 0):g} CPUs)"
    ray.init(address=address, runtime_env=runtime_env, logging_level=logging.WARNING)
    return f"joined cluster {address}"


NETWORK_FILESYSTEMS = ("nfs", "nfs4", "efs", "cifs", "smb3", "lustre", "gpfs", "ceph", "glusterfs", "beegfs",
                       "fuse.s3fs", "fuse.juicefs", "fuse.gcsfuse", "fuse.mountpoint-s3")
"""Filesystem types (``/proc/mounts``) every node of a cluster can share."""


PLANNED_RESOURCES = ("CPU", "GPU")
"""Resources trial concurrency is planned on (memory figures differ between Ray's config and its measurement)."""


def cluster_capacity() -> tuple[dict[str, float], bool, bool]:
    """What the connected Ray cluster has now or can autoscale to, and whether it spans (or may span) nodes.

    Returns:
        ``(resources, multi_node, can_grow)``: CPU and GPU, each the larger of ``ray.cluster_resources()`` and the
        autoscaler's maximum (Ray's cluster config, the figure Ray Train itself checks; absent on a plain local
        instance; an unbounded node group leaves the current figure); ``multi_node`` is True when more than one
        node is alive or the autoscaler can add CPUs or GPUs (``can_grow``).
    """
    import sys

    import ray

    now = {k: float(ray.cluster_resources().get(k, 0.0)) for k in PLANNED_RESOURCES}
    alive = sum(1 for node in ray.nodes() if node.get("Alive"))
    try:
        from ray._private import state as ray_state

        most = ray_state.state.get_max_resources_from_cluster_config() or {}
    except Exception as err:  # private API (Ray Train uses it); without it, plan on what the cluster has now
        log.debug("no autoscaler capacity (%s)", err)
        most = {}
    capacity, can_grow = dict(now), False
    for k in PLANNED_RESOURCES:
        limit = float(most.get(k, 0))
        if limit > now[k]:
            can_grow = True
            if limit < sys.maxsize:
                capacity[k] = limit
    return capacity, alive > 1 or can_grow, can_grow


def filesystem_type(path: str | Path, mounts: str | None = None) -> str:
    """The type (``/proc/mounts`` third field, e.g. "ext4", "nfs4") of the filesystem holding ``path``;
    "" when it cannot be told (no ``/proc/mounts``)."""
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return ""
    target = str(Path(path).expanduser().resolve())
    best, kind = "", ""
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fields[2]
    return kind


def require_shared_storage(path: str | Path, multi_node: bool, mounts: str | None = None) -> None:
    """Fail before any trial starts when a multi-node cluster would checkpoint to a node-local folder (Ray Train
    and Tune need storage every node reaches: NFS/EFS or cloud storage; Ray raises mid-run otherwise).

    Raises:
        ValueError: ``multi_node`` and ``path`` is on a local filesystem (override: ``SAGE_DIST_STORAGE_SHARED=1``
            for a shared filesystem whose type is not in :data:`NETWORK_FILESYSTEMS`).
    """
    if not multi_node or os.environ.get("SAGE_DIST_STORAGE_SHARED") == "1":
        return
    kind = filesystem_type(path, mounts)
    if kind and kind not in NETWORK_FILESYSTEMS:
        raise ValueError(
            f"study storage {path} is on a node-local filesystem ({kind}) but the Ray cluster spans or may grow to "
            "several nodes, whose Train workers must write checkpoints to the same place: pass --storage on a "
            "shared mount (cluster.yaml mounts EFS at /mnt/sage_dist and sets SAGE_DIST_STORAGE there), or set "
            "SAGE_DIST_STORAGE_SHARED=1 if this filesystem is shared after all")


def trial_concurrency(cfg: StudyConfig, opts: StudyOptions, resources: dict[str, float], *,
                      can_grow: bool = False) -> int:
    """Trials that fit at once: CPUs / (driver + workers x CPUs per worker), and GPUs / workers when used;
    ``resources`` from :func:`cluster_capacity`. With ``can_grow`` (an autoscaler with unbounded node groups)
    a trial that does not fit yet runs alone while nodes are added.

    Raises:
        ValueError: one trial needs more than the whole cluster has and the cluster cannot grow.
    """
    s = cfg.scaling
    per_trial_cpu = opts.driver_cpus + s.num_workers * s.cpus_per_worker
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    n = math.floor(cpus / per_trial_cpu + 1e-9)
    if s.use_gpu:
        n = min(n, math.floor(gpus / s.num_workers + 1e-9))
    if n < 1 and can_grow:
        log.warning("one trial needs %g CPUs%s, more than the cluster has now; running 1 trial at a time while the "
                    "autoscaler adds nodes", per_trial_cpu, f" and {s.num_workers} GPUs" if s.use_gpu else "")
        n = 1
    if n < 1:
        raise ValueError(f"one trial needs {per_trial_cpu:g} CPUs{f' and {s.num_workers} GPUs' if s.use_gpu else ''} "
                         f"but the cluster has {cpus:g} CPUs and {gpus:g} GPUs; lower scaling.num_workers or "
                         "scaling.cpus_per_worker")
    if opts.max_concurrent:
        n = min(n, opts.max_concurrent)
    return max(1, min(n, opts.num_samples))


# ---- study folder ---------------------------------------------------------------------------------------
def study_prefix(opts: StudyOptions, cfg: StudyConfig) -> str:
    model = Path(cfg.model.model_id).name.replace("/", "_")
    return f"{opts.name}-{model}-{'+'.join(c.replace(' ', '_') for c in cfg.erase.erase_concept)}"


def locate_study(opts: StudyOptions, cfg: StudyConfig) -> tuple[Path, bool]:
    """``(study folder, is_resume)``.

    Raises:
        ValueError: ``--resume`` names nothing that can be restored.
    """
    root = Path(opts.storage or os.environ.get("SAGE_DIST_STORAGE", "") or "runs/studies").expanduser().resolve()
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


# ---- the study ------------------------------------------------------------------------------------------
def run_study(config: Callable[[], StudyConfig], search_space: SearchSpaceFn, argv: list[str] | None = None, *,
              name: str, default_samples: int = 12, description: str = "",
              smoke: Callable[[StudyConfig], StudyConfig] | None = None, smoke_samples: int = 2) -> StudyOutcome:
    """Parse ``argv`` and run the study (module docstring). ``smoke`` shrinks the config for ``--smoke-test``."""
    args, rest = build_parser(description or name, default_samples=default_samples).parse_known_args(argv)
    if not logging.getLogger().handlers:  # the study is the entry point: it configures logging
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = config()
    if args.model:
        cfg = cfg.replace_flat({"model.model_id": args.model})
    if args.concept:
        cfg = cfg.replace_flat({"erase.erase_concept": tuple(c.strip() for c in args.concept.split(",") if c.strip())})
    if rest:
        cfg = cfg.override(rest)
    if args.tracking_uri:
        cfg = cfg.replace_flat({"tracking.tracking_uri": args.tracking_uri})
    num_samples = args.num_samples
    if args.smoke_test:
        cfg = smoke(cfg) if smoke is not None else cfg
        num_samples = min(num_samples, smoke_samples)
    opts = StudyOptions(name=name, num_samples=num_samples, mode=args.mode, resume=args.resume,
                        storage=args.storage, ray_address=args.ray_address, max_concurrent=args.max_concurrent,
                        seed=args.seed, log_images=not args.no_images, log_encoder=not args.no_encoder_artifacts)
    outcome = execute(cfg, search_space, opts)
    print(f"\n{outcome.table}\n")
    print(f"study folder: {outcome.study_dir}")
    print(f"wall time: {outcome.wall_time_s:.0f} s for {len(outcome.rows)} trials")

    print(ui_instructions(resolve_tracking(cfg.tracking.tracking_uri), cfg.tracking.experiment_name))
    return outcome


def execute(cfg: StudyConfig, search_space: SearchSpaceFn, opts: StudyOptions,
            objectives: Objectives | None = None) -> StudyOutcome:
    """Run (or resume) the study with an already built config; returns its outcome. See module docstring.

    Raises:
        ValueError: bad config, search space, model, concept or ``--resume`` target (before Ray starts).
        ConnectionError: the tracking server or the Ray cluster cannot be reached.
    """
    t0 = time.perf_counter()
    # Intermediate reports carry losses and the text proxy; image-space objectives (RER, FID) arrive only with
    # a trial's final report, which is the one Optuna is told. Tune's strict check would reject the former.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"

    objectives = objectives or default_objectives(cfg.model.model_id)
    dists = validate_search_space(search_space, cfg)
    validate_inputs(cfg)
    target = resolve_tracking(cfg.tracking.tracking_uri)
    check_tracking_reachable(target)
    study_dir, resuming = locate_study(opts, cfg)
    log.info("study %s (%s), objectives %s", study_dir, "resume" if resuming else "new", objectives)
    from ray import tune

    where = connect_ray(opts.ray_address)
    capacity, multi_node, can_grow = cluster_capacity()
    require_shared_storage(study_dir, multi_node)
    concurrency = trial_concurrency(cfg, opts, capacity, can_grow=can_grow)

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
                           "study.search_space": "; ".join(f"{k}={v}" for k, v in dists.items())})
        print(ui_instructions(target, cfg.tracking.experiment_name))
        parent.set_tags({"ray": where, "max_concurrent_trials": concurrency})
        log.info("Ray: %s; %d trial(s) at once", where, concurrency)

        settings = TrialSettings(study_dir=str(study_dir), tracking_uri=target.tracking_uri,
                                 experiment_id=experiment_id, parent_run_id=parent.run_id, git_sha=sha,
                                 driver_cpus=opts.driver_cpus, log_images=opts.log_images,
                                 log_encoder=opts.log_encoder)
        trainable = tune.with_resources(run_trial, {"cpu": opts.driver_cpus})
        if resuming:
            tuner = tune.Tuner.restore(str(study_dir), trainable=trainable, resume_unfinished=True,
                                       resume_errored=False, restart_errored=False)
        else:
            tuner = build_tuner(cfg, search_space, opts, objectives, settings, trainable, concurrency)
        results = tuner.fit()

        rows = rows_from_results(results, objectives)
        _close_orphan_children(target, parent.run_id)
        ostudy = build_optuna_study(rows, objectives, search_space)
        mark_pareto(rows, ostudy)
        table = format_table(rows, objectives)
        wall = time.perf_counter() - t0
        parent.log_text(table, "pareto_table.md")
        parent.log_text(json.dumps([dataclasses.asdict(r) for r in rows], indent=1, default=str), "trials.json")
        for fname, html in optuna_plots(ostudy, objectives).items():
            parent.log_text(html, f"plots/{fname}")
        counts = {s: sum(r.status == s for r in rows) for s in ("ok", "failed", "stopped")}
        parent.log_metrics({"trials_ok": counts["ok"], "trials_failed": counts["failed"],
                            "trials_stopped": counts["stopped"], "pareto_size": sum(r.pareto for r in rows),
                            "study_wall_time_s": wall}, 0)
    except BaseException as err:
        _close_failed_parent(parent, err)
        raise
    parent.end("FINISHED")
    (study_dir / "pareto_table.md").write_text(table)
    return StudyOutcome(study_dir=study_dir, rows=rows, table=table, parent_run_id=parent.run_id,
                        tracking_uri=target.tracking_uri, wall_time_s=wall, objectives=objectives)


def _close_failed_parent(parent, err: BaseException) -> None:
    """End the study's parent run after ``err`` so the UI does not show it RUNNING forever: KILLED for an
    interrupt that reached the driver (Ray Tune handles a first Ctrl+C itself and returns its partial results,
    which end FINISHED), FAILED for any other error. A resume sets the run back to RUNNING. MLflow errors here
    are only logged, so they never replace ``err``."""
    reason = f"{type(err).__name__}: {err}"[:500]
    try:
        parent.set_tags({"interrupted": reason})
        parent.end("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED", reason=reason)
    except Exception as mlflow_err:  # noqa: BLE001 - the study's own error is the one to raise
        log.warning("could not close the parent MLflow run after %s: %s", reason, mlflow_err)


def build_tuner(cfg: StudyConfig, search_space: SearchSpaceFn, opts: StudyOptions, objectives: Objectives,
                settings: TrialSettings, trainable, concurrency: int):
    """The ``Tuner`` of a new study (module docstring)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    study_dir = Path(settings.study_dir)
    if opts.mode == "multi":
        searcher = OptunaSearch(space=search_space, metric=objectives.metrics, mode=objectives.modes, seed=opts.seed)
        tune_config = tune.TuneConfig(search_alg=searcher, num_samples=opts.num_samples,
                                      max_concurrent_trials=concurrency, reuse_actors=False)
    else:
        every = cfg.scaling.checkpoint_every
        if not every:
            raise ValueError("--mode single uses ASHA, which needs intermediate results: set "
                             "--scaling.checkpoint_every to a few steps (e.g. a quarter of optim.num_steps)")
        reports = cfg.optim.num_steps // every + 1
        searcher = OptunaSearch(space=search_space, metric=objectives.single_metric, mode="max", seed=opts.seed)
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=reports, grace_period=1, reduction_factor=2)
        tune_config = tune.TuneConfig(search_alg=searcher, scheduler=scheduler, metric=objectives.single_metric,
                                      mode="max", num_samples=opts.num_samples, max_concurrent_trials=concurrency,
                                      reuse_actors=False)
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
                       if k.startswith(("text_", "RER", "FID", "retention_acc", "time_"))}
            log.info("trial %s finished: %s", trial.trial_id, _short(metrics))

        def on_trial_error(self, iteration, trials, trial, **info):
            log.warning("trial %s failed (see its MLflow run's failure_reason)", trial.trial_id)

    return _ProgressLog


def ProgressLog():  # noqa: N802 - a factory that keeps Ray out of import time
    return _progress_callback_class()()


def _short(values: dict) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())


def _close_orphan_children(target, parent_run_id: str) -> None:
    """Mark child runs still RUNNING after the study (their trial process died) as FAILED."""
    for run in child_runs(target.tracking_uri, parent_run_id, status="RUNNING"):
        MlflowTracker(target.tracking_uri, run.info.run_id).end(
            "FAILED", "the trial process ended without closing its run (killed or crashed)")
