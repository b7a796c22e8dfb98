"""A finished study's results: one row per trial, the quick and the final Pareto front, ties, tables and plots.

The rows come from Tune's ``ResultGrid`` (so a resumed study sees every trial, old and new). The Optuna study
used for the plots is rebuilt from those rows with the study's own define-by-run function, so it does not
depend on the searcher object of one particular driver process.

Fronts and ties (every objective metric carries a 95 % interval, ``<metric>_ci95_lo`` / ``_hi``):

* the **quick front**: trials that no other trial beats on both objectives at the quick fidelity (point values;
  ``TrialRow.pareto``);
* **tied**: two trials whose 95 % intervals overlap on *both* objectives (:func:`tied`): the evaluation cannot
  tell them apart. Overlap is the conservative reading (two intervals can overlap while a paired test would
  separate them), so a reported tie means "not shown different", never "shown equal";
* **re-scoring candidates** (:func:`rescore_candidates`): the quick front plus every trial tied with a point of
  it, front first, capped by the re-scoring budget;
* the **final front** (:func:`mark_final_front`): the Pareto set of the re-scored trials at the full fidelity
  (``TrialRow.front``), each with the re-scored trials it is tied with (``TrialRow.tied_with``). Without
  re-scoring it is the quick front with quick-fidelity ties.
"""

from __future__ import annotations

import logging
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sage_dist.eval.objective import Objectives
from sage_dist.tune.space import LABELS, SearchSpaceFn, fixed_trial_distributions

log = logging.getLogger(__name__)

TABLE_METRICS = ("robust_erasure", "retention_loss", "RER_domain", "RER_heldout", "retention_acc_all", "KID",
                 "text_erasure", "text_retention_drift", "text_score")
"""Metrics kept in a row and shown in the table when the trials report them (world metrics first, then the
text proxy)."""
TIME_PREFIX = "time_"
"""Timing metrics of a trial (``time_worker_start_s``, ``time_load_s``, ``time_train_s``, ``time_eval_s``,
``time_log_s`` from the worker; ``time_total_s`` from Tune)."""
WORK_TIMERS = ("time_train_s", "time_eval_s")
"""The part of a trial's wall time that is erasure and evaluation; the rest is overhead (start-up, loading,
logging, Ray)."""


@dataclass
class TrialRow:
    """One trial of a study."""

    trial_id: str
    params: dict[str, Any]
    """Searched values (dotted config keys)."""
    metrics: dict[str, float]
    """Final metrics at the quick fidelity, with the objectives' intervals and the timers (empty for a failed
    trial)."""
    status: str
    """"ok", "failed" or "stopped" (ASHA stopped it early, or an interrupt)."""
    error: str = ""
    pareto: bool = False
    """On the quick front."""
    full: dict[str, float] = field(default_factory=dict)
    """Metrics re-scored at the full fidelity (empty when not re-scored)."""
    rescore: str = ""
    """"" (not a candidate), "done", "over budget" or "failed: <reason>"."""
    front: bool = False
    """On the final front (the re-scored front; the quick front when nothing was re-scored)."""
    tied_with: list[str] = field(default_factory=list)
    """Final-front trials this trial is tied with (:func:`tied`)."""
    extra: dict[str, Any] = field(default_factory=dict)


def rows_from_results(results, objectives: Objectives) -> list[TrialRow]:
    """Rows of a Tune ``ResultGrid`` (final report has ``trial_finished == 1``; ASHA-stopped trials do not)."""
    rows = []
    prefixes = tuple(f"{m}_" for m in objectives.metrics)
    for res in results:
        config = res.config or {}
        params = {k: v for k, v in config.items() if k not in ("study", "trial")}
        metrics = res.metrics or {}
        trial_id = _trial_id(res)
        if res.error is not None:
            status, error = "failed", str(res.error).strip().splitlines()[-1][:300]
        elif metrics.get("trial_finished") == 1:
            status, error = "ok", ""
        else:
            status, error = "stopped", ""
        final = {k: float(v) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)
                 and (k in TABLE_METRICS or k in objectives.metrics or k.startswith(prefixes)
                      or k.startswith(TIME_PREFIX) or k == objectives.single_metric)}
        rows.append(TrialRow(trial_id=str(trial_id), params=params, metrics=final if status != "failed" else {},
                             status=status, error=error))
    rows.sort(key=lambda r: r.trial_id)
    return rows


