"""A search study: Ray Tune + Optuna over SAGE's hyper-parameters, each trial a Ray Train erasure, the best
trials re-scored at the full fidelity.

:func:`run_search` runs (or resumes) a study from a built ``StudyConfig``, a define-by-run search space and
:class:`StudyOptions`, and returns a :class:`StudyOutcome`; the command line is :mod:`sage_dist.cli.study`.
In order:

1. :func:`plan_search`, before Ray starts and before anything is written to MLflow: the objectives
   (:func:`sage_dist.eval.objective.parse_objectives`: each must be a metric the trials report), the
   search-space bounds (:func:`sage_dist.tune.space.validate_search_space`), the model and concept
   (``validate_inputs``), what the mode needs (ASHA needs checkpoints and a single score), the re-scoring
   budget, the tracking store (:func:`sage_dist.tracking.check_tracking_reachable`), the study folder
   (writable; a ``--resume`` target that Tune can restore);
2. the Ray cluster (:mod:`sage_dist.tune.cluster`): join or start, shared storage, trials at once;
3. the MLflow parent run (params, tags); trials nest their child runs under it;
4. Tune: :func:`sage_dist.tune.trial.run_trial` per trial, scored at the quick fidelity; OptunaSearch
   multi-objective (the result is the Pareto front) or single-objective with ASHA early stopping on the
   objectives' single score (never ASHA with several objectives: it would tell Optuna early-stopped trials as
   complete), FailureConfig retries, a resume through ``Tuner.restore`` (finished trials are kept, unfinished
   ones continue from their last Train checkpoint, the searcher's state is restored);
5. re-scoring (:mod:`sage_dist.tune.rescore`): the quick front and every trial tied with it
   (:func:`sage_dist.tune.results.rescore_candidates`), at most ``rescore_budget`` of them, evaluated again at
   the full fidelity in parallel Ray tasks on the same cluster; the final front is their Pareto set, with ties
   (:mod:`sage_dist.tune.results`);
6. the results: ``pareto_table.md``, ``front.md``, ``summary.md`` and ``trials.json`` in the study folder
   first, then on the parent run (its description is the summary: front with intervals and ties, search
   space, wall time, overhead share), Optuna's plots (PNG and HTML), the full-fidelity metrics on each
   re-scored child run (``full/<metric>``), and the front's erased encoders registered in the MLflow Model
   Registry as versions of ``sage_dist-<study folder name>``.

Interruptions: Ray Tune catches a first Ctrl+C (SIGINT) itself, saves its state and returns early; SIGTERM is
handled the same way while the study runs (:func:`sage_dist.tune.interrupts.stop_on_sigterm`). Either way,
and for a second Ctrl+C or one during re-scoring, the parent run ends KILLED (never FINISHED), the outcome
says ``interrupted`` and the log says how to resume; a resumed study re-scores only the trials without a
record. A tracking server that fails after the trials ran loses nothing: the tables and ``trials.json`` are
written to the study folder first.

Output folder: ``<storage>/<study name>`` (default storage ``$SAGE_DIST_STORAGE``, else ``./runs/studies``); the
Tune experiment, the Train runs (checkpoints), the erased encoders of all trials (``encoders/<trial id>/``)
and the re-scoring records (``rescore/``) live there.
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
from sage_dist.eval.objective import (
    CHECKPOINT_METRICS,
    SINGLE_SCORES,
    Objectives,
    base_model_hash,
    parse_objectives,
)
from sage_dist.files import ensure_writable_folder
from sage_dist.models.registry import is_world
from sage_dist.presets import WORLD_EVAL_FULL
from sage_dist.tracking import (
    MlflowTracker,
    TrackingTarget,
    check_tracking_reachable,
    ensure_experiment,
    git_sha,
    resolve_tracking,
    ui_instructions,
)
from sage_dist.tracking.mlflow_tracker import (
    ModelVersionSpec,
    child_runs,
    register_versions,
    run_artifact_uri,
)
from sage_dist.train.validate import validate_inputs
from sage_dist.tune.cluster import (
    cluster_capacity,
    connect_ray,
    require_shared_storage,
    trial_concurrency,
)
from sage_dist.tune.interrupts import stop_on_sigterm, watch_tune_interrupt
from sage_dist.tune.rescore import RescoreJob, RescoreOutcome, rescore
from sage_dist.tune.results import (
    TrialRow,
    build_optuna_study,
    format_front,
    format_table,
    interval,
    mark_final_front,
    mark_pareto,
    optuna_figures,
    optuna_plots,
    overhead,
    rescore_candidates,
    rows_from_results,
    spread,
    with_interval,
)
from sage_dist.tune.space import LABELS, SearchSpaceFn, validate_search_space
from sage_dist.tune.trial import (
    TrialSettings,
    run_trial,
    runs_in_process,
    trial_config,
    trial_resources,
    trial_study_config,
)

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
    """"multi": Optuna multi-objective, Pareto front; "single": maximise the objectives' single score
    (``robust_score``, or ``text_score`` for the text proxy) with ASHA."""
    objectives: str = ""
    """``erasure=<metric>,retention=<metric>`` (:func:`sage_dist.eval.objective.parse_objectives`); "" is the
    model's default (robust_erasure vs retention_loss on the bundled world, the text proxy elsewhere)."""
    rescore_budget: int = 0
    """At most this many trials (the quick front first, then those tied with it) are re-scored at the full
    fidelity at the end; 0 turns re-scoring off (the command line's default is
    ``min(sage_dist.cli.study.DEFAULT_RESCORE_BUDGET, num_samples)``). Must not exceed ``num_samples``."""
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
        if self.rescore_budget < 0:
            raise ValueError(f"--rescore-budget={self.rescore_budget}: must be >= 0 (0 turns re-scoring off)")
        if self.rescore_budget > self.num_samples:
            raise ValueError(f"--rescore-budget={self.rescore_budget} is larger than the study's "
                             f"--num-samples={self.num_samples}: at most {self.num_samples} trials can be re-scored; "
                             f"lower it to <= {self.num_samples} (0 turns re-scoring off)")


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
    front_table: str = ""
    """The final front with intervals and ties (:func:`sage_dist.tune.results.format_front`)."""
    rescore_wall_time_s: float = 0.0
    """Seconds of the re-scoring stage (0 when nothing was re-scored)."""
    registered_model: str = ""
    """Name of the registered model holding the front's erased encoders ("" when none was registered)."""
    experiment_id: str = ""
    """The MLflow experiment of the parent run."""


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
        ValueError: bad objectives, search-space bound, model, concept, mode, re-scoring budget, tracking URI,
            storage folder or ``--resume`` target, each naming the field or option and the fix.
        ConnectionError: the MLflow server does not answer.
    """
    objectives = objectives or parse_objectives(opts.objectives, cfg.model.model_id, cfg.erase.method,
                                                 tuple(cfg.erase.erase_concept))
    dists = validate_search_space(search_space, cfg)
    validate_inputs(cfg)
    if opts.mode == "single":
        if not objectives.single_metric:
            pairs = "; ".join(f"erasure={e},retention={r} ({s})" for (e, r), s in SINGLE_SCORES.items())
            raise ValueError(f"--mode single maximises one score, and the objectives {objectives.spec} have none; "
                             f"use --objectives with a pair that has one ({pairs}) or --mode multi")
        if not cfg.scaling.checkpoint_every:
            raise ValueError("--mode single uses ASHA, which needs intermediate results: set "
                             "--scaling.checkpoint_every to a few steps (e.g. a quarter of optim.num_steps)")
        if objectives.single_metric not in CHECKPOINT_METRICS:
            log.warning("--mode single maximises %s, which a trial reports with its final result only (its "
                        "checkpoints report the text proxy), so ASHA ranks trials on it but stops none early; "
                        "--objectives erasure=text_erasure,retention=text_retention_drift promotes at every checkpoint",
                        objectives.single_metric)
    target = resolve_tracking(cfg.tracking.tracking_uri)
    check_tracking_reachable(target)
    ensure_writable_folder(storage_root(opts), "study storage (--storage / $SAGE_DIST_STORAGE)")
    study_dir, resuming = locate_study(opts, cfg)
    saved = study_dir / STUDY_FILE
    if resuming and saved.is_file():
        num_samples = int(json.loads(saved.read_text())["num_samples"])
        if opts.rescore_budget > num_samples:
            raise ValueError(f"--rescore-budget={opts.rescore_budget} is larger than the resumed study {study_dir.name} "
                             f"({num_samples} trials); lower it to <= {num_samples} (0 turns re-scoring off)")
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
                                                        "num_samples": opts.num_samples,
                                                        "objectives": objectives.spec}))

    experiment_id = ensure_experiment(target, cfg.tracking.experiment_name)
    sha = git_sha()
    parent = MlflowTracker.find_or_start(
        target, experiment_id, key=f"study:{study_dir}", run_name=study_dir.name,
        tags={"git_sha": sha, "model": cfg.model.model_id, "concept": ",".join(cfg.erase.erase_concept),
              "seed": cfg.optim.seed, "study_dir": str(study_dir), "sage_dist.kind": "study"})
    try:
        space = search_space_text(plan.distributions)
        parent.log_params({**cfg.to_flat_dict(), "study.num_samples": opts.num_samples, "study.mode": opts.mode,
                           "study.objectives": ",".join(f"{m}:{d}" for m, d in zip(objectives.metrics,
                                                                                     objectives.modes)),
                           "study.rescore_budget": opts.rescore_budget, "study.search_space": space})
        log.info("%s", ui_instructions(target, cfg.tracking.experiment_name, experiment_id, parent.run_id))
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
        mark_pareto(rows, objectives)
        rescored = None
        if not interrupted and opts.rescore_budget:
            rescored = _rescore(plan, rows)
        mark_final_front(rows, objectives)
        fidelity = _front_fidelity(cfg, rescored)
        table = format_table(rows, objectives)
        front_table = format_front(rows, objectives, fidelity=fidelity)
        wall = time.perf_counter() - t0
        rescore_s = rescored.wall_time_s if rescored else 0.0
        summary = study_summary(study_dir.name, rows, objectives, front_table=front_table, space=space,
                                wall=wall, rescore_s=rescore_s, fidelity=fidelity)
        # the study folder first: a tracking server that is down now must not cost the results
        (study_dir / "pareto_table.md").write_text(table)
        (study_dir / "front.md").write_text(front_table)
        (study_dir / "summary.md").write_text(summary)
        trials_json = json.dumps([dataclasses.asdict(r) for r in rows], indent=1, default=str)
        (study_dir / "trials.json").write_text(trials_json)
        ostudy = build_optuna_study(rows, objectives, search_space)
        tracking_error, registered = _log_results(
            plan, parent, rows, {"pareto_table.md": table, "front.md": front_table, "summary.md": summary,
                                 "trials.json": trials_json}, ostudy, wall, sha=sha, interrupted=interrupted,
            rescore_s=rescore_s)
    except BaseException as err:
        _close_failed_parent(parent, err)
        if isinstance(err, KeyboardInterrupt):
            log.warning("study interrupted (%s); resume it with --resume %s", type(err).__name__, study_dir.name)
        raise
    outcome = StudyOutcome(study_dir=study_dir, rows=rows, table=table, parent_run_id=parent.run_id,
                           tracking_uri=target.tracking_uri, wall_time_s=wall, objectives=objectives,
                           interrupted=interrupted, tracking_error=tracking_error, front_table=front_table,
                           rescore_wall_time_s=rescore_s, registered_model=registered, experiment_id=experiment_id)
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


def search_space_text(distributions: dict[str, Any]) -> str:
    """``"γt (retain.retain_loss_weight) log [0.1, 10]; J (attack.attack_steps) int [1, 30]; ..."``."""
    parts = []
    for name, dist in distributions.items():
        label = LABELS.get(name, name)
        if hasattr(dist, "choices"):
            parts.append(f"{label} ({name}) one of {list(dist.choices)}")
            continue
        kind = ("log " if getattr(dist, "log", False) else "") + ("int " if type(dist).__name__.startswith("Int") else "")
        parts.append(f"{label} ({name}) {kind}[{dist.low:g}, {dist.high:g}]")
    return "; ".join(parts)


def _front_fidelity(cfg: StudyConfig, rescored: RescoreOutcome | None) -> str:
    """How the final front was scored (for its heading)."""
    if rescored is None or not rescored.records:
        return "quick fidelity, not re-scored"
    if is_world(cfg.model.model_id):
        return (f"re-scored at the full fidelity: {WORLD_EVAL_FULL.domain_images} concept-domain and "
                f"{WORLD_EVAL_FULL.retain_images} held-out retain images, {WORLD_EVAL_FULL.red_team_prompts} "
                "red-team prompts")
    return "re-scored: text proxy on every retain prompt"


def _rescore(plan: SearchPlan, rows: list[TrialRow]) -> RescoreOutcome:
    """Re-score the candidates of ``rows`` (:func:`sage_dist.tune.results.rescore_candidates`) at the full
    fidelity on the connected cluster; sets each candidate's ``full``, ``rescore`` and lineage."""
    cfg, objectives, study_dir = plan.cfg, plan.objectives, plan.study_dir
    candidates = rescore_candidates(rows, objectives, plan.opts.rescore_budget)
    over = sum(r.rescore == "over budget" for r in rows)
    log.info("re-scoring candidates: %s (%d more over the budget of %d)",
             ", ".join(r.trial_id for r in candidates) or "none", over, plan.opts.rescore_budget)
    jobs = [RescoreJob(trial_id=r.trial_id, edit_dir=str(study_dir / "encoders" / r.trial_id),
                       config=trial_study_config({"study": cfg.to_flat_dict(), **r.params}).to_flat_dict())
            for r in candidates]
    done = rescore(jobs, study_dir, num_cpus=cfg.scaling.cpus_per_worker,
                   num_gpus=1.0 if cfg.scaling.use_gpu else 0.0)
    for r in candidates:
        record = done.records.get(r.trial_id)
        if record is None:
            r.rescore = f"failed: {done.errors.get(r.trial_id, 'no result')}"
            continue
        r.full, r.rescore = dict(record["metrics"]), "done"
        r.extra.update(lineage=record["lineage"], rescore_seconds=record["seconds"],
                       rescore_reused=r.trial_id in done.reused)
    return done


