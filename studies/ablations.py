"""Ablations: which parts of SAGE carry its erasure and its retention (reports/claims.md)

Question: at the world erase preset's budget (the methods study's SAGE: 150 steps, 30 warm-up, lr 6e-4,
J = 10, 20-step rollouts from the trajectory bank), what does each part of SAGE contribute? Each variant
removes or swaps one part and is compared with full SAGE on identical evaluation noise (paired intervals):

* attack loss: H1 only (``attack.h2_weight=0``), H2 only (``attack.h1_weight=0``), the full L_atk. The paper's
  summary says H2 alone drifts semantically: ``found_prompt_concept_rate`` measures it directly (the share of
  the original model's images of the prompts the self-check found that still show the concept; low = the
  attack left the concept's domain);
* warm-up off (``erase.warmup_steps=0``: attacks from the first step);
* graph loss off (``retain.graph_weight=0``: local retention only);
* Top-k selection: least concept-similar, random, all b_retain rows, against the default most-drifted;
* fresh frozen-model rollouts every step (``erase.rollout_cache=false``) against the trajectory bank, the
  approximation's cost on every metric as a paired difference with its interval.

Hypothesis: the full attack loss erases the concept domain at least as well as either term alone and H2-only
drifts (a lower found-prompt concept rate than full SAGE); the bank costs nothing measurable.

Command (world, "triangle", 9 variants x 3 seeds):  python studies/ablations.py
Another concept:                                   python studies/ablations.py --concept red
One part at a time (budget):                       python studies/ablations.py --variants sage,h1_only,h2_only
Smoke test (~3 min on 2 cores):                    python studies/ablations.py --smoke-test --local
Rebuild the report from the trial records:         python studies/ablations.py --report-only
Expected runtime: measured for seed 0 (reports/claims.md): training 55-93 s of CPU per variant, 198 s with
"topk_all"; with the full evaluation and red team the 9 variants took ~40 min of 2 cores (run beside the
methods study), so 3 seeds take ~2 h: split them with --variants / --seeds.
"""

from sage_dist.cli.studies import main
from sage_dist.config import StudyConfig
from sage_dist.models.registry import is_world
from sage_dist.presets import WORLD_ERASE
from sage_dist.tune.concepts import single_concept
from sage_dist.tune.grid import GridStudy, Variant

VARIANTS = {
    "sage": {},
    "h1_only": {"attack.h2_weight": 0.0},
    "h2_only": {"attack.h1_weight": 0.0},
    "no_warmup": {"erase.warmup_steps": 0},
    "no_graph": {"retain.graph_weight": 0.0},
    "topk_least_concept_similar": {"retain.top_k_selection": "least_concept_similar"},
    "topk_random": {"retain.top_k_selection": "random"},
    "topk_all": {"retain.top_k_selection": "all"},
    "fresh_rollouts": {"erase.rollout_cache": False},
}
"""Each ablation's override of full SAGE (``"sage"``)."""


def config(model: str = "world", concept: str | None = None) -> StudyConfig:
    """Full SAGE at the world erase preset (the methods study's budget); the spec's defaults elsewhere."""
    flat = {"model.model_id": model, "erase.method": "sage",
            "erase.erase_concept": (concept or single_concept(model),)}
    return StudyConfig().replace_flat({**(WORLD_ERASE if is_world(model) else {}), **flat})


def study(model: str = "world", concept: str | None = None) -> GridStudy:
    concept = concept or single_concept(model)
    erasure = ("RER_word", "RER_synonyms", "RER_heldout", "RER_domain")
    attacks = ("ASR_prefix", "ASR_inside_out")
    quality = ("retention_acc", "retention_acc_all", "KID")
    cost = ("train_s", "train_cpu_s", "num_unet_calls")
    return GridStudy(
        name=f"ablations_{concept.replace(' ', '_')}", question=f"Which parts of SAGE carry erasure and retention on {concept!r}?",
        hypothesis=__doc__.split("Hypothesis: ")[1].split("\n\n")[0].replace("\n", " "),
        base=config(model, concept),
        variants=tuple(Variant(name=name, overrides=overrides) for name, overrides in VARIANTS.items()),
        metrics=(*erasure, "found_prompt_concept_rate", *attacks, *quality, *cost),
        compare_metrics=(*erasure, *attacks, *quality, *cost),
        plot_metrics=("RER_domain", "ASR_prefix", "retention_acc_all", "found_prompt_concept_rate"),
        quick_eval=False, red_team=True, found_prompts=True, reference_variant="sage", table_rows="metrics",
        smoke_variants=("sage", "h2_only", "fresh_rollouts"),
        notes="Every variant is full SAGE at the world erase preset (`sage_dist/presets.py` `WORLD_ERASE`) with "
              "one override (`studies/ablations.py` `VARIANTS`). Evaluation: the full world fidelity with the "
              "independent red team, noise seed = trial seed (paired across variants). "
              "`found_prompt_concept_rate`: the original model's images (2 seeds per prompt) of up to 32 prompts "
              "the self-check found during training, spread over training, that show the concept (Wilson, pooled "
              "over seeds; low = semantic drift out of the domain). `ASR_inside_out` is SAGE's own attack.")


if __name__ == "__main__":
    main(study, description=__doc__, title="Ablations of SAGE on the bundled world",
         default_out="claims", experiment_prefix="claims.")
