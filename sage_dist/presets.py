"""Every budget in one place: per-model defaults layered between the spec's defaults and the user's overrides.

The spec's defaults (``StudyConfig()``) are SD v1.4's: 1000 steps, 50-step DDIM rollouts with CFG 3, lr 1e-5.
The bundled world is a 3M-parameter model sampled with 20 DDIM steps at guidance 3 (its ``world_config.json``,
equal to the spec's rollout guidance), so erasing on it with SD's budget would waste most of the compute. Each
budget below is a dict of dotted config keys, applied with ``StudyConfig.replace_flat``; every applied value is
recorded in ``record.json`` and in MLflow like any other field. The figures behind each choice are in
``reports/`` (``first_result.md``, ``open_questions.md``, ``main_job.md``).
"""

from __future__ import annotations

from typing import Any

from sage_dist.config import StudyConfig
from sage_dist.models.registry import is_world

WORLD_ERASE: dict[str, Any] = {
    "optim.num_steps": 150,
    "optim.lr": 6e-4,
    "erase.warmup_steps": 30,
    "erase.ddim_steps": 20,
    "erase.rollout_cache": True,
    "attack.attack_steps": 10,
}
"""``sage-dist erase`` on the bundled world: 150 steps (30 warm-up), lr 6e-4, J = 10, 20-step rollouts from the
trajectory bank."""

WORLD_STUDY: dict[str, Any] = {
    "optim.num_steps": 30, "erase.warmup_steps": 10, "attack.attack_steps": 10, "optim.lr": 6e-4,
    "erase.ddim_steps": 20, "erase.rollout_cache": False, "retain.retain_batch_size": 16, "retain.top_k": 4,
    "tracking.log_every": 5,
}
"""One open-question study trial on the world, per concept: 30 steps (10 warm-up), J = 10, lr 6e-4, a 20-step
DDIM schedule. The rollout cache is off: its trajectory bank only pays back after hundreds of steps."""

WORLD_SEARCH: dict[str, Any] = {
    "model.model_id": "world", "erase.erase_concept": ("triangle",), "erase.ddim_steps": 20,
    "erase.warmup_steps": 12, "erase.rollout_cache": True, "attack.attack_steps": 10, "retain.retain_batch_size": 8,
    "retain.top_k": 2, "optim.num_steps": 48, "optim.lr": 1e-3, "scaling.num_workers": 1,
    "scaling.cpus_per_worker": 0.8, "scaling.checkpoint_every": 16,
}
"""One trial of the main job (``studies/tune_gamma.py``) on the world: 48 steps at lr 1e-3 (the world's encoder
is tiny and moves fast), bank rollouts, 8 retain prompts per step, one Ray Train worker."""

WORLD_SEARCH_SMOKE: dict[str, Any] = {"optim.num_steps": 24, "scaling.checkpoint_every": 12}
"""``studies/tune_gamma.py --smoke-test``: half the steps."""

STUDY_SMOKE: dict[str, Any] = {
    "optim.num_steps": 4, "erase.warmup_steps": 2, "attack.attack_steps": 2, "retain.retain_batch_size": 8,
    "retain.top_k": 2, "erase.ddim_steps": 10, "erase.rollout_cache": False,
}
"""``--smoke-test`` of the grid studies: every code path in seconds per trial; the numbers mean nothing."""

PRESETS: dict[str, dict[str, Any]] = {"world": WORLD_ERASE, "none": {}}
"""Presets ``sage-dist erase --preset`` accepts."""


def preset_for(model_id: str) -> str:
    """The preset a model gets by default: "world" for the bundled world, else "none" (spec defaults)."""
    return "world" if is_world(model_id) else "none"


def study_base(model: str, concepts: tuple[str, ...], *, world: dict | None = None, **overrides) -> StudyConfig:
    """The base config of a grid study: :data:`WORLD_STUDY` (updated with ``world``) on the world, the spec
    defaults elsewhere (they need a GPU); ``overrides`` (dotted keys) apply to every model."""
    flat: dict[str, Any] = {"model.model_id": model, "erase.erase_concept": concepts}
    if is_world(model):
        flat.update({**WORLD_STUDY, **(world or {})})
    return StudyConfig().replace_flat({**flat, **overrides})