def _trial_id(result) -> str:
    """The Tune trial id, from the experiment folder name ``run_trial_<id>_<n>_...`` (present also for
    trials that failed before reporting)."""
    match = re.match(r"^[A-Za-z_]*?_([0-9a-f]{5,})_\d+", Path(result.path).name) if result.path else None
    return match.group(1) if match else str((result.metrics or {}).get("trial_id", "?"))


# ---- fronts and ties --------------------------------------------------------------------------------------
def objective_values(metrics: dict[str, float], objectives: Objectives) -> list[float] | None:
    """The objectives' values in ``metrics``; None when one is missing or not finite."""
    values = [metrics.get(m) for m in objectives.metrics]
    if any(v is None or not math.isfinite(v) for v in values):
        return None
    return [float(v) for v in values]


def interval(metrics: dict[str, float], name: str) -> tuple[float, float]:
    """The 95 % interval of ``name`` in ``metrics`` (``<name>_ci95_lo`` / ``_hi``); ``(value, value)`` for a
    metric reported without one."""
    value = metrics[name]
    return metrics.get(f"{name}_ci95_lo", value), metrics.get(f"{name}_ci95_hi", value)


def dominates(a: list[float], b: list[float], modes: list[str]) -> bool:
    """``a`` is at least as good as ``b`` on every objective and better on one (``modes``: "max"/"min")."""
    sign = [1.0 if m == "max" else -1.0 for m in modes]
    better_or_equal = all(s * x >= s * y for s, x, y in zip(sign, a, b))
    return better_or_equal and any(s * x > s * y for s, x, y in zip(sign, a, b))


def non_dominated(rows: list[TrialRow], objectives: Objectives, *, full: bool = False) -> list[TrialRow]:
    """The rows no other row dominates, on their quick (``full=False``) or re-scored metrics; rows without
    both objective values are left out."""
    scored = [(r, objective_values(r.full if full else r.metrics, objectives)) for r in rows]
    scored = [(r, v) for r, v in scored if v is not None and (full or r.status == "ok")]
    return [r for r, v in scored if not any(dominates(w, v, objectives.modes) for _, w in scored)]


def tied(a: dict[str, float], b: dict[str, float], objectives: Objectives) -> bool:
    """Whether the 95 % intervals of ``a`` and ``b`` (metrics of two trials at the same fidelity) overlap on
    every objective: the evaluation cannot separate the two trials (module docstring)."""
    for name in objectives.metrics:
        (lo_a, hi_a), (lo_b, hi_b) = interval(a, name), interval(b, name)
        if hi_a < lo_b or hi_b < lo_a:
            return False
    return True


def mark_pareto(rows: list[TrialRow], objectives: Objectives) -> list[TrialRow]:
    """Set ``row.pareto`` for the trials on the quick front; returns the front's rows."""
    front_ids = {r.trial_id for r in non_dominated(rows, objectives)}
    for row in rows:
        row.pareto = row.trial_id in front_ids
    return [r for r in rows if r.pareto]


def rescore_candidates(rows: list[TrialRow], objectives: Objectives, budget: int) -> list[TrialRow]:
    """The trials to re-score at the full fidelity: the quick front (best erasure first), then every other
    finished trial tied with a point of it at the quick fidelity (most ties first), at most ``budget``; the
    candidates beyond the budget get ``rescore = "over budget"``. Call :func:`mark_pareto` first."""
    front = sorted((r for r in rows if r.pareto), key=lambda r: _rank_key(r.metrics, r.trial_id, objectives))
    ties = []
    for r in rows:
        if r.pareto or r.status != "ok" or objective_values(r.metrics, objectives) is None:
            continue
        count = sum(tied(r.metrics, p.metrics, objectives) for p in front)
        if count:
            ties.append((count, r))
    ties.sort(key=lambda cr: (-cr[0], *_rank_key(cr[1].metrics, cr[1].trial_id, objectives)))
    candidates = front + [r for _, r in ties]
    for r in candidates[budget:]:
        r.rescore = "over budget"
    return candidates[:budget]


