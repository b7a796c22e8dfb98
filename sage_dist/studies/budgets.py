"""Per-trial budgets of the open-question studies.

On the bundled world every trial must be short: a full ``python studies/open_questions.py`` (about 60 trials)
has 45 minutes on 2 cores. :data:`WORLD_BUDGET` was measured for that (see ``studies/open_questions.py``).
On real models (SD v1.4, SDXL) the studies use the spec's defaults (``StudyConfig()``, 1000 steps, lr 1e-5),
which need a GPU.
"""

from __future__ import annotations

from sage_dist.config import StudyConfig
from sage_dist.studies.concepts import is_world_model

WORLD_BUDGET = {"optim.num_steps": 30, "erase.warmup_steps": 10, "attack.attack_steps": 10, "optim.lr": 6e-4,
                "erase.ddim_steps": 20, "erase.rollout_cache": False, "retain.retain_batch_size": 16,
                "retain.top_k": 4, "tracking.log_every": 5}
"""SAGE on the world, per concept: 30 steps (10 warm-up), J=10, lr 6e-4, a 20-step DDIM schedule (the world
samples with 20 steps). The rollout cache is off: its trajectory bank only pays back after hundreds of steps.

lr 6e-4 since the zero-SNR-v world (session 4, seeds 0 and 1, ``--local``): multi_concept joint-1 RER_domain
0.75 ± 0.21 with all-attribute retention 0.97, frozen_unet sage-striped 0.80 ± 0.14 with retention 0.86; at
lr 1.2e-3 0.85 ± 0.21 with retention 0.83, and sage-striped 0.60 ± 0.28 with retention 0.75. lr 3e-4, tuned on
the session-1 world, was not re-run at this budget (at the preset's 150 steps it gave RER_domain 0.70). ESD-x
erased nothing at either lr (RER_domain 0 and 0.05), nor at 150 steps, though its erase objective fell 3x: the
frozen_unet study compares the two methods at this one shared budget, as the question asks."""


def study_base(model: str, concepts: tuple[str, ...], *, world: dict | None = None, **overrides) -> StudyConfig:
    """The base config of a study: the world budget (updated with ``world``) on the world, the spec defaults
    elsewhere; ``overrides`` (dotted keys) apply to every model."""
    flat = {"model.model_id": model, "erase.erase_concept": concepts}
    if is_world_model(model):
        flat.update({**WORLD_BUDGET, **(world or {})})
    return StudyConfig().replace_flat({**flat, **overrides})
