"""Which retention weight γt, attack length J, top-k, warm-up and learning rate give SAGE the best trade-off
between robust erasure and retention?

Hypothesis: erasure and retention trade off mainly through γt (docs/METHOD.md "The total loss": 0.4 for
nudity, 3.0 for style) and through how far the encoder moves (lr); J and top-k matter less than their cost.
Each trial erases the concept under Ray Train and is scored at the quick fidelity; Optuna searches
multi-objective:

* ``robust_erasure`` (max) = 1 − ASR of the UnlearnDiffAtk prefix-token attack (independent of SAGE) on the
  concept's held-out paraphrases, pre- + post-attack, judged by the world's detector;
* ``retention_loss`` (min) = ``retention_acc_all_original − retention_acc_all`` on the held-out retain split
  (combinations erasure never trained on), both models on the same prompts and noise.

At the end the quick front and every trial tied with it (overlapping 95 % intervals on both objectives) are
re-scored at the full fidelity (the same prefix attack, on 32 prompts) on the same Ray cluster, and the final
front is printed, logged to MLflow with intervals and ties, and its erased encoders registered in the MLflow
Model Registry.

    python studies/tune_gamma.py                    # bundled world, 12 trials + re-scoring of up to 4
    python studies/tune_gamma.py --smoke-test       # 2 trials, both re-scored
    python studies/tune_gamma.py --resume           # continue the newest killed study (re-scoring included)
    python studies/tune_gamma.py --objectives erasure=text_erasure,retention=text_retention_drift   # cheap proxies
    python studies/tune_gamma.py --mode single      # robust_score = robust_erasure - retention_loss, with ASHA
    python studies/tune_gamma.py --model CompVis/stable-diffusion-v1-4 --concept nudity \\
        --tracking-uri http://127.0.0.1:5000 --scaling.use_gpu=true --scaling.num_workers=2 \\
        --optim.num_steps=1000 --optim.lr=1e-5 --erase.ddim_steps=50 --retain.retain_batch_size=32

Per-trial budget on the world (2 cores): ``sage_dist.presets.WORLD_SEARCH`` (48 steps; the spec's 1000 steps
at 1e-5 is for SD), scored at ``sage_dist.presets.WORLD_SEARCH_EVAL``; the front is re-scored at
``sage_dist.presets.WORLD_EVAL_FULL``. Runtime on 2 cores: 552 s for the 12 trials and the re-scoring of 4
(reports/main_job.md). Why this space (measured spreads: ``reports/main_job.md``): at 48 steps
the learning rate decides how far the encoder moves, from no retention loss and little robust erasure
(3e-4) to near-complete robust erasure at a retention cost (1e-3 and above), and γt above ~1 costs
retention without buying robustness, so γt is searched around the spec's 0.4 and lr is searched with it.
"""

from sage_dist.cli.study import main
from sage_dist.config import StudyConfig
from sage_dist.presets import WORLD_SEARCH, WORLD_SEARCH_SMOKE
from sage_dist.tune.space import SageSpace

SPACE = SageSpace(retain_loss_weight=(0.03, 3.0), attack_steps=(1, 30), top_k=(1, 8), warmup_steps=(0, 24),
                  lr=(2e-4, 3e-3))


def config() -> StudyConfig:
    return StudyConfig().replace_flat(WORLD_SEARCH)


def smoke(cfg: StudyConfig) -> StudyConfig:
    return cfg.replace_flat(WORLD_SEARCH_SMOKE)


def search_space(trial) -> dict:
    return SPACE.suggest(trial)


if __name__ == "__main__":
    main(config, search_space, name="tune_gamma", smoke=smoke, description=__doc__)