def _rank_key(metrics: dict[str, float], trial_id: str, objectives: Objectives) -> tuple[float, str]:
    """Best erasure first, then the trial id."""
    value = metrics.get(objectives.erasure_metric, float("nan"))
    return (-value if objectives.erasure_mode == "max" else value), trial_id


def mark_final_front(rows: list[TrialRow], objectives: Objectives) -> list[TrialRow]:
    """Set ``row.front`` and ``row.tied_with`` (module docstring): on the re-scored metrics when any trial was
    re-scored, else on the quick ones. Returns the final front's rows, best erasure first."""
    rescored = [r for r in rows if r.rescore == "done" and objective_values(r.full, objectives) is not None]
    full = bool(rescored)
    pool = rescored if full else [r for r in rows if r.status == "ok"]
    front = non_dominated(pool, objectives, full=full)
    front_ids = {r.trial_id for r in front}
    pool_ids = {r.trial_id for r in pool}
    for row in rows:
        row.front = row.trial_id in front_ids
        mine = row.full if full else row.metrics
        row.tied_with = [] if row.trial_id not in pool_ids or objective_values(mine, objectives) is None else [
            p.trial_id for p in front if p.trial_id != row.trial_id and tied(mine, p.full if full else p.metrics,
                                                                               objectives)]
    return sorted(front, key=lambda r: _rank_key(r.full if full else r.metrics, r.trial_id, objectives))


def spread(rows: list[TrialRow], objectives: Objectives, *, full: bool = False) -> dict[str, dict[str, float]]:
    """Per objective, over the finished trials (quick metrics, or re-scored ones with ``full``): ``min``,
    ``max``, ``std`` (sample standard deviation; 0 for one trial), ``range`` and ``median_half_width`` (the
    typical 95 % interval half-width), plus ``n`` trials. A search whose ``range`` is not above the typical
    interval width cannot rank its trials."""
    out = {}
    for name in objectives.metrics:
        source = [r.full if full else r.metrics for r in rows if (r.full if full else r.status == "ok")]
        values = [m[name] for m in source if name in m and math.isfinite(m[name])]
        if not values:
            continue
        halves = [(interval(m, name)[1] - interval(m, name)[0]) / 2 for m in source if name in m]
        out[name] = {"n": float(len(values)), "min": min(values), "max": max(values),
                     "range": max(values) - min(values),
                     "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                     "median_half_width": statistics.median(halves)}
    return out


def overhead(rows: list[TrialRow]) -> dict[str, float]:
    """Where the finished trials' wall time went (sums over trials, seconds): ``trial_wall_s`` (Tune's
    ``time_total_s``), ``train_s``, ``eval_s``, ``overhead_s`` (the rest: worker start-up, loading, logging,
    Ray) and ``overhead_share`` = overhead / wall; each ``time_*`` timer the trials report is summed as well.
    Empty when no trial reports its timers."""
    timed = [r.metrics for r in rows if r.status == "ok" and "time_total_s" in r.metrics
             and all(t in r.metrics for t in WORK_TIMERS)]
    if not timed:
        return {}
    wall = sum(m["time_total_s"] for m in timed)
    train, evaluation = (sum(m[t] for m in timed) for t in WORK_TIMERS)
    out = {"trials_timed": float(len(timed)), "trial_wall_s": wall, "train_s": train, "eval_s": evaluation,
           "overhead_s": wall - train - evaluation, "overhead_share": (wall - train - evaluation) / wall if wall else 0.0}
    for key in sorted({k for m in timed for k in m if k.startswith(TIME_PREFIX)}):
        out[f"sum_{key}"] = sum(m.get(key, 0.0) for m in timed)
    return out


# ---- tables -----------------------------------------------------------------------------------------------
def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.3e}"
    return str(value)


def with_interval(metrics: dict[str, float], name: str) -> str:
    """"0.812 [0.57, 0.93]": the value and its 95 % interval ("" when ``name`` is missing)."""
    if name not in metrics:
        return ""
    low, high = interval(metrics, name)
    if low == high == metrics[name]:
        return f"{metrics[name]:.3g}"
    return f"{metrics[name]:.3g} [{low:.2g}, {high:.2g}]"


