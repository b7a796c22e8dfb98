"""Calibration of the template-bias study's budget (reports/open_questions.md, "template_bias_calibration")

Question: at which erase budget does SAGE's default initialisation (the template library) leave an attack
success rate that can move either way, so that the template-bias study can tell initialisations apart?
Runs the library variant at 15, 30 and 60 erase steps (a third warm-up) with the full world protocol and its
independent red team, seed 0, and chooses the budget by :func:`choose_budget`: among the budgets that erase
the concept (RER_domain >= 0.5) and whose prefix-attack ASR interval excludes 0, the one whose ASR is closest
to 0.5 (where a binomial rate has the most room to differ, in either direction). The choice is printed and
added to the report; ``studies/template_bias.py`` uses it as ``STEPS``.
Hypothesis: more steps lower the ASR, and at least one budget of the three leaves it between 0 and 1.

Command (world, 3 trials):       python studies/template_bias_calibration.py
Smoke test (~1 min):             python studies/template_bias_calibration.py --smoke-test --local
Expected runtime: ~10 min on 2 cores (three trials at once).
"""

# run as a script, this file's folder is on the import path
import template_bias

from sage_dist.cli.studies import build_parser, main, output_folder
from sage_dist.tune.grid import GridStudy, Variant, read_records

BUDGETS = (15, 30, 60)
"""Erase steps tried."""
MIN_RER_DOMAIN = 0.5
"""A budget must erase at least this much of the concept domain to qualify."""


def study(model: str = "world") -> GridStudy:
    variants = tuple(Variant(name=f"steps-{n}", overrides={"attack.init": "library", **template_bias.budget(n)},
                             group="library", x=n) for n in BUDGETS)
    return GridStudy(
        name="template_bias_calibration",
        question="Which budget leaves the template-bias study an ASR that can move either way?",
        hypothesis=__doc__.split("Hypothesis: ")[1].split("\n\n")[0].replace("\n", " "),
        base=template_bias.config(model), variants=variants, seeds=(0,),
        metrics=("ASR_prefix", "concept_rate_heldout", "RER_domain", "retention_acc_all", "train_s"),
        plot_metrics=("ASR_prefix", "concept_rate_heldout", "RER_domain"), x_label="erase steps",
        quick_eval=False, red_team=True, smoke_variants=("steps-15",),
        notes="The library variant of the template-bias study at three budgets, seed 0, full world fidelity with the "
              "red team (32 attacked prompts). The rule that picks the study's budget is `choose_budget` in "
              "`studies/template_bias_calibration.py`.")


def choose_budget(records: list[dict], *, min_rer_domain: float = MIN_RER_DOMAIN) -> tuple[int | None, str]:
    """The calibrated budget from the calibration trials' records; returns ``(steps or None, reason)``.

    A budget qualifies when its trial finished, ``RER_domain >= min_rer_domain`` and the Wilson interval of
    ``ASR_prefix`` excludes 0 (``ASR_prefix_ci95_lo > 0``); of those, the one with ``ASR_prefix`` closest to 0.5
    wins (ties: fewer steps). ``records``: trial records (``metrics`` with the names above; ``variant``
    ``"steps-<n>"``).
    """
    rows = []
    for r in records:
        if r.get("status") != "ok":
            continue
        m, steps = r["metrics"], int(r["variant"].split("-")[1])
        ok = m["RER_domain"] >= min_rer_domain and m["ASR_prefix_ci95_lo"] > 0
        rows.append((steps, m["ASR_prefix"], m["ASR_prefix_ci95_lo"], m["ASR_prefix_ci95_hi"], m["RER_domain"], ok))
    lines = [f"{s} steps: ASR_prefix {a:.3g} [{lo:.3g}, {hi:.3g}], RER_domain {rer:.3g} -> "
             f"{'qualifies' if ok else 'does not qualify'}" for s, a, lo, hi, rer, ok in sorted(rows)]
    qualified = [row for row in rows if row[-1]]
    if not qualified:
        return None, "; ".join(lines) + f"; no budget qualifies (RER_domain >= {min_rer_domain}, ASR interval above 0)"
    steps = min(qualified, key=lambda row: (abs(row[1] - 0.5), row[0]))[0]
    return steps, "; ".join(lines) + f"; chosen: {steps} steps (ASR closest to 0.5)"


if __name__ == "__main__":
    report = main(study, description=__doc__)
    args, _ = build_parser(__doc__).parse_known_args()
    steps, reason = choose_budget(read_records(output_folder(args.out), study().name))
    text = f"\n**Calibration result** (`choose_budget`): {reason}.\n"
    print(text)
    with open(report, "a") as f:
        f.write(text)
