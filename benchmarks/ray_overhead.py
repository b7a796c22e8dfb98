"""Ray's share of a trial's wall time: the same trial in-process and under Ray Tune + Ray Train, in one run.

1. In-process: ``train_fn_per_worker`` called directly (load the pipeline, train, evaluate, log to MLflow).
2. Under Ray: a study of ``--trials`` trials of the very same configuration (the search space has one point),
   one at a time, each a Tune trial that builds its own TorchTrainer (``sage_dist.tune.search.run_search``).

Ray's share = 1 - in-process time / per-trial Ray time; ``ray.init`` is reported separately (paid once per
study, or never when the study joins a running cluster). Per trial, the worker's own split (process start to
function entry, pipeline load, training, evaluation, MLflow logging) shows where the rest goes.

    python benchmarks/ray_overhead.py                       # bundled world, 24 steps, 2 Ray trials
    python benchmarks/ray_overhead.py --model tiny-sd --steps 4 --trials 2      # ~3 min

Reuse: Tune's ``reuse_actors`` does not apply to function trainables (Ray 2.60 raises "reset_config() ...") and
Train V2 starts a fresh controller and worker group per ``fit()``, so what can be cut is the start-up work
each of those processes does: no preemption-watcher actor and no Train metrics (``JOB_ENV``), imports kept
lazy in the trial process, and a single ``ray.init`` per study (or none when several studies share a
cluster).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def one_point(weight: float, trial) -> dict:
    """A search space with a single point (every trial is the same trial); module-level so Optuna's
    searcher state pickles."""
    trial.suggest_float("retain.retain_loss_weight", weight, weight)
    return {}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="world")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--trials", type=int, default=2)
    p.add_argument("--out", default="", help="JSON file for the numbers")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import torch

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
    from sage_dist.tracking import MlflowTracker, ensure_experiment, resolve_tracking
    from sage_dist.train.ray_worker import WorkerRun, train_fn_per_worker, worker_config
    from sage_dist.tune.cluster import connect_ray
    from sage_dist.tune.search import StudyOptions, run_search

    tmp = tempfile.mkdtemp(prefix="ray_overhead_")
    uri = f"sqlite:///{tmp}/mlflow.db"
    cfg = StudyConfig(model=ModelConfig(model_id=args.model),
                      erase=EraseConfig(ddim_steps=20 if args.model.startswith("world") else 4,
                                        warmup_steps=args.steps // 2),
                      attack=AttackConfig(attack_steps=10), retain=RetainConfig(retain_batch_size=8, top_k=2),
                      optim=OptimConfig(num_steps=args.steps, lr=1e-3),
                      scaling=ScalingConfig(num_workers=1, cpus_per_worker=1.0, checkpoint_every=args.steps // 2),
                      tracking=TrackingConfig(tracking_uri=uri, experiment_name="ray_overhead"))

    # 1. in-process (torch threads as the Ray worker gets: 1)
    torch.set_num_threads(1)
    target = resolve_tracking(uri)
    exp = ensure_experiment(target, "ray_overhead")
    run = MlflowTracker.start(target, exp, run_name="in-process", tags={})
    t0 = time.perf_counter()
    inproc = train_fn_per_worker(worker_config(cfg, WorkerRun(tracking_uri=uri, run_id=run.run_id)))
    inproc_wall = time.perf_counter() - t0
    run.end()

    # 2. the same trial under Ray Tune + Ray Train
    t0 = time.perf_counter()
    where = connect_ray("local")
    ray_init = time.perf_counter() - t0

    t0 = time.perf_counter()
    out = run_search(cfg, functools.partial(one_point, cfg.retain.retain_loss_weight), StudyOptions(name="ray_overhead", num_samples=args.trials, storage=tmp,
                                               ray_address="local", max_concurrent=1))
    study_wall = time.perf_counter() - t0
    per_trial = study_wall / args.trials
    from sage_dist.tracking.mlflow_tracker import child_runs

    trial_times = [{k: round(v, 1) for k, v in r.data.metrics.items() if k.startswith("time_")}
                   for r in child_runs(out.tracking_uri, out.parent_run_id)]
    numbers = {
        "model": args.model, "steps": args.steps, "ray": where,
        "in_process_trial_s": round(inproc_wall, 1),
        "in_process_split_s": {k: round(v, 1) for k, v in inproc.items() if k.startswith("time_")},
        "ray_init_s": round(ray_init, 1),
        "ray_study_s": round(study_wall, 1), "ray_trials": args.trials, "ray_per_trial_s": round(per_trial, 1),
        "ray_share_per_trial": round(1 - inproc_wall / per_trial, 3),
        "ray_share_with_init": round(1 - inproc_wall * args.trials / (study_wall + ray_init), 3),
        "ray_trial_splits_s": trial_times,
    }
    print(json.dumps(numbers, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(numbers, f, indent=1)


if __name__ == "__main__":
    main()
