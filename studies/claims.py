"""The paper's claims on the bundled world (reports/claims.md): the methods study for a shape, a colour and a
texture concept, and the ablations, as concurrent Ray Tune experiments on one Ray cluster.

Studies (each its own Tune experiment and MLflow experiment ``claims.<study>``; one report for all):

* ``methods_<concept>`` (studies/methods.py) for each of ``--concepts`` (default triangle, red, striped: a shape,
  a colour, a texture): SAGE, ESD, ESD-x and AdvUnlearn with its published settings; each report section judges
  the claim "SAGE erases the concept domain better at equal retention and is more robust to attacks" against
  every baseline from paired intervals (supported / contradicted / not separable / trade-off);
* ``ablations_<concept>`` (studies/ablations.py) for ``--ablation-concept`` (default triangle).

Seeds: 0-4 unless ``--seeds`` is given. The whole set is 3 x 4 x 5 + 9 x 5 = 105 trials, about 7 h on 2 cores
(measured: one concept's methods study, 20 trials, 76 min with 4 trials at a time; the 9 ablations of one seed
~40 min; reports/claims.md gives the costs per trial). Trials run seed by seed, so a launch stopped part-way
leaves whole seeds, and ``--resume`` continues it. Or split it into parts that share one ``--out`` and write the
report from every record there at the end:

    python studies/claims.py --concepts red --parts methods --seeds 0,1,2       # one part (~40 min on 2 cores)
    python studies/claims.py --parts ablations --seeds 0                        # another (~30 min)
    python studies/claims.py --report-only --report reports/claims.md           # the report from all parts
    python studies/claims.py --report-only --from-mlflow --tracking-uri URI     # the same tables from MLflow alone
    python studies/claims.py --smoke-test --parts methods --concepts red        # every code path, ~5 min

A report over fewer seeds than asked marks every cell ("3 of 5 seeds"), a cell with none reads missing.
Expected runtime: see above; the default (everything) is budgeted for a GPU cluster, not for 2 cores.
"""

import argparse
import functools
import os
import sys
from pathlib import Path

import ablations
import methods

from sage_dist.cli.studies import main, prepare

CLAIM_SEEDS = "0,1,2,3,4"
"""Seeds of every claims study unless --seeds is given (the issue's 5 seeds)."""


def plot_by_concept(grid_studies: list, out_dir: Path, report: Path,
                    metrics: tuple[str, ...] = ("RER_domain", "retention_acc_all", "ASR_prefix")) -> Path | None:
    """Bars per method and concept (the methods studies), error bars the pooled 95 % intervals; the PNG goes
    to ``<report stem>_plots/methods_by_concept.png`` and is linked at the end of the report. None without a
    methods study."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from sage_dist.tune.grid import read_records
    from sage_dist.tune.report import variant_cell, variant_records

    chosen = [s for s in grid_studies if s.name.startswith("methods_")]
    if not chosen:
        return None
    names = [v.name for v in chosen[0].variants]
    groups = {s.name: variant_records(s, read_records(out_dir, s.name, features=True)) for s in chosen}
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.6 * len(metrics), 3.6), squeeze=False)
    width = 0.8 / len(names)
    for ax, metric in zip(axes[0], metrics):
        for i, name in enumerate(names):
            cells = [variant_cell(metric, groups[s.name][name], len(s.seeds)) for s in chosen]
            values = np.array([c.value for c in cells])
            err = np.array([[c.value - c.low, c.high - c.value] if np.isfinite(c.low) else [0, 0] for c in cells]).T
            ax.bar(np.arange(len(chosen)) + (i - (len(names) - 1) / 2) * width, values, width, yerr=err, capsize=2,
                   label=name)
        ax.set_xticks(range(len(chosen)), [s.base.erase.erase_concept[0] for s in chosen])
        ax.set_title(f"{metric} (95 % CI)", fontsize=10)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    path = report.parent / f"{report.stem}_plots" / "methods_by_concept.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    summary = ["## Methods by concept", "",
               "Every cell pooled over the seeds that finished, with its 95 % interval and n (images or attacked "
               "prompts); costs are per-trial means over seeds (t interval).", "",
               "| concept | method | seeds | " + " | ".join(SUMMARY_METRICS) + " |",
               "|---|---|---|" + "---|" * len(SUMMARY_METRICS)]
    for s in chosen:
        for name in names:
            vr = groups[s.name][name]
            cells = [variant_cell(m, vr, len(s.seeds)).text() for m in SUMMARY_METRICS]
            summary.append(f"| {s.base.erase.erase_concept[0]} | {name} | {len(vr.ok)} of {len(s.seeds)} | "
                           + " | ".join(c.replace(f"; {len(vr.ok)} of {len(s.seeds)} seeds", "") for c in cells)
                           + " |")
    with report.open("a") as f:
        f.write("\n".join(summary) + f"\n\n![methods by concept]({path.parent.name}/{path.name})\n")
    return path


SUMMARY_METRICS = ("RER_domain", "RER_heldout", "retention_acc_all", "retention_acc", "ASR_prefix", "KID",
                   "train_cpu_s", "num_unet_calls")
"""Columns of the report's table of every method on every concept."""