def study_summary(name: str, rows: list[TrialRow], objectives: Objectives, *, front_table: str, space: str,
                  wall: float, rescore_s: float, fidelity: str) -> str:
    """The parent run's description (Markdown): objectives, the final front with intervals and ties, the spread
    of the objectives over the trials against their interval widths, the search space, wall time and the
    trials' overhead share."""
    counts = {s: sum(r.status == s for r in rows) for s in ("ok", "failed", "stopped")}
    lines = [f"### {name}", "",
             f"**Objectives**: {objectives}. Trials are scored at the quick fidelity; the final front is {fidelity}.",
             "", front_table, "", "**Spread over the finished trials (quick fidelity)**", "",
             "| objective | min | max | std | median 95 % half-width |", "|---|---|---|---|---|"]
    for metric, sp in spread(rows, objectives).items():
        lines.append(f"| {metric} | {sp['min']:.3g} | {sp['max']:.3g} | {sp['std']:.3g} | "
                     f"{sp['median_half_width']:.3g} |")
    lines += ["", f"**Search space**: {space}", "",
              f"**Trials**: {counts['ok']} finished, {counts['failed']} failed, {counts['stopped']} stopped. "
              f"**Wall time**: {wall:.0f} s (re-scoring {rescore_s:.0f} s)."]
    cost = overhead(rows)
    if cost:
        lines.append(f"**Overhead share**: {cost['overhead_share']:.0%} of the trials' wall time "
                     f"({cost['overhead_s']:.0f} of {cost['trial_wall_s']:.0f} s summed over "
                     f"{cost['trials_timed']:.0f} trials) is neither erasure ({cost['train_s']:.0f} s) nor "
                     f"evaluation ({cost['eval_s']:.0f} s): worker start-up, loading, logging, Ray.")
    return "\n".join(lines)


