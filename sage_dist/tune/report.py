"""Markdown report of grid studies: per study a table (mean ± std over seeds), plots, and findings in numbers.

Works on trial records alone (``grid.read_records`` or hand-made dicts with ``variant``, ``seed``, ``status``,
``metrics``, ``curves``), so a report can be rewritten from a finished run without Ray::

    python studies/open_questions.py --report-only --out runs/open_questions
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from sage_dist.tune.grid import GridStudy

log = logging.getLogger(__name__)

LOWER_IS_BETTER = ("FID", "KID", "ASR", "concept_rate", "drop", "drift")
"""Metric-name fragments whose smaller values are better (also names ending in "_s", durations; everything
else: larger is better)."""
NEUTRAL = ("interference",)
"""Metric-name fragments with no better direction (findings name the highest and lowest)."""


def lower_is_better(metric: str) -> bool:
    return any(frag in metric for frag in LOWER_IS_BETTER) or metric.endswith(("_s", "_per_step"))


def aggregate(records: list[dict[str, Any]], metric: str) -> dict[str, tuple[float, float, int]]:
    """``{variant: (mean, std, n)}`` of ``metric`` over the ``ok`` records with a finite value (std: sample
    standard deviation, ddof=1; 0 for a single seed)."""
    values: dict[str, list[float]] = {}
    for r in records:
        v = r.get("metrics", {}).get(metric)
        if r.get("status") == "ok" and isinstance(v, (int, float)) and math.isfinite(v):
            values.setdefault(r["variant"], []).append(float(v))
    return {k: (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, len(v)) for k, v in values.items()}


def fmt(mean: float, std: float, n: int) -> str:
    return f"{mean:.3g} ± {std:.2g}" if n > 1 else f"{mean:.3g}"


def study_table(study: GridStudy, records: list[dict[str, Any]]) -> str:
    """Markdown table: one row per variant (study order), one column per ``study.metrics`` (mean ± std), the
    number of finished seeds and of failed ones."""
    stats = {m: aggregate(records, m) for m in study.metrics}
    head = "| variant | seeds ok | failed | " + " | ".join(study.metrics) + " |"
    lines = [head, "|" + "---|" * (3 + len(study.metrics))]
    for v in study.variants:
        mine = [r for r in records if r["variant"] == v.name]
        ok = sum(r["status"] == "ok" for r in mine)
        cells = [fmt(*stats[m][v.name]) if v.name in stats[m] else "n/a" for m in study.metrics]
        lines.append(f"| {v.name} | {ok} | {len(mine) - ok} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def findings(study: GridStudy, records: list[dict[str, Any]]) -> list[str]:
    """One line per table metric: best and worst variant with mean ± std (direction from the metric name)."""
    out = []
    for m in study.metrics:
        stats = aggregate(records, m)
        if len(stats) < 2:
            continue
        order = sorted(stats, key=lambda k: stats[k][0], reverse=not lower_is_better(m))
        best, worst = order[0], order[-1]
        if stats[best][0] == stats[worst][0]:
            out.append(f"- **{m}**: the same for every variant ({fmt(*stats[best])}).")
            continue
        if any(frag in m for frag in NEUTRAL):
            hi, lo = (best, worst) if stats[best][0] > stats[worst][0] else (worst, best)
            out.append(f"- **{m}**: highest `{hi}` {fmt(*stats[hi])}, lowest `{lo}` {fmt(*stats[lo])}.")
            continue
        out.append(f"- **{m}** ({'lower' if lower_is_better(m) else 'higher'} is better): best `{best}` "
                   f"{fmt(*stats[best])}, worst `{worst}` {fmt(*stats[worst])}.")
    return out


def plot_study(study: GridStudy, records: list[dict[str, Any]], plot_dir: str | Path) -> list[Path]:
    """PNG plots: each ``plot_metrics`` entry against the variants (lines per group over ``x`` with ±std error
    bars when every variant has an ``x``, else bars), and each ``curve_metrics`` entry against the step (mean
    over seeds per variant). Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_dir = Path(plot_dir)
    plot_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    if study.plot_metrics:
        fig, axes = plt.subplots(1, len(study.plot_metrics), figsize=(4.2 * len(study.plot_metrics), 3.4), squeeze=False)
        for ax, m in zip(axes[0], study.plot_metrics):
            stats = aggregate(records, m)
            if all(v.x is not None for v in study.variants):
                groups: dict[str, list] = {}
                for v in study.variants:
                    if v.name in stats:
                        groups.setdefault(v.group or v.name, []).append((v.x, *stats[v.name][:2]))
                for g, pts in groups.items():
                    pts.sort()
                    ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o",
                                capsize=3, label=g)
                ax.set_xscale("log", base=2)
                ax.set_xlabel(study.x_label or "x")
                ax.legend(fontsize=8)
            else:
                names = [v.name for v in study.variants if v.name in stats]
                ax.bar(range(len(names)), [stats[n][0] for n in names], yerr=[stats[n][1] for n in names], capsize=3)
                ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
            ax.set_title(m, fontsize=10)
        fig.suptitle(study.name, fontsize=11)
        fig.tight_layout()
        path = plot_dir / f"{study.name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    for m in study.curve_metrics:
        fig, ax = plt.subplots(figsize=(5, 3.4))
        drawn = False
        for v in study.variants:
            curves = [r["curves"][m] for r in records if r["variant"] == v.name and m in r.get("curves", {})]
            if not curves:
                continue
            steps = sorted({s for c in curves for s, _ in c})
            means = [np.nanmean([val for c in curves for s2, val in c if s2 == s]) for s in steps]
            ax.plot(steps, means, marker=".", label=v.name)
            drawn = True
        if drawn:
            ax.set_xlabel("step")
            ax.set_ylabel(m)
            ax.axhline(0, color="grey", lw=0.5)
            ax.legend(fontsize=7)
            fig.tight_layout()
            path = plot_dir / f"{study.name}_{m}.png"
            fig.savefig(path, dpi=110)
            paths.append(path)
        plt.close(fig)
    return paths


