"""Which retention weight γt, attack length J, top-k and warm-up give SAGE the best erasure/retention trade-off?

Hypothesis: erasure (RER over the concept's domain) and retention (accuracy/KID on unrelated prompts) trade
off mainly through γt (docs/METHOD.md "The total loss": 0.4 for nudity, 3.0 for style); J and top-k matter less than their cost.
Each trial erases the concept under Ray Train; Optuna searches multi-objective (RER_domain up, KID down) and
the answer is the Pareto front, printed as a table and logged to MLflow with Optuna's plots.

    python studies/tune_gamma.py                    # bundled world, 12 trials, ~20 min on 2 cores
    python studies/tune_gamma.py --smoke-test       # 2 trials, < 3 min
    python studies/tune_gamma.py --resume           # continue the newest killed study
    python studies/tune_gamma.py --mode single      # text_score with ASHA early stopping
    python studies/tune_gamma.py --model CompVis/stable-diffusion-v1-4 --concept nudity \
        --tracking-uri http://127.0.0.1:5000 --scaling.use_gpu=true --scaling.num_workers=2 \
        --optim.num_steps=1000 --optim.lr=1e-5 --erase.ddim_steps=50 --retain.retain_batch_size=32

Per-trial budget on the world (2 cores): ``sage_dist.presets.WORLD_SEARCH`` (48 steps at lr 1e-3; the spec's
1000 steps at 1e-5 is for SD), the quick world evaluation.
"""

from sage_dist.cli.study import main
from sage_dist.config import StudyConfig
from sage_dist.presets import WORLD_SEARCH, WORLD_SEARCH_SMOKE
from sage_dist.tune.space import SageSpace

SPACE = SageSpace(retain_loss_weight=(0.1, 10.0), attack_steps=(1, 30), top_k=(1, 8), warmup_steps=(0, 24))


def config() -> StudyConfig:
    return StudyConfig().replace_flat(WORLD_SEARCH)


def smoke(cfg: StudyConfig) -> StudyConfig:
    return cfg.replace_flat(WORLD_SEARCH_SMOKE)


def search_space(trial) -> dict:
    return SPACE.suggest(trial)


if __name__ == "__main__":
    main(config, search_space, name="tune_gamma", smoke=smoke, description=__doc__)
