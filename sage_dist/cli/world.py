"""``sage-dist world ...``: train the bundled world, its detector, measure its quality, ship its weights.

Examples::

    sage-dist world train --seed 0 --out runs/world --minutes 60          # the shipped recipe (CPU, 2 cores)
    sage-dist world train --seed 0 --out runs/world --resume              # continue from runs/world/ckpt
    sage-dist world quality --guidance 2.0                                # the shipped SD model
    sage-dist world evaluate --text-encoder runs/erase/text_encoder --concept triangle
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sage_dist.eval.world_quality import measure_quality
from sage_dist.world.detector import train_detector
from sage_dist.world.train import WorldTrainConfig, ship_weights, train_world


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train the world's VAE, SD model and SDXL twin from scratch (resumable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="output folder (checkpoints in OUT/ckpt, pipelines OUT/sd, OUT/sdxl)")
    p.add_argument("--minutes", type=float, default=60.0, help="SD phase wall-clock budget")
    p.add_argument("--steps", type=int, default=0, help="also stop the SD phase after this many steps (0: no limit)")
    p.add_argument("--twin-minutes", type=float, default=15.0, help="SDXL twin budget (0 with --twin-steps 0 skips it)")
    p.add_argument("--twin-steps", type=int, default=0)
    p.add_argument("--vae-steps", type=int, default=1500)
    p.add_argument("--num-images", type=int, default=40000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--checkpoint-minutes", type=float, default=4.0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--init-from", default="", help="fine-tune from a pipeline folder (skips the VAE phase)")
    p.add_argument("--twin-init-from", default="", help="fine-tune the twin from an SDXL pipeline folder")
    p.add_argument("--freeze-text-encoder", action="store_true", help="train only the SD UNet")
    p.add_argument("--min-snr-gamma", type=float, default=5.0, help="Min-SNR weighting (0: plain eps MSE)")
    p.add_argument("--focus-fraction", type=float, default=0.0, help="share of timesteps drawn from --focus-t-range")
    p.add_argument("--focus-t-range", type=int, nargs=2, default=(600, 1000))
    p.add_argument("--noise-schedule", default="cosine_zero_snr_v", choices=("cosine", "cosine_zero_snr_v"),
                   help="cosine_zero_snr_v (the shipped weights): zero terminal SNR, v-prediction, trailing DDIM "
                   "spacing; cosine: eps prediction, DDIM from t=951 (the first weights; textures follow the noise)")
    p.add_argument("--high-noise-weight-cap", type=float, default=0.0, help="weight eps loss by clamp(1/snr, 1, cap)")
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt")
    p.set_defaults(world_fn=_run_train)


def _run_train(args) -> int:
    cfg = WorldTrainConfig(
        seed=args.seed, minutes=args.minutes, steps=args.steps, twin_minutes=args.twin_minutes,
        twin_steps=args.twin_steps, vae_steps=args.vae_steps, num_images=args.num_images,
        batch_size=args.batch_size, lr=args.lr, checkpoint_minutes=args.checkpoint_minutes, device=args.device,
        init_from=args.init_from, train_text_encoder=not args.freeze_text_encoder, min_snr_gamma=args.min_snr_gamma,
        focus_fraction=args.focus_fraction, focus_t_range=tuple(args.focus_t_range),
        high_noise_weight_cap=args.high_noise_weight_cap, noise_schedule=args.noise_schedule,
        warmup_steps=args.warmup_steps, twin_init_from=args.twin_init_from,
    )
    summary = train_world(cfg, args.out, resume=args.resume)
    print(json.dumps(summary, indent=1))
    return 0


def _add_detector(sub) -> None:
    p = sub.add_parser("detector", help="train the world's shape/colour/texture detector")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=1500)
    p.set_defaults(world_fn=_run_detector)


def _run_detector(args) -> int:
    print(json.dumps(train_detector(args.out, seed=args.seed, steps=args.steps), indent=1))
    return 0


def _add_quality(sub) -> None:
    p = sub.add_parser("quality", help="measure the world model against the detector (the quality bar)")
    p.add_argument("--model", default="world", help='"world", "world-xl" (shipped weights) or a pipeline folder')
    p.add_argument("--guidance", type=float, nargs="+", default=None, help="one or more guidance scales")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default: world_config.json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images-per-prompt", type=int, default=1)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.set_defaults(world_fn=_run_quality)


def _run_quality(args) -> int:
    rows = measure_quality(args.model, guidances=args.guidance, num_inference_steps=args.steps, seed=args.seed,
                           num_images_per_prompt=args.images_per_prompt)
    text = json.dumps(rows, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text)
    return 0


def _add_ship(sub) -> None:
    p = sub.add_parser("ship", help="copy trained pipelines into sage_dist/world/weights as float16")
    p.add_argument("--from", dest="src", type=Path, required=True, help="the OUT folder of `world train`")
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--steps", type=int, default=20)
    p.set_defaults(world_fn=_run_ship)


def _run_ship(args) -> int:
    print(json.dumps(ship_weights(args.src, guidance=args.guidance, num_inference_steps=args.steps), indent=1))
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``world`` and its sub-commands to an argparse ``subparsers`` object; returns the ``world`` parser."""
    world = subparsers.add_parser("world", help="the bundled synthetic world: train, detector, quality, ship")
    sub = world.add_subparsers(dest="world_command", required=True)
    for add in (_add_train, _add_detector, _add_quality, _add_ship):
        add(sub)
    world.set_defaults(func=lambda args: args.world_fn(args))
    return world
