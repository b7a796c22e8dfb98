"""A tiny-sd study for the Ray/MLflow integration tests (also run as a script by the resume test).

    python -c "import sys; sys.path.insert(0, 'tests/integration'); import tiny_study; \
tiny_study.main(['STORAGE', 'TRACKING_URI', 'NUM_SAMPLES', 'MAX_CONCURRENT'])"
"""

from __future__ import annotations

import sys

from sage_dist.config import (
    AttackConfig,
    EraseConfig,
    ModelConfig,
    OptimConfig,
    RetainConfig,
    ScalingConfig,
    StudyConfig,
    TrackingConfig,
)
from sage_dist.tune.space import SageSpace
from sage_dist.tune.study import StudyOptions

SPACE = SageSpace(retain_loss_weight=(0.1, 10.0), attack_steps=(1, 3), top_k=(1, 2), warmup_steps=(0, 2))
NAN_TRIAL = 1
"""Optuna trial number whose learning rate makes the loss NaN (fault-injection for the failure path)."""


def config(tracking_uri: str) -> StudyConfig:
    return StudyConfig(model=ModelConfig(model_id="tiny-sd"), optim=OptimConfig(num_steps=4, lr=1e-3),
                       erase=EraseConfig(warmup_steps=2, ddim_steps=4), attack=AttackConfig(attack_steps=2),
                       retain=RetainConfig(retain_batch_size=4, top_k=2),
                       scaling=ScalingConfig(num_workers=1, cpus_per_worker=0.8, checkpoint_every=2),
                       tracking=TrackingConfig(tracking_uri=tracking_uri, experiment_name="tiny_study"))


def search_space(trial) -> dict:
    SPACE.suggest(trial)
    return {}


def search_space_with_nan(trial) -> dict:
    """As :func:`search_space`; trial number ``NAN_TRIAL`` gets lr 1e4, which makes tiny-sd's loss NaN."""
    SPACE.suggest(trial)
    return {"optim.lr": 1e4} if trial.number == NAN_TRIAL else {}


def options(storage: str, num_samples: int, max_concurrent: int, resume: str = "") -> StudyOptions:
    return StudyOptions(name="tiny", num_samples=num_samples, storage=storage, ray_address="local",
                        max_concurrent=max_concurrent, resume=resume, log_encoder=True)


def main(argv: list[str]) -> None:
    """Run as ``python -c "import tiny_study; tiny_study.main([...])"`` so that the searcher state pickles
    ``tiny_study.search_space`` (not ``__main__.search_space``) and the test process can restore it."""
    from sage_dist.tune.study import execute

    storage, uri, n, conc = argv[0], argv[1], int(argv[2]), int(argv[3])
    execute(config(uri), search_space, options(storage, n, conc))


if __name__ == "__main__":
    main(sys.argv[1:])
