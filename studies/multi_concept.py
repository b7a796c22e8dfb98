"""Multi-concept erasure: does retention hold when several concepts are erased at once? (docs/METHOD.md "Several concepts")

Question: erasing 1, 2, 4 and 8 concepts with SAGE, jointly (round-robin, each concept gets the one-concept
budget: 20 steps on the world) or one after another (each stage starts from the previous stage's model), how
do per-concept erasure (RER), retention and KID change, and do the concepts' updates interfere?
Hypothesis: joint erasure keeps retention better than sequential erasure (sequential drift compounds, every
stage re-anchors retention to an already edited model); per-concept RER falls slowly with N; the interference
(mean pairwise cosine between per-concept erase gradients) is positive for concepts of one attribute and near
zero across attributes.

Command (world, 7 variants x 3 seeds):     python studies/multi_concept.py
Smoke test (tiny budgets, ~1-2 min):       python studies/multi_concept.py --smoke-test --ray-address local
Real model (artist concepts, GPU):         python studies/multi_concept.py --model CompVis/stable-diffusion-v1-4
Expected runtime: 78-767 s per trial (the N=8 trials dominate; four trials sharing 2 cores, the open_questions
run of reports/open_questions.md).
"""

from sage_dist.cli.studies import main
from sage_dist.config import StudyConfig
from sage_dist.models.registry import is_world
from sage_dist.presets import study_base
from sage_dist.tune.concepts import multi_concepts
from sage_dist.tune.grid import GridStudy, Variant

COUNTS = (1, 2, 4, 8)


def config(model: str = "world") -> StudyConfig:
    # 20 steps per concept on the world (joint-8 and sequential-8 run 160 each) to keep the four studies within the hour
    return study_base(model, multi_concepts(model, 1), world={"optim.num_steps": 20, "erase.warmup_steps": 6},
                      **{"erase.multi_concept": "round_robin"})


def _joint_overrides(model: str, n: int) -> dict:
    """The concepts of a joint-n run; on the world, a retain batch no larger than the prompts that name none of
    them (8 world concepts leave 8 of the train split's prompts, fewer than the budget's 16: the report notes the smaller
    batch)."""
    from sage_dist.retention.prompts import resolve_retain_prompts

    concepts = multi_concepts(model, n)
    overrides = {"erase.erase_concept": concepts}
    base = config(model)
    if is_world(model):
        usable = len(resolve_retain_prompts("auto", model_id=model, erase_concepts=concepts))
        if usable < base.retain.retain_batch_size:
            overrides["retain.retain_batch_size"] = usable
    return overrides


def study(model: str = "world") -> GridStudy:
    joint = [Variant(name=f"joint-{n}", overrides=_joint_overrides(model, n), group="joint",
                     x=n, steps_scale=n) for n in COUNTS]
    sequential = [Variant(name=f"sequential-{n}", overrides={"erase.erase_concept": multi_concepts(model, n)},
                          procedure="sequential", group="sequential", x=n) for n in COUNTS[1:]]
    return GridStudy(
        name="multi_concept", question="Does retention hold when several concepts are erased at once?",
        hypothesis=__doc__.split("Hypothesis: ")[1].split("\n\n")[0].replace("\n", " "),
        base=config(model), variants=(*joint, *sequential), interference_every=10,
        metrics=("RER_domain", "RER_heldout", "retention_acc_all", "KID", "interference_cos_mean", "train_s"),
        plot_metrics=("RER_domain", "retention_acc_all", "KID"), curve_metrics=("interference_cos",),
        smoke_variants=("joint-2", "sequential-2"), x_label="concepts erased",
        notes="RER columns are means over the erased concepts (per-concept values are in the trial records and "
              "MLflow); retention and KID use retain prompts naming none of the erased concepts; `retention_acc_all` "
              "counts images showing all three prompted attributes (the same measure for any mix of erased "
              "concepts, unlike `retention_acc`, which scores only the erased concepts' attributes). "
              "`interference_cos_mean`: mean pairwise cosine between per-concept erase gradients, averaged over the "
              "measurements along the run (every 10 steps; sequential: after each stage). On the world, joint-8 uses a "
              "retain batch of 8 (all the train-split prompts that name none of its 8 concepts) instead of 16.")


if __name__ == "__main__":
    main(study, description=__doc__)
