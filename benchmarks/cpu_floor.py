"""How close the exact SAGE step is to this machine's limits : the UNet rows against peak fp32 GEMM
throughput, the inside-out attack against memory bandwidth, each measured in the same run.

    python benchmarks/cpu_floor.py                      # SD-1.4 shape (random weights), ~3 min on 2 cores
    python benchmarks/cpu_floor.py --model tiny-sd      # seconds (smoke)

Baselines (same process, same threads): a large fp32 matrix product (peak GFLOP/s) and a sum over 400 MB (memory
bandwidth). Measured: one chunk of student rows (``model.student_chunk_size`` rows, forward + backward into the
conditioning, the frozen UNet's weights without gradients), its FLOPs counted by ``torch.utils.flop_counter``;
and the J = 30 inside-out attack, whose weight traffic is counted from the encoder sizes (each step: τ_o and τ_n
forward, and both again backward, each pass reading every weight of the encoder's transformer once).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _best(fn, repeats: int) -> float:
    """Fastest of ``repeats`` timed calls after one warm-up call (seconds)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _count_cpu_flash_attention() -> None:
    """torch's FLOP counter knows the CUDA SDPA kernels but not the CPU flash kernels diffusers' SDPA attention
    runs here; count them with torch's own SDPA formulas (same argument order), or attention would count 0."""
    import torch
    from torch.utils import flop_counter

    aten = torch.ops.aten
    if aten._scaled_dot_product_flash_attention_for_cpu not in flop_counter.flop_registry:
        flop_counter.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu, get_raw=True)(
            flop_counter.sdpa_flop)
        flop_counter.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward, get_raw=True)(
            flop_counter.sdpa_backward_flop)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sd14-shape", help="sd14-shape (default) or tiny-sd")
    parser.add_argument("--rows", type=int, default=2, help="student rows per UNet pass (the SD chunk size: 2)")
    parser.add_argument("--attack-steps", type=int, default=30, help="J (spec: 30)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    import torch
    from attack_cost import _build
    from torch.utils.flop_counter import FlopCounterMode

    from sage_dist.attack.inside_out import inside_out_attack
    from sage_dist.attack.prompt import build_attack_prompt, max_token_norms
    from sage_dist.config import AttackConfig
    from sage_dist.models.text import TextConditioner, core_text_model

    out: dict[str, float] = {"threads": float(torch.get_num_threads())}
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    out["peak_gemm_gflops"] = 2 * 2048**3 / _best(lambda: a @ b, 3) / 1e9
    big = torch.randn(100_000_000)
    out["bandwidth_gbs"] = big.numel() * 4 / _best(big.sum, 3) / 1e9
    del big

    pipe = _build(args.model)
    unet = pipe.unet.requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    size = unet.config.sample_size
    z = torch.randn(args.rows, unet.config.in_channels, size, size, generator=gen)
    hidden = torch.randn(args.rows, 77, unet.config.cross_attention_dim, generator=gen)
    timesteps = torch.full((args.rows,), 500)

    def student_chunk():
        cond = hidden.clone().requires_grad_(True)
        unet(z, timesteps, encoder_hidden_states=cond).sample.pow(2).mean().backward()

    _count_cpu_flash_attention()
    counter = FlopCounterMode(display=False)
    with counter:
        student_chunk()
    seconds = _best(student_chunk, 2)
    by_op = counter.get_flop_counts().get("Global", {})
    attention = sum(v for k, v in by_op.items() if "attention" in str(k))
    out.update(unet_chunk_seconds=seconds, unet_chunk_gflop=counter.get_total_flops() / 1e9,
               unet_chunk_attention_gflop=attention / 1e9)
    out["unet_chunk_gflops"] = out["unet_chunk_gflop"] / seconds
    out["unet_chunk_fraction_of_peak"] = out["unet_chunk_gflops"] / out["peak_gemm_gflops"]

    tc = TextConditioner(pipe)
    prompt = build_attack_prompt(tc, "triangle", template="draw {}")
    with torch.no_grad():
        concept = tc.condition(tc.embed(["triangle"]), trained=False)
    cfg = AttackConfig(attack_steps=args.attack_steps)
    norms = max_token_norms(tc)
    attack_s = _best(lambda: inside_out_attack(tc, prompt, concept.features, cfg, max_norms=norms), 2)
    layers = core_text_model(pipe.text_encoder).encoder.layers
    weight_bytes = sum(p.numel() * p.element_size() for p in layers.parameters())
    streamed = 4 * weight_bytes * args.attack_steps  # τ_o and τ_n, forward and backward, per step
    out.update(attack_seconds=attack_s, attack_tokens=float(prompt.eot_index + 1),
               encoder_weight_mb=weight_bytes / 1e6, attack_streamed_gb=streamed / 1e9)
    out["attack_gbs"] = streamed / attack_s / 1e9
    out["attack_fraction_of_bandwidth"] = out["attack_gbs"] / out["bandwidth_gbs"]

    print(f"model {args.model}, {int(out['threads'])} threads")
    print(f"peak fp32 GEMM (2048^3): {out['peak_gemm_gflops']:.0f} GFLOP/s; memory bandwidth (sum of 400 MB): "
          f"{out['bandwidth_gbs']:.1f} GB/s")
    print(f"UNet student chunk ({args.rows} rows, forward + backward into the conditioning): "
          f"{seconds:.2f} s, {out['unet_chunk_gflop']:.0f} GFLOP (attention {out['unet_chunk_attention_gflop']:.0f}) "
          f"-> {out['unet_chunk_gflops']:.0f} GFLOP/s = "
          f"{out['unet_chunk_fraction_of_peak']:.2f}x peak GEMM")
    print(f"inside-out attack (J = {args.attack_steps}, {int(out['attack_tokens'])} tokens): {attack_s:.2f} s, "
          f"{out['attack_streamed_gb']:.1f} GB of encoder weights streamed -> {out['attack_gbs']:.1f} GB/s = "
          f"{out['attack_fraction_of_bandwidth']:.2f}x the sum() bandwidth")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "results": out}, indent=1))


if __name__ == "__main__":
    main()