def _log_results(plan: SearchPlan, parent, rows: list[TrialRow], texts: dict[str, str], ostudy, wall: float, *,
                 sha: str, interrupted: bool, rescore_s: float) -> tuple[str, str]:
    """The study's results on its parent run (texts, plots, metrics, the summary as its description), the
    re-scored metrics on the child runs, the front's encoders in the Model Registry; child runs left RUNNING
    are closed. Returns ``(error, registered model name)``: error "" or, when the tracking store fails, the
    error (logged; the results are in the study folder)."""
    import matplotlib.pyplot as plt

    target, objectives = plan.target, plan.objectives
    registered = ""
    try:
        runs = _close_orphan_children(target, parent.run_id, rows, interrupted=interrupted)
        for fname, text in texts.items():
            parent.log_text(text, fname)
        parent.set_description(texts["summary.md"])
        for fname, html in optuna_plots(ostudy, objectives).items():
            parent.log_text(html, f"plots/{fname}")
        for fname, figure in optuna_figures(ostudy, objectives).items():
            parent.log_figure(figure, f"plots/{fname}")
            plt.close(figure)
        counts = {s: sum(r.status == s for r in rows) for s in ("ok", "failed", "stopped")}
        metrics = {"trials_ok": counts["ok"], "trials_failed": counts["failed"], "trials_stopped": counts["stopped"],
                   "pareto_size": sum(r.pareto for r in rows), "front_size": sum(r.front for r in rows),
                   "trials_rescored": sum(r.rescore == "done" for r in rows), "study_wall_time_s": wall,
                   "rescore_wall_time_s": rescore_s}
        for metric, sp in spread(rows, objectives).items():
            metrics.update({f"spread/{metric}_{k}": v for k, v in sp.items()})
        metrics.update({f"overhead/{k}": v for k, v in overhead(rows).items()})
        parent.log_metrics(metrics, 0)
        for row in rows:
            if row.full and row.trial_id in runs:
                child = MlflowTracker(target.tracking_uri, runs[row.trial_id])
                child.log_metrics({f"full/{k}": v for k, v in row.full.items()}, 0)
                child.set_tags({"rescored": row.rescore, "front": row.front, "tied_with": ",".join(row.tied_with)})
        if not interrupted:
            registered = _register_front(plan, rows, runs, sha=sha)
    except Exception as err:  # noqa: BLE001 - the trials ran; their results must survive a tracking outage
        error = f"{type(err).__name__}: {err}"[:500]
        log.warning("could not log the study's results to MLflow %s (%s); they are in the study folder "
                    "(pareto_table.md, front.md, summary.md, trials.json)", target.tracking_uri, error)
        return error, registered
    return "", registered


