"""Frozen UNet: what does keeping the UNet frozen cost? SAGE against ESD-x on styles (reports/open_questions.md)

Question: SAGE edits only the text encoder; ESD-x edits the UNet's cross-attention with the same erase loss and
a frozen text encoder. On the world's textures (its "artistic styles"), how do erasure, retention and KID
compare at the same budget, and what survives a white-box swap back to the original text encoder?
Hypothesis: at equal steps SAGE reaches a similar RER on the word with better retention (its graph and Top-k
retention), but its edit is undone completely by restoring the original encoder (RER 0), while ESD-x keeps its
RER under that swap.

Command (world, 4 variants x 3 seeds):  python studies/frozen_unet.py
Smoke test (~1 min):                    python studies/frozen_unet.py --smoke-test --ray-address local
Real model (artist styles, GPU):        python studies/frozen_unet.py --model CompVis/stable-diffusion-v1-4
Expected runtime: 323-385 s per trial (training + full evaluation, four trials sharing 2 cores; the
open_questions run of reports/open_questions.md).
"""

from sage_dist.cli.studies import main
from sage_dist.config import StudyConfig
from sage_dist.presets import study_base
from sage_dist.tune.concepts import style_concepts
from sage_dist.tune.grid import GridStudy, Variant


def config(model: str = "world") -> StudyConfig:
    return study_base(model, style_concepts(model)[:1])


def study(model: str = "world") -> GridStudy:
    variants = tuple(Variant(name=f"{method}-{concept.replace(' ', '_')}", group=method,
                             overrides={"erase.method": method, "erase.erase_concept": (concept,)})
                     for concept in style_concepts(model) for method in ("sage", "esd-x"))
    return GridStudy(
        name="frozen_unet", question="What does a frozen UNet cost? SAGE (text encoder) vs ESD-x (UNet cross-attention)",
        hypothesis=__doc__.split("Hypothesis: ")[1].split("\n\n")[0].replace("\n", " "),
        base=config(model), variants=variants,
        metrics=("RER_word", "RER_domain", "RER_heldout", "retention_acc", "retention_acc_all", "KID",
                 "RER_domain_after_encoder_swap", "s_per_step"),
        quick_eval=False,
        plot_metrics=("RER_domain", "retention_acc", "RER_domain_after_encoder_swap"),
        smoke_variants=tuple(f"{m}-{style_concepts(model)[0].replace(' ', '_')}" for m in ("sage", "esd-x")),
        notes="Full world fidelity (160 concept-domain images, 32 of them of the word, and 256 held-out retain "
              "images per seed). `RER_domain_after_encoder_swap`: RER once a white-box user restores the original "
              "text encoder; for a text-encoder edit that pipeline is the original model (0 by construction), ESD-x is unaffected.")


if __name__ == "__main__":
    main(study, description=__doc__)
