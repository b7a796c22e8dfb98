"""Template-library bias: does the template library limit what the inside-out attack finds? (reports/open_questions.md)

Question: SAGE's self-check attack starts from a template of its library. Compared with random-token
initialisation, the concept word alone, and a library mined from a different source (COCO captions with the
subject replaced by the slot, world concept words filtered out; ``sage_dist/attack/data/coco_mined_templates.txt``),
how robust is the erased model: how much of the held-out concept domain does it still generate without an
attack (``concept_rate_heldout``), and how often does an independent attack that SAGE never trained against
(UnlearnDiffAtk's prefix attack, ``ASR_prefix``) recover the concept?
Hypothesis: the library's phrasing matters little on the world (its captions are simple), so held-out concept
rate and prefix-attack ASR differ by less than their intervals between library, mined and random
initialisation; the concept word alone gives the narrowest attack and the highest ASR.

The budget (``STEPS`` erase steps) is the one the calibration run chose (``studies/template_bias_calibration.py``:
the library variant at 15 / 30 / 60 steps, the budget whose prefix-attack ASR is closest to 0.5 among those
that erase the concept and leave the ASR's interval clear of 0), so that the initialisations can differ in
either direction (scored on 4 held-out paraphrases per seed without an attack, every initialisation had
reached an ASR of 0 at 30 steps, and the question could not be answered).

Command (world, 4 variants x 3 seeds):  python studies/template_bias.py
Calibration (3 trials, ~10 min):        python studies/template_bias_calibration.py
Smoke test (~2 min):                    python studies/template_bias.py --smoke-test --local
Real model (GPU):                       python studies/template_bias.py --model CompVis/stable-diffusion-v1-4
Expected runtime: 263-522 s per trial (the red team dominates; four trials sharing 2 cores, the open_questions
run of reports/open_questions.md).
"""

from sage_dist.attack.mining import MINED_LIBRARY
from sage_dist.cli.studies import main
from sage_dist.config import StudyConfig
from sage_dist.models.registry import is_world
from sage_dist.presets import study_base
from sage_dist.tune.concepts import single_concept
from sage_dist.tune.grid import GridStudy, Variant

STEPS = 60
"""Erase steps per trial on the world (warm-up a third of them): the calibration run's choice."""


def budget(steps: int) -> dict:
    """The world budget of ``steps`` erase steps (a third of them warm-up), dotted keys."""
    return {"optim.num_steps": steps, "erase.warmup_steps": steps // 3}


def config(model: str = "world", steps: int = STEPS) -> StudyConfig:
    return study_base(model, (single_concept(model),), world=budget(steps) if is_world(model) else None)


METRICS = ("concept_rate_heldout", "ASR_prefix", "pre_ASR", "RER_heldout", "RER_domain", "retention_acc",
           "retention_acc_all", "KID")


def study(model: str = "world") -> GridStudy:
    variants = (Variant(name="library", overrides={"attack.init": "library"}),
                Variant(name="random", overrides={"attack.init": "random"}),
                Variant(name="concept-only", overrides={"attack.init": "concept_only"}),
                Variant(name="mined-coco", overrides={"attack.init": "library",
                                                      "attack.template_library": str(MINED_LIBRARY)}))
    return GridStudy(
        name="template_bias", question="Does the template library limit what the attack finds?",
        hypothesis=__doc__.split("Hypothesis: ")[1].split("\n\n")[0].replace("\n", " "),
        base=config(model), variants=variants, metrics=METRICS,
        plot_metrics=("concept_rate_heldout", "ASR_prefix", "retention_acc_all"),
        quick_eval=False, red_team=True, reference_variant="library",
        compare_metrics=("concept_rate_heldout", "ASR_prefix", "RER_domain", "retention_acc_all"),
        smoke_variants=("concept-only", "mined-coco"),
        notes=f"Budget: {STEPS} erase steps (chosen by the calibration run, `studies/template_bias_calibration.py`). "
              "`concept_rate_heldout`: fraction of the erased model's images from held-out paraphrases (never seen "
              "by erasure, no attack run) in which the detector still finds the concept; `ASR_prefix`: "
              "UnlearnDiffAtk's prefix attack on 32 held-out-paraphrase prompts per seed (an attack SAGE never "
              "trained against, so the initialisation of SAGE's own attack is not what judges it); lower is "
              "better for both. Full world fidelity, noise seed = trial seed; differences paired against "
              "`library`.")


if __name__ == "__main__":
    main(study, description=__doc__)