def registered_model_name(study_dir: Path) -> str:
    """``sage_dist-<study folder name>``: the registered model of a study's front."""
    return f"sage_dist-{study_dir.name}"


def _register_front(plan: SearchPlan, rows: list[TrialRow], runs: dict[str, str], *, sha: str) -> str:
    """Register the final front's erased encoders as versions of :func:`registered_model_name` (one per front
    trial, source the child run's ``erased_encoder`` artifact, else the trial's folder), tagged with their
    objectives (value and interval), parameters and lineage: study, trial id, git sha, base-model hash."""
    cfg, objectives, study_dir = plan.cfg, plan.objectives, plan.study_dir
    front = [r for r in rows if r.front]
    if not front:
        return ""
    base = next((r.extra["lineage"]["base_model_hash"] for r in front if "lineage" in r.extra), "")
    base = base or base_model_hash(cfg)
    specs = []
    for r in front:
        metrics = r.full if r.rescore == "done" else r.metrics
        fidelity = "full" if r.rescore == "done" else "quick"
        tags: dict[str, Any] = {"study": study_dir.name, "trial_id": r.trial_id, "git_sha": sha,
                                "base_model_hash": base, "model": cfg.model.model_id,
                                "concept": ",".join(cfg.erase.erase_concept), "fidelity": fidelity,
                                "tied_with": ",".join(r.tied_with) or "-"}
        for m in objectives.metrics:
            low, high = interval(metrics, m)
            tags[m], tags[f"{m}_ci95"] = f"{metrics[m]:.4g}", f"[{low:.4g}, {high:.4g}]"
        tags.update({f"param.{k}": v for k, v in r.params.items()})
        run_id = runs.get(r.trial_id, "")
        source = (run_artifact_uri(run_id, "erased_encoder") if run_id and plan.opts.log_encoder
                  else (study_dir / "encoders" / r.trial_id).as_uri())
        description = (f"Erased encoder of trial {r.trial_id} of study {study_dir.name}: "
                       + ", ".join(f"{m} {with_interval(metrics, m)}" for m in objectives.metrics)
                       + f" ({fidelity} fidelity).")
        specs.append(ModelVersionSpec(source=source, run_id=run_id, key=r.trial_id, tags=tags,
                                      description=description))
    name = registered_model_name(study_dir)
    versions = register_versions(
        plan.target.tracking_uri, name, specs,
        description=f"The final Pareto front of study {study_dir.name} ({objectives}); one version per front trial.",
        tags={"study": study_dir.name, "git_sha": sha, "base_model_hash": base, "model": cfg.model.model_id})
    log.info("registered %d erased encoder(s) of the front as %s versions %s", len(specs), name,
             ", ".join(versions[r.trial_id] for r in front))
    return name


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
                                callbacks=[ProgressLog(objectives.metrics)])
    return tune.Tuner(trainable, param_space=trial_config(cfg.to_flat_dict(), settings), tune_config=tune_config,
                      run_config=run_config)


