"""A finished study's results: one row per trial, the Pareto front, the table, Optuna's plots.

The rows come from Tune's ``ResultGrid`` (so a resumed study sees every trial, old and new). The Optuna study
used for the front and the plots is rebuilt from those rows with the study's own define-by-run function, so
it does not depend on the searcher object of one particular driver process.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sage_dist.eval.objective import Objectives
from sage_dist.tune.space import LABELS, SearchSpaceFn, fixed_trial_distributions

log = logging.getLogger(__name__)

TABLE_METRICS = ("RER_domain", "RER_word", "RER_heldout", "retention_acc", "KID", "text_erasure",
                 "text_retention_drift", "text_score")
"""Metrics shown in the table when the trials report them (world metrics first, then the text proxy)."""


@dataclass
class TrialRow:
    """One trial of a study."""

    trial_id: str
    params: dict[str, Any]
    """Searched values (dotted config keys)."""
    metrics: dict[str, float]
    """Final metrics (empty for a failed trial)."""
    status: str
    """"ok", "failed" or "stopped" (ASHA stopped it early)."""
    error: str = ""
    pareto: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def rows_from_results(results, objectives: Objectives) -> list[TrialRow]:
    """Rows of a Tune ``ResultGrid`` (final report has ``trial_finished == 1``; ASHA-stopped trials do not)."""
    rows = []
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
        final = {k: float(v) for k, v in metrics.items() if k in TABLE_METRICS or k in objectives.metrics}
        rows.append(TrialRow(trial_id=str(trial_id), params=params, metrics=final if status != "failed" else {},
                             status=status, error=error))
    rows.sort(key=lambda r: r.trial_id)
    return rows


def _trial_id(result) -> str:
    """The Tune trial id, from the experiment folder name ``run_trial_<id>_<n>_...`` (present also for
    trials that failed before reporting)."""
    match = re.match(r"^[A-Za-z_]*?_([0-9a-f]{5,})_\d+", Path(result.path).name) if result.path else None
    return match.group(1) if match else str((result.metrics or {}).get("trial_id", "?"))


def build_optuna_study(rows: list[TrialRow], objectives: Objectives, search_space: SearchSpaceFn):
    """An in-memory multi-objective Optuna study holding every completed trial (for the front and plots)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    directions = ["maximize" if m == "max" else "minimize" for m in objectives.modes]
    study = optuna.create_study(directions=directions)
    for row in rows:
        if row.status != "ok":
            continue
        values = [row.metrics.get(m) for m in objectives.metrics]
        if any(v is None or not math.isfinite(v) for v in values):
            continue
        dists = fixed_trial_distributions(search_space, row.params)
        study.add_trial(optuna.trial.create_trial(params={k: row.params[k] for k in dists}, distributions=dists,
                                                  values=values, user_attrs={"trial_id": row.trial_id}))
    return study


def mark_pareto(rows: list[TrialRow], study) -> list[TrialRow]:
    """Set ``row.pareto`` for the trials on the study's Pareto front; returns the front's rows."""
    front_ids = {t.user_attrs["trial_id"] for t in study.best_trials} if study.trials else set()
    for row in rows:
        row.pareto = row.trial_id in front_ids
    return [r for r in rows if r.pareto]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.3e}"
    return str(value)


def format_table(rows: list[TrialRow], objectives: Objectives, *, only_pareto: bool = False) -> str:
    """A Markdown table: searched parameters (γt, J, top-k, warm-up, ...), then the metrics the trials report
    (``RER_*``, ``retention_acc``, ``KID`` on the bundled world; ``text_*`` proxies otherwise), status and
    a ``*`` for the Pareto front."""
    shown = [r for r in rows if r.pareto] if only_pareto else rows
    param_keys = sorted({k for r in rows for k in r.params}, key=lambda k: list(LABELS).index(k) if k in LABELS else 99)
    metric_keys = [m for m in TABLE_METRICS if any(m in r.metrics for r in rows)]
    header = ["trial"] + [LABELS.get(k, k) for k in param_keys] + metric_keys + ["status", "pareto"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in shown:
        cells = [r.trial_id] + [_fmt(r.params.get(k, "")) for k in param_keys]
        cells += [_fmt(r.metrics[m]) if m in r.metrics else "" for m in metric_keys]
        cells += [r.status + (f" ({r.error})" if r.error else ""), "*" if r.pareto else ""]
        lines.append("| " + " | ".join(cells) + " |")
    note = (f"\nObjectives: {objectives.erasure_metric} (max), {objectives.retention_metric} "
            f"({objectives.retention_mode}). text_* columns are text-space proxies (1 - cosine of pooled CLIP "
            "features, trained vs original encoder), not RER or KID.")
    return "\n".join(lines) + note


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
            try:
                # Optuna's default evaluator ranks importance for low target values: negate maximised ones.
                sign = -1.0 if objectives.modes[i] == "max" else 1.0
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    fig = vis.plot_param_importances(study, target=lambda t, i=i, sign=sign: sign * t.values[i],
                                                     target_name=name if sign > 0 else f"-{name}")
                out[f"param_importances_{name}.html"] = fig.to_html(include_plotlyjs=True)
            except Exception as err:
                log.warning("parameter-importance plot for %s skipped: %s", name, err)
    return out
