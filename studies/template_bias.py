"""Template-library bias: does the template library limit what the inside-out attack finds? (reports/open_questions.md)

Question: SAGE's self-check attack starts from a template of its library. Compared with random-token
initialisation, the concept word alone, and a library mined from a different source (COCO captions with the
subject replaced by the slot, world concept words filtered out; ``sage_dist/studies/data/coco_mined_templates.txt``),
how much of the held-out concept domain does the erased model still generate (ASR on held-out paraphrases)?
Hypothesis: the library's phrasing matters little on the world (its captions are simple), so the ASR on
held-out paraphrases differs by less than its seed spread between library, mined and random initialisation;
the concept word alone gives the narrowest attack and the highest held-out ASR.

Command (world, 4 variants x 3 seeds):  python studies/template_bias.py
Smoke test (~1 min):                    python studies/template_bias.py --smoke-test --ray-address local
Real model (GPU):                       python studies/template_bias.py --model CompVis/stable-diffusion-v1-4
Expected runtime: ~8 min of the 45-minute open_questions run on 2 cores.
"""

from sage_dist.attack.mining import MINED_LIBRARY
from sage_dist.cli.studies import main
from sage_dist.config import StudyConfig
from sage_dist.presets import study_base
from sage_dist.tune.concepts import single_concept
from sage_dist.tune.grid import GridStudy, Variant


def config(model: str = "world") -> StudyConfig:
    return study_base(model, (single_concept(model),))


def study(model: str = "world") -> GridStudy:
    variants = (Variant(name="library", overrides={"attack.init": "library"}),
                Variant(name="random", overrides={"attack.init": "random"}),
                Variant(name="concept-only", overrides={"attack.init": "concept_only"}),
                Variant(name="mined-coco", overrides={"attack.init": "library",
                                                      "attack.template_library": str(MINED_LIBRARY)}))
    return GridStudy(
        name="template_bias", question="Does the template library limit what the attack finds?",
        hypothesis=__doc__.split("Hypothesis: ")[1].split("\n\n")[0].replace("\n", " "),
        base=config(model), variants=variants,
        metrics=("concept_rate_heldout", "RER_heldout", "RER_domain", "retention_acc", "KID"),
        plot_metrics=("concept_rate_heldout", "RER_heldout", "retention_acc"),
        smoke_variants=("concept-only", "mined-coco"),
        notes="`concept_rate_heldout`: fraction of the erased model's images from held-out paraphrases (never seen by "
              "erasure, no attack run) in which the detector still finds the concept; lower is better.")


if __name__ == "__main__":
    main(study, description=__doc__)