PROGRESS_METRICS = ("RER_domain", "retention_acc_all", "KID")
"""Shown with the objectives (and their intervals) when a trial ends."""
PROGRESS_TIMERS = ("time_train_s", "time_eval_s", "time_total_s")
"""Seconds shown when a trial ends."""


def _progress_callback_class(metrics: tuple[str, ...] = ()):
    from ray import tune

    class _ProgressLog(tune.Callback):
        """One log line per trial start, end and failure (instead of Tune's full tables)."""

        def on_trial_start(self, iteration, trials, trial, **info):
            params = {k: v for k, v in trial.config.items() if k not in ("study", "trial")}
            log.info("trial %s started: %s", trial.trial_id, _short(params))

        def on_trial_complete(self, iteration, trials, trial, **info):
            result = trial.last_result or {}
            shown = [m for m in (*metrics, *PROGRESS_METRICS) if m in result]
            parts = [f"{m} {with_interval(result, m)}" for m in dict.fromkeys(shown)]
            parts += [f"{k}={result[k]:.0f}" for k in PROGRESS_TIMERS if k in result]
            log.info("trial %s finished: %s", trial.trial_id, ", ".join(parts))

        def on_trial_error(self, iteration, trials, trial, **info):
            log.warning("trial %s failed (see its MLflow run's failure_reason)", trial.trial_id)

    return _ProgressLog


def ProgressLog(metrics: tuple[str, ...] = ()):  # noqa: N802 - a factory that keeps Ray out of import time
    """A Tune callback logging one line per trial start, end (``metrics`` with their intervals first) and failure."""
    return _progress_callback_class(tuple(metrics))()


def _short(values: dict) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())


def _close_orphan_children(target, parent_run_id: str, rows: list[TrialRow], *, interrupted: bool) -> dict[str, str]:
    """Close child runs still RUNNING after the study: their trial process died, could not close its run (a
    tracking outage), or was stopped by an interrupt. Tune's outcome decides: FINISHED for a trial with final
    or (ASHA) intermediate results, KILLED for one an interrupt cut short (also when its process saw that as a
    failure; a resume continues it), else FAILED with the trial's error. Returns ``{trial id: child run id}``."""
    by_id = {r.trial_id: r for r in rows}
    runs: dict[str, str] = {}
    for run in child_runs(target.tracking_uri, parent_run_id):
        runs[run.data.tags.get("trial_id", "")] = run.info.run_id
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
    return runs
