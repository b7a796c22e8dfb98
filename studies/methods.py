"""Methods: SAGE against ESD, ESD-x and AdvUnlearn on one concept, at the full world protocol (reports/first_result.md)

Question: at the same budget (the world erase preset: 150 steps, 30 warm-up, lr 6e-4, J = 10, 20-step rollouts
from the trajectory bank), how do SAGE, ESD (text encoder, the word only), ESD-x (UNet cross-attention) and
AdvUnlearn (its published settings: b_retain 5, retain weight 0.3, attacks continue from the latest prefix)
compare on erasure over the concept's domain (word, synonyms, held-out paraphrases), on the independent red
team (UnlearnDiffAtk's prefix attack, a Ring-A-Bell-style direction; SAGE's own inside-out attack apart), on
held-out retention (per neighbour too), on KID, and on training cost (seconds, UNet evaluations)?
Hypothesis (the paper's claim): SAGE erases the concept domain better at equal retention and is more robust to
attacks than the baselines.

Command (world, "triangle", 4 methods x 3 seeds):  python studies/methods.py
Another concept (a colour, a texture):            python studies/methods.py --concept red
All three concepts and the ablations at once:     python studies/claims.py (reports/claims.md)
Fewer seeds for one method (budget):              python studies/methods.py --variants advunlearn --seeds 0,1
Smoke test (~2 min on 2 cores):                   python studies/methods.py --smoke-test --local
Rebuild the report from the trial records:        python studies/methods.py --report-only
Expected runtime: ~45-60 min on 2 cores for 12 trials (AdvUnlearn ~5-7 min of training per seed, SAGE ~2,
ESD and ESD-x < 1; the full evaluation with the red team ~3-4 min per trial); measured in reports/first_result.md.
"""

from sage_dist.cli.studies import main
from sage_dist.config import StudyConfig
from sage_dist.models.registry import is_world
from sage_dist.presets import ADVUNLEARN_PUBLISHED, WORLD_ERASE
from sage_dist.tune.concepts import single_concept
from sage_dist.tune.grid import Claim, GridStudy, Variant
from sage_dist.world.concepts import ATTRIBUTES, concept_domain

METHODS = {
    "sage": {"erase.method": "sage"},
    "esd": {"erase.method": "esd"},
    "esd-x": {"erase.method": "esd-x"},
    "advunlearn": {"erase.method": "advunlearn", **ADVUNLEARN_PUBLISHED},
}
"""Each method's overrides of the shared budget (AdvUnlearn: its published settings, sage_dist/presets.py)."""


def config(model: str = "world", concept: str | None = None) -> StudyConfig:
    """The shared budget: the world erase preset on the world, the spec's defaults elsewhere."""
    flat = {"model.model_id": model, "erase.erase_concept": (concept or single_concept(model),)}
    return StudyConfig().replace_flat({**(WORLD_ERASE if is_world(model) else {}), **flat})


def neighbour_metrics(model: str, concept: str) -> tuple[str, ...]:
    """``neighbour_acc_<value>`` for every other value of the concept's attribute (the world only)."""
    if not is_world(model):
        return ()
    attribute = concept_domain(concept).attribute
    return tuple(f"neighbour_acc_{v}" for v in ATTRIBUTES[attribute] if v != concept)


def study(model: str = "world", concept: str | None = None) -> GridStudy:
    concept = concept or single_concept(model)
    quality = ("retention_acc", "retention_acc_all", "retention_drop", *neighbour_metrics(model, concept), "KID",
               "KID_delta")
    erasure = ("RER_word", "RER_synonyms", "RER_heldout", "RER_domain")
    attacks = ("pre_ASR", "ASR", "ASR_prefix", "ASR_ring_max", "ASR_inside_out")
    cost = ("train_s", "train_cpu_s", "num_unet_calls")
    return GridStudy(
        name=f"methods_{concept.replace(' ', '_')}",
        question=f"SAGE vs ESD, ESD-x and AdvUnlearn on {concept!r}: erasure, attacks, retention, cost",
        hypothesis=__doc__.split("Hypothesis (the paper's claim): ")[1].split("\n\n")[0].replace("\n", " "),
        base=config(model, concept),
        variants=tuple(Variant(name=name, overrides=overrides) for name, overrides in METHODS.items()),
        metrics=(*erasure, "concept_rate_original", *attacks, *quality, *cost),
        compare_metrics=(*erasure, *attacks, *quality, *cost),
        plot_metrics=("RER_domain", "RER_heldout", "ASR", "retention_acc_all"),
        quick_eval=False, red_team=True, reference_variant="sage", table_rows="metrics",
        claim=Claim(text="SAGE erases the concept domain better at equal retention and is more robust to attacks.",
                    erasure="RER_domain", retention="retention_acc_all", robustness="ASR_prefix"),
        smoke_variants=tuple(METHODS),
        notes="Every method gets the world erase preset's budget (`sage_dist/presets.py` `WORLD_ERASE`); AdvUnlearn "
              "adds its published settings (`ADVUNLEARN_PUBLISHED`). Evaluation: the full world fidelity "
              "(`WORLD_EVAL_FULL`: 160 concept-domain images, 256 held-out retain images, 32 attacked prompts per "
              "seed), noise seed = trial seed. `ASR` = pre-ASR + post-ASR under the independent red team (prefix "
              "attack or any Ring-A-Bell strength); `ASR_inside_out` is SAGE's own training attack, not "
              "independent for SAGE. `retention_acc`: held-out retain images whose prompted value of the concept's "
              "attribute is detected (all neighbours pooled); `neighbour_acc_<v>`: per neighbour; "
              "`retention_acc_all`: all three attributes. `num_unet_calls`: rows of UNet forward passes in "
              "training.")


if __name__ == "__main__":
    main(study, description=__doc__, title="SAGE against the baselines on the bundled world",
         default_out="claims", experiment_prefix="claims.")
