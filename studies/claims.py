"""The paper's claims on the bundled world (reports/claims.md): the methods study for a shape, a colour and a
texture concept, and the ablations, as concurrent Ray Tune experiments on one Ray cluster.

Studies (each its own Tune experiment and MLflow experiment ``claims.<study>``; one report for all):

* ``methods_<concept>`` (studies/methods.py) for each of ``--concepts`` (default triangle, red, striped: a shape,
  a colour, a texture): SAGE, ESD, ESD-x and AdvUnlearn with its published settings; each report section judges
  the claim "SAGE erases the concept domain better at equal retention and is more robust to attacks" against
  every baseline from paired intervals (supported / contradicted / not separable / trade-off);
* ``ablations_<concept>`` (studies/ablations.py) for ``--ablation-concept`` (default triangle).

Seeds: 0-4 unless ``--seeds`` is given. The whole set is 3 x 4 x 5 + 9 x 5 = 105 trials, about 8-9 h on 2 cores
(a trial is 2-6 min of CPU; reports/claims.md gives the measured costs): split it into parts that share one
``--out`` and write the report from every record there at the end:

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
import sys

import ablations
import methods

from sage_dist.cli.studies import main

CLAIM_SEEDS = "0,1,2,3,4"
"""Seeds of every claims study unless --seeds is given (the issue's 5 seeds)."""


def studies(concepts: list[str], parts: list[str], ablation_concept: str) -> list:
    """The study functions of the chosen parts (each bound to its concept)."""
    out = []
    if "methods" in parts:
        out += [functools.partial(methods.study, concept=c) for c in concepts]
    if "ablations" in parts:
        out.append(functools.partial(ablations.study, concept=ablation_concept))
    return out


if __name__ == "__main__":
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--concepts", default="triangle,red,striped")
    pre.add_argument("--parts", default="methods,ablations")
    pre.add_argument("--ablation-concept", default="triangle")
    known, argv = pre.parse_known_args(sys.argv[1:])
    parts = [p.strip() for p in known.parts.split(",") if p.strip()]
    unknown = set(parts) - {"methods", "ablations"}
    if unknown or not parts:
        sys.exit(f"claims.py: error: --parts {known.parts!r}: choose from methods, ablations")
    concepts = [c.strip() for c in known.concepts.split(",") if c.strip()]
    if len(set(concepts)) != len(concepts) or not concepts:
        sys.exit(f"claims.py: error: --concepts {known.concepts!r}: name each concept once")
    if "--seeds" not in argv and not any(a.startswith("--seeds=") for a in argv) and "--smoke-test" not in argv:
        argv += ["--seeds", CLAIM_SEEDS]
    main(studies(concepts, parts, known.ablation_concept), argv,
         description=__doc__ + "\nclaims.py options: --concepts a,b,c  --parts methods,ablations  "
                               "--ablation-concept c",
         title="The paper's claims on the bundled world", default_out="claims",
         default_report="reports/claims_tables.md", experiment_prefix="claims.")
