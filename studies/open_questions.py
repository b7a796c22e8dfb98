"""Open questions (reports/open_questions.md): the four studies run concurrently on one Ray cluster, then one report.

Launches studies/multi_concept.py, dual_encoder.py, template_bias.py and frozen_unet.py as four Ray Tune
experiments at once (each ``Tuner.fit()`` in its own Ray task, trials at --cpus-per-trial CPUs each, several at
a time), logs each to its own MLflow experiment (``open_questions.<study>``) and writes
one report with tables (cells pooled over the seeds with 95 % intervals, paired differences) and plots;
``reports/open_questions.md`` holds the answers, ``reports/open_questions_tables.md`` the generated tables.

Command (bundled world, 2 seeds, 38 trials): python studies/open_questions.py --seeds 0,1
(first, once: python studies/template_bias_calibration.py, which chose the template-bias budget)
Smoke test (<= 5 min on 2 cores):    python studies/open_questions.py --smoke-test --report /tmp/oq_smoke.md
Real models (GPU cluster):           python studies/open_questions.py --model CompVis/stable-diffusion-v1-4
                                     (the dual-encoder study runs on its SDXL counterpart, SDXL base 1.0)
Expected runtime: 52 min on 2 cores for 2 seeds (measured, reports/open_questions.md); a third seed adds about half again
(estimated from the trial count, not measured).
"""

# run as a script, this file's folder is on the import path: the four study files import by name
import dual_encoder
import frozen_unet
import multi_concept
import template_bias

from sage_dist.cli.studies import main

STUDIES = [multi_concept.study, dual_encoder.study, template_bias.study, frozen_unet.study]

if __name__ == "__main__":
    main(STUDIES, description=__doc__, default_report="reports/open_questions_tables.md",
         title="Open questions of SAGE, answered on the bundled world")
