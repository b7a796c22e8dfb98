"""Per-model defaults layered between the spec's defaults and the user's overrides.

The spec's defaults (``StudyConfig()``) are SD v1.4's: 1000 steps, 50-step DDIM rollouts with CFG 3,
lr 1e-5. The bundled world is a 3M-parameter model sampled with 20 DDIM steps (at guidance 3, its
``world_config.json``, which equals the spec's rollout guidance), so erasing on it with SD's 50-step
rollouts and 1000 steps at lr 1e-5 would waste most of the compute. ``sage-dist erase`` applies :func:`preset_for` first,
then the user's flags; ``--preset none`` keeps the pure spec defaults. Every value is recorded in
``record.json`` like any other field.
"""

from __future__ import annotations

from typing import Any

from sage_dist.config import StudyConfig

WORLD: dict[str, Any] = {
    "optim.num_steps": 150,
    "optim.lr": 6e-4,
    "erase.warmup_steps": 30,
    "erase.ddim_steps": 20,
    "erase.rollout_cache": True,
    "attack.attack_steps": 10,
}
"""The bundled world (measured in README "First result on the bundled world"). lr 6e-4 since the zero-SNR-v world
(session 3): triangle, seeds 0 / 1, RER_domain 0.80 / 1.00 with all-attribute retention 1.00 / 1.00; lr 3e-4 gave
0.70 on seed 0, lr 1e-3 0.95 but all-attribute retention 0.72, 300 steps at 6e-4 0.85 / 0.90 with retention
down to 0.58 on seed 1."""

PRESETS: dict[str, dict[str, Any]] = {"world": WORLD, "none": {}}


def preset_for(model_id: str) -> str:
    """The preset a model gets by default: "world" for the bundled world, else "none" (spec defaults)."""
    return "world" if model_id in ("world", "world-xl") else "none"


def apply_preset(cfg: StudyConfig, name: str) -> StudyConfig:
    """``cfg`` with preset ``name`` applied.

    Raises:
        ValueError: unknown preset name.
    """
    if name not in PRESETS:
        raise ValueError(f"preset {name!r}: allowed {sorted(PRESETS)}")
    return cfg.replace_flat(PRESETS[name]) if PRESETS[name] else cfg
