"""Cost of SAGE's inside-out text attack vs AdvUnlearn's outside-in UNet attack, and of one SAGE vs one ESD
iteration, on an SD-v1.4-*shaped* model with random weights (CPU, fp32, batch 1, 64x64 latents).

    python benchmarks/attack_cost.py                 # SD-1.4 shape, ~10-15 min on 2 cores
    python benchmarks/attack_cost.py --model tiny-sd # seconds (smoke)

Each phase runs in its own process, so its peak RSS is its own. The outside-in attack and the iterations
need a partial DDIM rollout whose length is S − 1 − i for i ~ U{0..S−1} (mean 24.5 steps for S = 50).
Running that in full costs ~8 minutes per rollout on this CPU, so each phase is *measured* with the rollout
index fixed to give one DDIM step, the time of one DDIM step at that batch is measured in the same phase,
and the expected cost is reported as measured + (E[n] − 1) x DDIM-step time ("expected" columns). Both
numbers are printed; ratios use the expected costs (and the measured ones, for reference).

Two outside-in baselines: ``outside_in`` is AdvUnlearn's attack as implemented here and in AdvUnlearn's code
(a fresh rollout at every attack step); ``outside_in_one_rollout`` is one rollout and one
frozen target per attack, then J UNet forward+backward steps on it (its target: inside-out >= 150x cheaper).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _build(model: str):
    import torch

    torch.set_flush_denormal(True)
    from sage_dist.models.load import load_pipeline
    from sage_dist.models.tiny import build_sd14_shaped

    return build_sd14_shaped(0) if model == "sd14-shape" else load_pipeline(model)


def _sync() -> None:
    """Wait for queued CUDA work, so wall-clock timers measure it (no-op on CPU)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class _FixedDraw:
    """Wraps a DiffusionSampler: i fixed to S − 2 (a one-step rollout) and rollout time recorded."""

    def __init__(self, sampler):
        from sage_dist.models.sampler import RolloutDraw

        self.sampler, self.rollout_s, self.rollout_steps = sampler, 0.0, 0
        i = sampler.ddim_steps - 2
        t = sampler.num_train_timesteps * i // sampler.ddim_steps
        sampler.draw = lambda generator: RolloutDraw(i, t)
        original = sampler.rollout

        def timed(*args, **kwargs):
            _sync()
            t0 = time.perf_counter()
            out = original(*args, **kwargs)
            _sync()
            self.rollout_s += time.perf_counter() - t0
            self.rollout_steps += sampler.ddim_steps - 1 - args[2]
            return out

        sampler.rollout = timed

    def per_step(self) -> float:
        return self.rollout_s / max(self.rollout_steps, 1)


def _outside_in_one_rollout(tc, pipe, prompt, concept, norms, attack_steps: int, steps_run: int) -> dict[str, float]:
    """The outside-in attack with *one* rollout per attack (cheaper than AdvUnlearn, which
    re-draws z_t at every attack step): one partial DDIM rollout and one frozen target pass, then J steps of
    [τ_n(adversarial prompt) -> UNet forward -> loss -> gradient into the prompt tokens -> Adam]. ``steps_run``
    of the J steps are run and timed; the rollout runs one DDIM step and the mean rollout is extrapolated."""
    import torch

    from sage_dist.attack.prompt import optimise_tokens
    from sage_dist.losses import outside_in_loss
    from sage_dist.models.sampler import DiffusionSampler

    size = tc.resolution // pipe.vae_scale_factor
    sampler = DiffusionSampler(pipe.unet, pipe.scheduler.config, (pipe.unet.config.in_channels, size, size), 50)
    fixed = _FixedDraw(sampler)
    gen = torch.Generator().manual_seed(0)
    draw = sampler.draw(gen)
    t0 = time.perf_counter()
    z = sampler.rollout(concept, tc.uncond(1), draw.ddim_index, guidance=3.0, noise=sampler.initial_noise(1, gen))
    with torch.no_grad():
        eps_target = sampler.eps(z, draw.timestep, concept)
    setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    optimise_tokens(tc, prompt, lambda work: outside_in_loss(
        sampler.eps(z, draw.timestep, tc.condition(work.assemble(tc), trained=True)), eps_target),
        attack_steps=steps_run, attack_lr=1e-3, max_norms=norms)
    per_step = (time.perf_counter() - t0) / steps_run
    mean_rollout = (sampler.ddim_steps - 1) / 2
    expected = setup + (mean_rollout - 1) * fixed.per_step() + attack_steps * per_step
    return {"measured_steps": float(steps_run), "setup_seconds": setup, "ddim_step_seconds": fixed.per_step(),
            "seconds_per_attack_step": per_step, "expected_seconds": expected, "seconds": expected}