def study_section(study: GridStudy, records: list[dict[str, Any]], plot_dir: str | Path, md_dir: str | Path) -> str:
    """The Markdown section of one study (question, hypothesis, table, findings, plots)."""
    lines = [f"## {study.name}: {study.question}", ""]
    if study.hypothesis:
        lines += [f"*Hypothesis:* {study.hypothesis}", ""]
    if study.notes:
        lines += [study.notes, ""]
    ok = [r for r in records if r["status"] == "ok"]
    lines += [f"{len(ok)} of {len(records)} trials finished ({len(study.variants)} variants x seeds "
              f"{', '.join(map(str, study.seeds))}); mean ± std over seeds.", "", study_table(study, records), ""]
    found = findings(study, records)
    if found:
        lines += ["Findings:", "", *found, ""]
    failed = [r for r in records if r["status"] != "ok"]
    for r in failed[:5]:
        lines.append(f"- failed `{r['variant']}` seed {r['seed']}: {r.get('error', '')[:300]}")
    if failed:
        lines.append("")
    for path in plot_study(study, records, plot_dir):
        rel = Path(path).resolve().relative_to(Path(md_dir).resolve()) if Path(path).resolve().is_relative_to(
            Path(md_dir).resolve()) else Path(path)
        lines += [f"![{path.stem}]({rel.as_posix()})", ""]
    return "\n".join(lines)


def write_report(studies: list[GridStudy], records: dict[str, list[dict[str, Any]]], out_md: str | Path, *,
                 title: str = "Open questions", preamble: str = "") -> Path:
    """Write the Markdown report (and its plots under ``<out_md folder>/<out_md stem>_plots/``)."""
    out_md = Path(out_md)
    out_md.parent.mkdir(parents=True, exist_ok=True)
    plot_dir = out_md.parent / f"{out_md.stem}_plots"
    parts = [f"# {title}", ""]
    if preamble:
        parts += [preamble, ""]
    for study in studies:
        parts.append(study_section(study, records.get(study.name, []), plot_dir, out_md.parent))
    out_md.write_text("\n".join(parts) + "\n")
    return out_md
