"""Cost of one training iteration: SAGE (warm-up phase; cyclic phase, reference sampling and fast path),
the reference ESD iteration (rollout recomputed every step, as ESD and AdvUnlearn do) and an AdvUnlearn
iteration, on the SD-1.4 shape (random weights) and on the bundled world, in one run.

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

from attack_cost import _build, _FixedDraw, _sync  # noqa: E402

PHASES = ("esd_reference", "advunlearn", "sage_warmup", "sage_cyclic_reference", "sage_cyclic_fast")
EXTRA_PHASES = ("sage_cyclic_fast_onepass", "sage_cyclic_fast_m2", "sage_cyclic_fast_m1")
"""Not run by default: the fast path with every student row in one UNet pass (``model.student_chunk_size`` large),
to compare time and peak memory with the default chunking (exact either way); the fast path with L_image on m = 2
or 1 of the Top-4 rows per step (``retain.retain_loss_rows``, an unbiased but noisier approximation)."""


def _time_parts(eraser) -> dict[str, float]:
    """Wrap the step's parts with wall-clock timers (seconds, accumulated, exclusive: a part called inside another,
    e.g. the encoder passes inside the attack, counts only for itself): the attack, text-encoder forward passes,
    the bank lookup, the student's UNet forward (grad enabled), the UNet backward and the encoder backward."""
    import functools

    import torch

    parts: dict[str, float] = {}
    children: list[float] = []  # time spent in nested timed parts, per open part (exclusive attribution)

    def timed(label, fn, when=lambda *a, **k: True):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if not when(*args, **kwargs):
                return fn(*args, **kwargs)
            _sync()  # on CUDA, queued work belongs to the part that queued it
            t0 = time.perf_counter()
            children.append(0.0)
            try:
                return fn(*args, **kwargs)
            finally:
                _sync()
                elapsed = time.perf_counter() - t0
                inner = children.pop()
                parts[label] = parts.get(label, 0.0) + elapsed - inner
                if children:
                    children[-1] += elapsed
        return wrapper

    eraser.attack = timed("attack", eraser.attack)
    # condition() goes through condition_groups(), which the step's gradient forward of τ_n calls directly
    eraser.conditioner.condition_groups = timed("text encoder forward", eraser.conditioner.condition_groups)
    eraser.student.eps = timed("student UNet forward", eraser.student.eps, lambda *a, **k: torch.is_grad_enabled())
    if eraser.bank is not None:
        eraser.bank.sample = timed("bank lookup (+ misses)", eraser.bank.sample)
    # chunked student pass: one Tensor.backward per chunk (UNet into the conditioning), then one
    # autograd.backward over a list (the text encoder); one-pass steps do both in total.backward()
    torch.Tensor.backward = timed("backward (student UNet; + encoder when one pass)", torch.Tensor.backward)
    torch.autograd.backward = timed("backward (text encoder)", torch.autograd.backward,
                                    lambda tensors, *a, **k: isinstance(tensors, (list, tuple)))
    return parts


