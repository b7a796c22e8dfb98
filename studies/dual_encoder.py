"""Dual text encoders: can text-encoder-only erasure work with SDXL's two encoders? (docs/METHOD.md "SDXL")

Question: on the SDXL-style world twin, erase with SAGE through encoder 1 only, encoder 2 only, or both jointly;
and the transfer test: the encoder erased on the SD world model (which shares encoder 1 with its SDXL twin)
put into the SDXL twin's first slot. What RER and retention does each reach?
Hypothesis: one encoder leaves the other path open, so encoder-1-only and transferred erasure reach a lower
RER on the SDXL model than on SD (the paper's 49% vs 98% transfer gap); erasing both encoders closes it.

Command (world-xl, 4 variants x 3 seeds):  python studies/dual_encoder.py
Smoke test (~1 min):                       python studies/dual_encoder.py --smoke-test --ray-address local
Real model (GPU):                          python studies/dual_encoder.py --model stabilityai/stable-diffusion-xl-base-1.0
Expected runtime: 72-134 s per trial (training + quick evaluation, four trials sharing 2 cores; the
open_questions run of reports/open_questions.md).
"""

from sage_dist.cli.studies import main
from sage_dist.config import StudyConfig
from sage_dist.presets import study_base
from sage_dist.tune.concepts import single_concept
from sage_dist.tune.grid import GridStudy, Variant

SOURCE = {"world-xl": "world", "stabilityai/stable-diffusion-xl-base-1.0": "CompVis/stable-diffusion-v1-4",
          "tiny-sdxl": "tiny-sd"}
"""SD model whose first encoder has the SDXL model's first-encoder shape (transfer test; tiny: tests only)."""


XL_TWIN = {source: xl for xl, source in SOURCE.items()}
"""An SD model given with --model (e.g. by open_questions.py) runs this study on its SDXL counterpart."""


def config(model: str = "world-xl") -> StudyConfig:
    return study_base(model, (single_concept(model),))


def study(model: str = "world-xl") -> GridStudy:
    model = XL_TWIN.get(model, model)
    variants = [Variant(name="encoder1", overrides={"model.train_encoders": (0,)}),
                Variant(name="encoder2", overrides={"model.train_encoders": (1,)}),
                Variant(name="both", overrides={"model.train_encoders": (0, 1)})]
    if model in SOURCE:
        variants.append(Variant(name="transfer-from-sd", procedure="transfer", source_model=SOURCE[model]))
    return GridStudy(
        name="dual_encoder", question="Can text-encoder-only erasure work with SDXL's two text encoders?",
        hypothesis=__doc__.split("Hypothesis: ")[1].split("\n\n")[0].replace("\n", " "),
        base=config(model), variants=tuple(variants),
        metrics=("RER_domain", "RER_word", "RER_heldout", "retention_acc", "KID", "source_RER_domain"),
        plot_metrics=("RER_domain", "RER_heldout", "retention_acc"), smoke_variants=("encoder2", "transfer-from-sd"),
        reference_variant="encoder1", compare_metrics=("RER_domain", "RER_word", "RER_heldout", "retention_acc"),
        notes="`source_RER_domain`: the transferred encoder's RER on the SD model it was erased on. Quick world "
              "fidelity (50 concept-domain and 64 held-out retain images per seed); differences paired against "
              "`encoder1` on identical noise.")


if __name__ == "__main__":
    main(study, description=__doc__)
