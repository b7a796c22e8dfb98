"""Cost of one training iteration: SAGE (warm-up phase; cyclic phase, reference sampling and fast path),
the reference ESD iteration (rollout recomputed every step, as ESD and AdvUnlearn do) and an AdvUnlearn
iteration, on the SD-1.4 shape (random weights) and on the bundled world, in one run. Issue 8 item 1.

    python benchmarks/iteration_cost.py                          # world + SD-1.4 shape (~15 min, 2 cores)
    python benchmarks/iteration_cost.py --models world           # seconds
    python benchmarks/iteration_cost.py --models world --profile # + torch profiler table per phase

Every phase runs in its own process (its own peak RSS). The rollout index is fixed to a one-step rollout;
the time of one DDIM step at that batch is measured in the same phase and the expected cost (mean rollout
length (S − 1)/2 = 24.5 steps) is measured + 23.5 x DDIM-step time. The fast path (``erase.rollout_cache``)
is timed with a warm bank: the step is run once (filling the bank), the RNG states are restored, and the
same step is timed again. AdvUnlearn's iteration is measured with a 1-step attack and J − 1 expected
outside-in steps are added (each: its own rollout, a frozen UNet pass and a UNet forward+backward).
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing as mp
import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from attack_cost import _build, _FixedDraw  # noqa: E402

PHASES = ("esd_reference", "advunlearn", "sage_warmup", "sage_cyclic_reference", "sage_cyclic_fast")


def _phase(name: str, model: str, attack_steps: int, profile: bool, queue) -> None:
    import torch

    from sage_dist.config import StudyConfig
    from sage_dist.retention.prompts import resolve_retain_prompts
    from sage_dist.train.step import Eraser

    pipe = _build(model)
    method = {"esd_reference": "esd", "advunlearn": "advunlearn"}.get(name, "sage")
    flat = {"model.model_id": "world" if model == "world" else "tiny-sd", "erase.method": method,
            "erase.warmup_steps": 5 if name == "sage_warmup" else 0, "optim.num_steps": 10,
            "attack.attack_steps": 1 if method == "advunlearn" else attack_steps,
            "erase.rollout_cache": name == "sage_cyclic_fast"}
    if method == "advunlearn":
        flat.update({"retain.retain_batch_size": 5, "retain.retain_loss_weight": 0.3, "attack.reinit": "latest"})
    cfg = StudyConfig().replace_flat(flat)
    retain = resolve_retain_prompts("auto", model_id=cfg.model.model_id, erase_concepts=cfg.erase.erase_concept)
    eraser = Eraser(cfg, pipe, retain)
    fixed = _FixedDraw(eraser.sampler)
    mean_rollout = (eraser.sampler.ddim_steps - 1) / 2
    out: dict[str, float] = {}
    if model != "sd14-shape":  # warm-up call (caches, allocations); negligible at SD scale
        eraser.train_step(0)
    if name == "sage_cyclic_fast":
        state = (eraser.generator.get_state(), eraser.shared_generator.get_state(), eraser.retain_sampler.state())
        eraser.train_step(1)  # fills the bank entries this step draws
        eraser.generator.set_state(state[0])
        eraser.shared_generator.set_state(state[1])
        eraser.retain_sampler.load_state(state[2])
    fixed.rollout_s, fixed.rollout_steps = 0.0, 0
    prof = None
    if profile:
        prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        prof.__enter__()
    t0 = time.perf_counter()
    eraser.train_step(1)
    measured = time.perf_counter() - t0
    if prof is not None:
        prof.__exit__(None, None, None)
        out["profile"] = prof.key_averages().table(sort_by="cpu_time_total", row_limit=12)
    extra = 0.0 if name == "sage_cyclic_fast" else (mean_rollout - 1) * fixed.per_step()
    out.update(measured_seconds=measured, ddim_step_seconds=fixed.per_step(), expected_seconds=measured + extra)
    if method == "advunlearn":
        # one more outside-in attack step = its rollout + a frozen pass + forward/backward through the UNet
        attack_cfg = copy.deepcopy(cfg)
        from sage_dist.attack.outside_in import outside_in_attack

        state = eraser.concepts[cfg.erase.erase_concept[0]]
        fixed.rollout_s, fixed.rollout_steps = 0.0, 0
        t0 = time.perf_counter()
        outside_in_attack(eraser.conditioner, eraser.sampler, state.attack, state.cond, eraser.uncond(1),
                          attack_cfg.attack, start_guidance=cfg.erase.start_guidance, generator=eraser.generator,
                          max_norms=eraser.max_norms)
        step_s = time.perf_counter() - t0 + (mean_rollout - 1) * fixed.per_step()
        out["outside_in_step_expected_seconds"] = step_s
        out["expected_seconds"] += (attack_steps - 1) * step_s
    out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    queue.put((name, out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="world,sd14-shape", help="comma list of world, sd14-shape, tiny-sd")
    parser.add_argument("--attack-steps", type=int, default=30, help="J (spec: 30)")
    parser.add_argument("--phases", default=",".join(PHASES))
    parser.add_argument("--profile", action="store_true", help="print a torch profiler table per phase")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    table: dict[str, dict[str, dict]] = {}
    for model in args.models.split(","):
        table[model] = {}
        for name in args.phases.split(","):
            queue = ctx.Queue()
            proc = ctx.Process(target=_phase, args=(name, model, args.attack_steps, args.profile, queue))
            proc.start()
            key, value = queue.get()
            proc.join()
            profile = value.pop("profile", None)
            table[model][key] = value
            print(f"{model:10s} {key:22s} " + " ".join(f"{k}={v:.3f}" for k, v in value.items()), flush=True)
            if profile:
                print(profile)
        ref = table[model].get("esd_reference", {}).get("expected_seconds")
        if ref:
            for key, value in table[model].items():
                print(f"{model:10s} {key:22s} {value['expected_seconds'] / ref:7.3f}x the reference ESD iteration")
    print(f"\nJ = {args.attack_steps}; targets: SAGE cyclic (fast) <= 0.25x ESD reference")
    if args.json:
        Path(args.json).write_text(json.dumps({"attack_steps": args.attack_steps, "results": table}, indent=1))


if __name__ == "__main__":
    main()