def _phase(name: str, model: str, attack_steps: int, profile: bool, queue, device: str = "cpu") -> None:
    import torch

    from sage_dist.config import StudyConfig
    from sage_dist.models.load import frozen_dtype
    from sage_dist.retention.prompts import resolve_retain_prompts
    from sage_dist.train.step import Eraser

    pipe = _build(model)
    if device != "cpu":  # frozen parts in the engine's default dtype there (bf16 on CUDA); τ_n stays fp32
        pipe.to(torch.device(device), frozen_dtype("auto", torch.device(device)))
        torch.cuda.reset_peak_memory_stats()
    method = {"esd_reference": "esd", "advunlearn": "advunlearn"}.get(name, "sage")
    flat = {"model.model_id": "world" if model == "world" else "tiny-sd", "erase.method": method,
            "erase.warmup_steps": 5 if name == "sage_warmup" else 0, "optim.num_steps": 10,
            "attack.attack_steps": 1 if method == "advunlearn" else attack_steps,
            "erase.rollout_cache": name.startswith("sage_cyclic_fast")}
    if name == "sage_cyclic_fast_onepass":
        flat["model.student_chunk_size"] = 1000
    if name in ("sage_cyclic_fast_m2", "sage_cyclic_fast_m1"):
        flat["retain.retain_loss_rows"] = int(name[-1])
    if method == "advunlearn":
        flat.update({"retain.retain_batch_size": 5, "retain.retain_loss_weight": 0.3, "attack.reinit": "latest"})
    cfg = StudyConfig().replace_flat(flat)
    retain = resolve_retain_prompts("auto", model_id=cfg.model.model_id, erase_concepts=cfg.erase.erase_concept)
    eraser = Eraser(cfg, pipe, retain)
    fixed = _FixedDraw(eraser.sampler)
    mean_rollout = (eraser.sampler.ddim_steps - 1) / 2
    out: dict[str, float] = {}
    if not name.startswith("sage_cyclic_fast") and not (model == "sd14-shape" and name == "advunlearn"):
        # warm-up call (allocator, caches): measured cold, the SD-shape ESD step took ~5 s longer (32.7 vs 28.0 s),
        # which flattered every ratio to it. The fast phases warm up in their bank-filling step; AdvUnlearn's ~150 s
        # SD step is measured cold (its ratio is dominated by the J - 1 extrapolated attack steps).
        eraser.train_step(0)
    if name.startswith("sage_cyclic_fast"):
        # Fill the bank entries this step draws, then restore every state the step reads (RNGs, retain sampler,
        # encoder weights, Adam, attack prompts): the timed repeat draws the same entries and selects the same
        # top-k retain prompts, so the bank is warm for all of them (the marginal cost of a step).
        state = (eraser.generator.get_state(), eraser.shared_generator.get_state(), eraser.retain_sampler.state(),
                 copy.deepcopy(eraser.trainable_module.state_dict()), copy.deepcopy(eraser.optimizer.state_dict()),
                 copy.deepcopy(eraser.concepts))
        eraser.train_step(1)
        eraser.generator.set_state(state[0])
        eraser.shared_generator.set_state(state[1])
        eraser.retain_sampler.load_state(state[2])
        eraser.trainable_module.load_state_dict(state[3])
        eraser.optimizer.load_state_dict(state[4])
        eraser.concepts = state[5]
        out["bank_rows_when_filled"] = float(eraser.bank.num_ddim_rows)
    fixed.rollout_s, fixed.rollout_steps = 0.0, 0
    prof = None
    if profile:
        prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        prof.__enter__()
    parts = _time_parts(eraser) if profile else {}
    _sync()
    t0 = time.perf_counter()
    eraser.train_step(1)
    _sync()
    measured = time.perf_counter() - t0
    if parts:
        parts["rest"] = measured - sum(parts.values())
        out["parts"] = parts
    if eraser.bank is not None:
        out["bank_rows_when_timed"] = float(eraser.bank.num_ddim_rows) - out["bank_rows_when_filled"]
    if prof is not None:
        prof.__exit__(None, None, None)
        out["profile"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    extra = 0.0 if name.startswith("sage_cyclic_fast") else (mean_rollout - 1) * fixed.per_step()
    out.update(measured_seconds=measured, ddim_step_seconds=fixed.per_step(), expected_seconds=measured + extra)
    if method == "advunlearn":
        # one more outside-in attack step = its rollout + a frozen pass + forward/backward through the UNet
        attack_cfg = copy.deepcopy(cfg)
        from sage_dist.attack.outside_in import outside_in_attack

        state = eraser.concepts[cfg.erase.erase_concept[0]]
        fixed.rollout_s, fixed.rollout_steps = 0.0, 0
        _sync()
        t0 = time.perf_counter()
        outside_in_attack(eraser.conditioner, eraser.sampler, state.attack, state.cond, eraser.uncond(1),
                          attack_cfg.attack, start_guidance=cfg.erase.start_guidance, generator=eraser.generator,
                          max_norms=eraser.max_norms)
        _sync()
        step_s = time.perf_counter() - t0 + (mean_rollout - 1) * fixed.per_step()
        out["outside_in_step_expected_seconds"] = step_s
        out["expected_seconds"] += (attack_steps - 1) * step_s
    out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if device != "cpu":
        out["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["iterations_per_second"] = 1.0 / out["expected_seconds"]
    queue.put((name, out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="world,sd14-shape", help="comma list of world, sd14-shape, tiny-sd")
    parser.add_argument("--attack-steps", type=int, default=30, help="J (spec: 30)")
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma list of {PHASES + EXTRA_PHASES}")
    parser.add_argument("--profile", action="store_true", help="print a torch profiler table per phase")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (frozen UNet/VAE/encoders in bf16 there; "
                        "adds peak GPU memory and iterations per second)")
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    table: dict[str, dict[str, dict]] = {}
    for model in args.models.split(","):
        table[model] = {}
        for name in args.phases.split(","):
            queue = ctx.Queue()
            proc = ctx.Process(target=_phase, args=(name, model, args.attack_steps, args.profile, queue, args.device))
            proc.start()
            key, value = queue.get()
            proc.join()
            profile = value.pop("profile", None)
            parts = value.pop("parts", None)
            table[model][key] = value
            print(f"{model:10s} {key:22s} " + " ".join(f"{k}={v:.3f}" for k, v in value.items()), flush=True)
            if parts:
                total = sum(parts.values())
                print("  where the time goes: " + "; ".join(f"{k} {v:.2f} s ({100 * v / total:.0f}%)"
                                                          for k, v in sorted(parts.items(), key=lambda kv: -kv[1])))
                value["parts"] = parts
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