def _param_keys(rows: list[TrialRow]) -> list[str]:
    return sorted({k for r in rows for k in r.params}, key=lambda k: list(LABELS).index(k) if k in LABELS else 99)


def format_table(rows: list[TrialRow], objectives: Objectives, *, only_pareto: bool = False) -> str:
    """A Markdown table of every trial: searched parameters (γt, J, top-k, warm-up, lr ...), the objectives at
    the quick fidelity with their 95 % intervals, the other metrics the trials report, status, ``*`` for the
    quick front, the re-scored objectives and ``*`` for the final front."""
    shown = [r for r in rows if r.pareto] if only_pareto else rows
    param_keys = _param_keys(rows)
    others = [m for m in TABLE_METRICS if m not in objectives.metrics and any(m in r.metrics for r in rows)]
    any_full = any(r.full for r in rows)
    header = (["trial"] + [LABELS.get(k, k) for k in param_keys] + [f"{m} (quick)" for m in objectives.metrics]
              + others + ["status", "quick front"]
              + ([f"{m} (full)" for m in objectives.metrics] + ["re-scored"] if any_full else []) + ["front"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in shown:
        cells = [r.trial_id] + [_fmt(r.params.get(k, "")) for k in param_keys]
        cells += [with_interval(r.metrics, m) for m in objectives.metrics]
        cells += [_fmt(r.metrics[m]) if m in r.metrics else "" for m in others]
        cells += [r.status + (f" ({r.error})" if r.error else ""), "*" if r.pareto else ""]
        if any_full:
            cells += [with_interval(r.full, m) for m in objectives.metrics] + [r.rescore]
        cells += ["*" if r.front else ""]
        lines.append("| " + " | ".join(cells) + " |")
    note = (f"\nObjectives: {objectives}; values with their 95 % intervals. text_* columns are text-space proxies "
            "(1 - cosine of pooled CLIP features, trained vs original encoder), not RER or KID.")
    return "\n".join(lines) + note


def format_front(rows: list[TrialRow], objectives: Objectives, *, fidelity: str) -> str:
    """The final front as Markdown: each point's parameters, objectives with their 95 % intervals at
    ``fidelity`` and the trials it is tied with, then the definition of a tie."""
    front = [r for r in rows if r.front]
    full = any(r.rescore == "done" for r in rows)
    front.sort(key=lambda r: _rank_key(r.full if full else r.metrics, r.trial_id, objectives))
    param_keys = _param_keys(rows)
    header = ["trial"] + [LABELS.get(k, k) for k in param_keys] + list(objectives.metrics) + ["tied with"]
    lines = [f"Final front ({fidelity}; {len(front)} point{'s' if len(front) != 1 else ''}):", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in front:
        metrics = r.full if full else r.metrics
        cells = [r.trial_id] + [_fmt(r.params.get(k, "")) for k in param_keys]
        cells += [with_interval(metrics, m) for m in objectives.metrics]
        cells += [", ".join(r.tied_with) or "-"]
        lines.append("| " + " | ".join(cells) + " |")
    groups = tie_groups(front)
    lines.append("")
    if any(len(g) > 1 for g in groups):
        lines.append("Tied (95 % intervals overlap on both objectives; the evaluation cannot order them): "
                     + "; ".join(" ~ ".join(g) for g in groups if len(g) > 1) + ".")
    else:
        lines.append("No two front points are tied: each pair is separated by its 95 % intervals on at least one "
                     "objective.")
    dominated_ties = [r for r in rows if not r.front and r.tied_with]
    if dominated_ties:
        lines.append("Off the front but tied with a front point: "
                     + "; ".join(f"{r.trial_id} ~ {', '.join(r.tied_with)}" for r in dominated_ties) + ".")
    return "\n".join(lines)


def tie_groups(front: list[TrialRow]) -> list[list[str]]:
    """Front trials grouped by ties (connected components of :attr:`TrialRow.tied_with` among ``front``)."""
    ids = [r.trial_id for r in front]
    links = {r.trial_id: {t for t in r.tied_with if t in ids} for r in front}
    seen: set[str] = set()
    groups = []
    for start in ids:
        if start in seen:
            continue
        group, todo = [], [start]
        while todo:
            node = todo.pop()
            if node in seen:
                continue
            seen.add(node)
            group.append(node)
            todo += [n for n in links[node] | {o for o, ls in links.items() if node in ls} if n not in seen]
        groups.append(sorted(group, key=ids.index))
    return groups


# ---- Optuna's plots ---------------------------------------------------------------------------------------
def build_optuna_study(rows: list[TrialRow], objectives: Objectives, search_space: SearchSpaceFn):
    """An in-memory multi-objective Optuna study holding every completed trial's quick values (for the plots)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    directions = ["maximize" if m == "max" else "minimize" for m in objectives.modes]
    study = optuna.create_study(directions=directions)
    for row in rows:
        values = objective_values(row.metrics, objectives) if row.status == "ok" else None
        if values is None:
            continue
        dists = fixed_trial_distributions(search_space, row.params)
        study.add_trial(optuna.trial.create_trial(params={k: row.params[k] for k in dists}, distributions=dists,
                                                  values=values, user_attrs={"trial_id": row.trial_id}))
    return study


def _importance_target(objectives: Objectives, i: int):
    """Optuna's default evaluator ranks importance for low target values: maximised objectives are negated."""
    sign = -1.0 if objectives.modes[i] == "max" else 1.0
    name = objectives.metrics[i]
    return (lambda t, i=i, sign=sign: sign * t.values[i]), (name if sign > 0 else f"-{name}")


def optuna_plots(study, objectives: Objectives) -> dict[str, str]:
    """Optuna's Pareto-front plot and one parameter-importance plot per objective, as standalone HTML
    (plotly); plots that need more completed trials than there are are skipped with a warning."""
    import warnings

    import optuna.visualization as vis

    out: dict[str, str] = {}
    completed = [t for t in study.trials if t.values is not None]
    if len(completed) < 1:
        return out
    try:
        fig = vis.plot_pareto_front(study, target_names=objectives.metrics)
        out["pareto_front.html"] = fig.to_html(include_plotlyjs=True)
    except Exception as err:  # plotting must never fail a finished study
        log.warning("Pareto-front plot skipped: %s", err)
    if len(completed) >= 2:
        for i, name in enumerate(objectives.metrics):
            target, target_name = _importance_target(objectives, i)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    fig = vis.plot_param_importances(study, target=target, target_name=target_name)
                out[f"param_importances_{name}.html"] = fig.to_html(include_plotlyjs=True)
            except Exception as err:
                log.warning("parameter-importance plot for %s skipped: %s", name, err)
    return out


def optuna_figures(study, objectives: Objectives) -> dict[str, Any]:
    """The same plots with Optuna's matplotlib backend, plus one optimisation-history plot per objective:
    ``{"pareto_front.png": matplotlib Figure, "param_importances_<m>.png": ..., "history_<m>.png": ...}``
    (PNG files the MLflow UI shows inline). Plots that need more trials than there are are skipped with a
    warning; the caller closes the figures (``matplotlib.pyplot.close``)."""
    import warnings

    import matplotlib

    matplotlib.use("Agg", force=False)
    from optuna.exceptions import ExperimentalWarning
    from optuna.visualization import matplotlib as mpl

    out: dict[str, Any] = {}
    completed = [t for t in study.trials if t.values is not None]
    if not completed:
        return out
    plots = [("pareto_front.png", lambda: mpl.plot_pareto_front(study, target_names=objectives.metrics))]
    for i, name in enumerate(objectives.metrics):
        target, target_name = _importance_target(objectives, i)
        plots.append((f"history_{name}.png", lambda i=i, name=name: mpl.plot_optimization_history(
            study, target=lambda t, i=i: t.values[i], target_name=name)))
        if len(completed) >= 2:
            plots.append((f"param_importances_{name}.png", lambda target=target, target_name=target_name:
                          mpl.plot_param_importances(study, target=target, target_name=target_name)))
    for fname, plot in plots:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", (UserWarning, ExperimentalWarning))
                axes = plot()
            figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
            figure.set_size_inches(8, 5.5)
            figure.tight_layout()
            out[fname] = figure
        except Exception as err:  # plotting must never fail a finished study
            log.warning("%s skipped: %s", fname, err)
    return out