def studies(concepts: list[str], parts: list[str], ablation_concept: str) -> list:
    """The study functions of the chosen parts (each bound to its concept)."""
    out = []
    if "methods" in parts:
        out += [functools.partial(methods.study, concept=c) for c in concepts]
    if "ablations" in parts:
        out.append(functools.partial(ablations.study, concept=ablation_concept))
    return out


def parse_claims_args(argv: list[str]) -> tuple[list, list[str]]:
    """``(study functions, the rest of argv for the grid studies' command line)``; the seeds default to
    :data:`CLAIM_SEEDS` (not under ``--smoke-test``).

    Raises:
        ValueError: an unknown part, or a concept named twice (two studies would share a name).
    """
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--concepts", default="triangle,red,striped")
    pre.add_argument("--parts", default="methods,ablations")
    pre.add_argument("--ablation-concept", default="triangle")
    known, rest = pre.parse_known_args(argv)
    parts = [p.strip() for p in known.parts.split(",") if p.strip()]
    if not parts or set(parts) - {"methods", "ablations"}:
        raise ValueError(f"--parts {known.parts!r}: choose from methods, ablations")
    concepts = [c.strip() for c in known.concepts.split(",") if c.strip()]
    if not concepts or len(set(concepts)) != len(concepts):
        raise ValueError(f"--concepts {known.concepts!r}: name each concept once")
    if "--smoke-test" not in rest and not any(a == "--seeds" or a.startswith("--seeds=") for a in rest):
        rest = [*rest, "--seeds", CLAIM_SEEDS]
    return studies(concepts, parts, known.ablation_concept), rest


def run(argv: list[str]) -> Path:
    """The command line: the claims studies' options, then every grid-study option (sage_dist.cli.studies);
    returns the report. Exits with status 2 on bad input, 130 when interrupted (printing the whole command
    with ``--resume``)."""
    try:
        fns, rest = parse_claims_args(argv)
    except ValueError as err:
        sys.exit(f"claims.py: error: {err}")
    description = __doc__ + "\nclaims.py options: --concepts a,b,c  --parts methods,ablations  --ablation-concept c"
    report = main(fns, rest, description=description, title="The paper's claims on the bundled world",
                  default_out="claims", default_report="reports/claims_tables.md", experiment_prefix="claims.",
                  command_argv=argv)
    if "--from-mlflow" not in rest:
        args, grid_studies = prepare(fns, rest, description)
        out = Path(args.out or Path(os.environ.get("SAGE_DIST_STORAGE", "") or "runs") / "claims").expanduser()
        plot_by_concept(grid_studies, out.resolve(), Path(report))
    return Path(report)


if __name__ == "__main__":
    run(sys.argv[1:])