def _phase(name: str, model: str, attack_steps: int, outside_in_steps: int, queue) -> None:
    import torch

    from sage_dist.attack.inside_out import inside_out_attack
    from sage_dist.attack.outside_in import outside_in_attack
    from sage_dist.attack.prompt import build_attack_prompt, max_token_norms
    from sage_dist.config import AttackConfig, StudyConfig
    from sage_dist.models.sampler import DiffusionSampler
    from sage_dist.models.text import TextConditioner
    from sage_dist.train.step import Eraser

    pipe = _build(model)
    mean_rollout = (50 - 1) / 2
    out: dict[str, float] = {}
    if name in ("inside_out", "outside_in", "outside_in_one_rollout"):
        tc = TextConditioner(pipe)
        prompt = build_attack_prompt(tc, "nudity", template="a photo of {}")
        with torch.no_grad():
            concept = tc.condition(tc.embed(["nudity"]), trained=False)
        norms = max_token_norms(tc)
        if name == "inside_out":
            cfg = AttackConfig(attack_steps=attack_steps)
            # warm-up (first-call allocations): in training the attack runs every step, so the warm cost is the one
            # that counts
            inside_out_attack(tc, prompt, concept.features, AttackConfig(attack_steps=1), max_norms=norms)
            t0 = time.perf_counter()
            inside_out_attack(tc, prompt, concept.features, cfg, max_norms=norms)
            out["seconds"] = out["expected_seconds"] = time.perf_counter() - t0
        elif name == "outside_in_one_rollout":
            out.update(_outside_in_one_rollout(tc, pipe, prompt, concept, norms, attack_steps, outside_in_steps))
        else:
            size = tc.resolution // pipe.vae_scale_factor
            sampler = DiffusionSampler(pipe.unet, pipe.scheduler.config, (pipe.unet.config.in_channels, size, size), 50)
            fixed = _FixedDraw(sampler)
            uncond = tc.uncond(1)
            gen = torch.Generator().manual_seed(0)
            t0 = time.perf_counter()
            outside_in_attack(tc, sampler, prompt, concept, uncond, AttackConfig(attack_steps=outside_in_steps),
                              start_guidance=3.0, generator=gen, max_norms=norms)
            measured = time.perf_counter() - t0
            per_attack_step = measured / outside_in_steps + (mean_rollout - 1) * fixed.per_step()
            out.update(measured_steps=outside_in_steps, measured_seconds=measured, ddim_step_seconds=fixed.per_step(),
                       seconds_per_step_expected=per_attack_step, expected_seconds=per_attack_step * attack_steps,
                       seconds=measured / outside_in_steps * attack_steps)
    else:
        method = "sage" if name == "sage_iteration" else "esd"
        flat = {"model.model_id": "tiny-sd", "erase.method": method, "erase.warmup_steps": 0,
                "attack.attack_steps": attack_steps, "optim.num_steps": 4}
        cfg = StudyConfig().replace_flat(flat)
        from sage_dist.prompts import load_retain_prompts

        eraser = Eraser(cfg, pipe, load_retain_prompts("coco_object"))
        fixed = _FixedDraw(eraser.sampler)
        if model != "sd14-shape":  # warm-up (caches, first-call allocations); negligible at SD scale
            eraser.train_step(0)
        fixed.rollout_s, fixed.rollout_steps = 0.0, 0
        t0 = time.perf_counter()
        eraser.train_step(1)
        measured = time.perf_counter() - t0
        out.update(measured_seconds=measured, ddim_step_seconds=fixed.per_step(),
                   expected_seconds=measured + (mean_rollout - 1) * fixed.per_step(), seconds=measured)
    out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    queue.put((name, out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sd14-shape", help="'sd14-shape' (default), 'tiny-sd' or 'world'")
    parser.add_argument("--attack-steps", type=int, default=30, help="J of both attacks (spec: 30)")
    parser.add_argument("--outside-in-steps", type=int, default=1, help="outside-in steps actually run")
    parser.add_argument("--phases", default="inside_out,outside_in,outside_in_one_rollout,esd_iteration,sage_iteration")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    results: dict[str, dict[str, float]] = {}
    for name in args.phases.split(","):
        queue = ctx.Queue()
        proc = ctx.Process(target=_phase, args=(name, args.model, args.attack_steps, args.outside_in_steps, queue))
        proc.start()
        key, value = queue.get()
        proc.join()
        results[key] = value
        print(f"{key:16s} " + " ".join(f"{k}={v:.3f}" for k, v in value.items()), flush=True)
    print(f"\nmodel: {args.model} (random weights, fp32, CPU, batch 1), J = {args.attack_steps}")
    if "inside_out" in results and "outside_in" in results:
        r_exp = results["outside_in"]["expected_seconds"] / results["inside_out"]["seconds"]
        r_meas = results["outside_in"]["seconds"] / results["inside_out"]["seconds"]
        print(f"outside-in (AdvUnlearn: a rollout per step) / inside-out attack cost: {r_exp:.1f}x expected (mean "
              f"rollout), {r_meas:.1f}x with the one-step rollout actually run   [paper: 62.1x]")
    if "inside_out" in results and "outside_in_one_rollout" in results:
        r = results["outside_in_one_rollout"]["expected_seconds"] / results["inside_out"]["seconds"]
        print(f"outside-in with one rollout / inside-out attack cost: {r:.1f}x expected   [target: >= 150x; "
              "paper: 62.1x]")
    if "sage_iteration" in results and "esd_iteration" in results:
        r = results["sage_iteration"]["expected_seconds"] / results["esd_iteration"]["expected_seconds"]
        print(f"SAGE cyclic iteration / ESD iteration: {r:.2f}x expected")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"model": args.model, "attack_steps": args.attack_steps, "results": results}, fh, indent=1)


if __name__ == "__main__":
    main()
