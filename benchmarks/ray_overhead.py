"""Ray's share of a trial's wall time, before and after sharing the frozen work, against an in-process baseline,
all in one run.

The trial is the main job's (``sage_dist.presets.WORLD_SEARCH``: the bundled world, 48 steps, trajectory bank,
quick world evaluation, MLflow logging). Three arms, each on the same machine in the same run:

1. **in-process**: :func:`sage_dist.train.ray_worker.train_fn_per_worker` called directly in this process with a
   cold start (the pipeline loaded, no shared cache): load, train, evaluate, log;
2. **TorchTrainer, nothing shared** (how trials ran before): ``--trials`` Tune trials of the same config one
   after the other, each building a one-worker ``TorchTrainer`` (``TrialSettings(in_process=False,
   share_frozen=False)``), a fresh trial process and worker process each;
3. **in-process trials, shared** (the default now): the same trials running in their own process, which Tune
   reuses (``reuse_actors=True``), with the study's frozen cache (``TrialSettings()``).

For each Ray arm: per-trial wall time W = the arm's ``Tuner.fit()`` time / trials, and the trials' own timers
(pipeline load, training, evaluation, MLflow logging). **Overhead** = start-up + load + logging =
W - training - evaluation, i.e. every second of a trial that is not the erasure or its evaluation (worker and
controller start-up, Tune's bookkeeping, teardown, the pipeline load, logging); its share is overhead / W. The
in-process arm's share is its load + logging over its wall time. ``ray.init`` is reported on its own (paid
once per study, or never when a study joins a running cluster). Every trial of an arm has the same config, so
from its second trial on the shared arm finds every bank entry it needs: its training time is the floor of a
real search's, and its overhead share an upper bound.

    python benchmarks/ray_overhead.py                          # world, WORLD_SEARCH, 3 trials per arm, ~10 min
    python benchmarks/ray_overhead.py --model tiny-sd --steps 4 --trials 2     # wiring check, ~2 min
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

TIMERS = ("time_load_s", "time_train_s", "time_eval_s", "time_log_s")


def _split(wall: float, timers: list[dict[str, float]]) -> dict[str, float]:
    """Per-trial means of the timers, start-up (the rest of the wall time) and the overhead share."""
    n = len(timers)
    mean = {k: sum(t.get(k, 0.0) for t in timers) / n for k in TIMERS}
    startup = wall - sum(mean.values())
    overhead = startup + mean["time_load_s"] + mean["time_log_s"]
    return {"trial_wall_s": round(wall, 2), **{k: round(v, 2) for k, v in mean.items()},
            "startup_s": round(startup, 2), "overhead_s": round(overhead, 2),
            "overhead_share": round(overhead / wall, 3),
            "load_share": round(mean["time_load_s"] / wall, 3), "log_share": round(mean["time_log_s"] / wall, 3),
            "startup_share": round(startup / wall, 3)}


def _ray_arm(cfg, settings_kwargs: dict, *, trials: int, storage: str, target, experiment_id: str, name: str):
    """``trials`` Tune trials of ``cfg`` one at a time under :func:`sage_dist.tune.trial.run_trial`; returns
    (wall seconds of ``Tuner.fit``, the trials' timers in start order)."""
    from ray import tune

    from sage_dist.tracking import MlflowTracker
    from sage_dist.tracking.mlflow_tracker import child_runs
    from sage_dist.tune.trial import TrialSettings, run_trial, runs_in_process, trial_config, trial_resources

    parent = MlflowTracker.start(target, experiment_id, run_name=name, tags={})
    study_dir = os.path.join(storage, name)
    os.makedirs(study_dir, exist_ok=True)
    settings = TrialSettings(study_dir=study_dir, tracking_uri=target.tracking_uri, experiment_id=experiment_id,
                             parent_run_id=parent.run_id, log_images=True, log_encoder=True, **settings_kwargs)
    tuner = tune.Tuner(tune.with_resources(run_trial, trial_resources(cfg, settings)),
                       param_space=trial_config(cfg.to_flat_dict(), settings),
                       tune_config=tune.TuneConfig(num_samples=trials, max_concurrent_trials=1,
                                                   reuse_actors=runs_in_process(cfg, settings)),
                       run_config=tune.RunConfig(name=name, storage_path=storage, verbose=0))
    t0 = time.perf_counter()
    grid = tuner.fit()
    wall = time.perf_counter() - t0
    parent.end()
    errors = [str(r.error) for r in grid if r.error is not None]
    if errors:
        raise RuntimeError(f"{name}: {len(errors)} trial(s) failed: {errors[0][:500]}")
    runs = sorted(child_runs(target.tracking_uri, parent.run_id), key=lambda r: r.info.start_time)
    return wall, [dict(r.data.metrics) for r in runs]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="world")
    p.add_argument("--steps", type=int, default=0, help="optim.num_steps (0: WORLD_SEARCH's)")
    p.add_argument("--trials", type=int, default=3, help="trials per Ray arm")
    p.add_argument("--arms", default="in_process,torch_trainer,shared", help="arms to run, comma-separated")
    p.add_argument("--out", default="", help="JSON file for the numbers")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import torch

    from sage_dist.config import StudyConfig
    from sage_dist.presets import WORLD_SEARCH
    from sage_dist.tracking import MlflowTracker, ensure_experiment, resolve_tracking
    from sage_dist.train import shared
    from sage_dist.train.ray_worker import WorkerRun, train_fn_per_worker, worker_config
    from sage_dist.tune.cluster import connect_ray

    arms = [a for a in args.arms.split(",") if a]
    tmp = tempfile.mkdtemp(prefix="ray_overhead_")
    uri = f"sqlite:///{tmp}/mlflow.db"
    flat = {**WORLD_SEARCH, "model.model_id": args.model, "tracking.tracking_uri": uri,
            "tracking.experiment_name": "ray_overhead"}
    if args.model.startswith("tiny"):
        flat.update({"erase.ddim_steps": 4, "retain.retain_batch_size": 4, "scaling.checkpoint_every": 2})
    if args.steps:
        flat.update({"optim.num_steps": args.steps, "erase.warmup_steps": args.steps // 4,
                     "scaling.checkpoint_every": max(1, args.steps // 3)})
    cfg = StudyConfig().replace_flat(flat)
    target = resolve_tracking(uri)
    exp = ensure_experiment(target, "ray_overhead")
    numbers = {"model": args.model, "steps": cfg.optim.num_steps, "trials_per_arm": args.trials,
               "load_average_start": [round(x, 2) for x in os.getloadavg()]}

    if "in_process" in arms:  # torch threads as the trial gets: 1 (cpus_per_worker < 2)
        torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
        shared.clear_process_caches()
        run = MlflowTracker.start(target, exp, run_name="in-process", tags={})
        t0 = time.perf_counter()
        inproc = train_fn_per_worker(worker_config(cfg, WorkerRun(tracking_uri=uri, run_id=run.run_id,
                                                                  out_dir=os.path.join(tmp, "in_process"))))
        wall = time.perf_counter() - t0
        run.end()
        split = _split(wall, [inproc])
        split["overhead_share"] = round((inproc["time_load_s"] + inproc["time_log_s"]) / wall, 3)
        numbers["in_process"] = split
        shared.clear_process_caches()

    t0 = time.perf_counter()
    numbers["ray"] = connect_ray("local")
    numbers["ray_init_s"] = round(time.perf_counter() - t0, 1)
    settings = {"torch_trainer": {"in_process": False, "share_frozen": False}, "shared": {}}
    for arm in [a for a in arms if a in settings]:
        wall, timers = _ray_arm(cfg, settings[arm], trials=args.trials, storage=os.path.join(tmp, "studies"),
                                target=target, experiment_id=exp, name=arm)
        numbers[arm] = {**_split(wall / args.trials, timers), "arm_wall_s": round(wall, 1),
                        "per_trial_train_s": [round(t.get("time_train_s", 0.0), 1) for t in timers],
                        "per_trial_load_s": [round(t.get("time_load_s", 0.0), 2) for t in timers],
                        "cache_levels_found": [t.get("frozen_cache_levels_found", 0.0) for t in timers]}
    for arm in settings:
        if arm in numbers and "in_process" in numbers:
            numbers[arm]["vs_in_process"] = round(numbers[arm]["trial_wall_s"] / numbers["in_process"]["trial_wall_s"], 3)
    numbers["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(numbers, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(numbers, f, indent=1)


if __name__ == "__main__":
    main()
