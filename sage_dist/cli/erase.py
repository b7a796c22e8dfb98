"""``sage-dist erase``: erase a concept from a model (SAGE, ESD, ESD-x or AdvUnlearn).

    sage-dist erase --concept triangle --out runs/triangle                 # the bundled world (default model)
    sage-dist erase --model CompVis/stable-diffusion-v1-4 --concept nudity --out runs/nudity \\
        --model.frozen_dtype=bfloat16 --retain.retain_loss_weight=0.4
    sage-dist erase --concept triangle --out runs/t --print-config          # every field, then exit
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sage_dist.config import StudyConfig, parse_overrides
from sage_dist.presets import PRESETS, preset_for
from sage_dist.train.loop import run_erasure


def register(sub) -> None:
    p = sub.add_parser("erase", help="erase a concept from a model's text encoder (SAGE, ESD or AdvUnlearn)",
                       description="Train the text encoder to erase a concept. Extra --section.field=value "
                                   "arguments override any config field.")
    p.add_argument("--model", help="Hub id, local diffusers folder, 'world' (default) or 'tiny-sd'")
    p.add_argument("--concept", action="append", help="concept to erase (repeat for several)")
    p.add_argument("--method", choices=["sage", "esd", "esd-x", "advunlearn"])
    p.add_argument("--steps", type=int, help="total training steps (optim.num_steps)")
    p.add_argument("--seed", type=int, help="optim.seed")
    p.add_argument("--out", required=True, type=Path, help="output folder (text_encoder/, record.json)")
    p.add_argument("--resume-from", type=Path, help="checkpoint folder to continue from")
    p.add_argument("--preset", choices=["auto", "world", "none"], default="auto",
                   help="per-model defaults applied before your flags (auto: 'world' for the bundled world, "
                        "'none' = the spec's SD v1.4 defaults otherwise; see sage_dist/presets.py)")
    p.add_argument("--print-config", action="store_true", help="print the effective config and exit")
    p.set_defaults(func=_cmd_erase, accepts_overrides=True)


def build_config(args: argparse.Namespace, overrides: list[str], base: StudyConfig | None = None) -> StudyConfig:
    """The effective config: ``base`` (default config), the model's preset, the named flags, dotted overrides."""
    cfg = base or StudyConfig()
    dotted = parse_overrides(overrides)
    model_id = getattr(args, "model", None) or dotted.get("model.model_id") or cfg.model.model_id
    preset = getattr(args, "preset", "auto")
    flat: dict[str, object] = dict(PRESETS[preset_for(model_id) if preset == "auto" else preset])
    if getattr(args, "model", None):
        flat["model.model_id"] = args.model
    if getattr(args, "concept", None):
        flat["erase.erase_concept"] = tuple(args.concept)
    if getattr(args, "method", None):
        flat["erase.method"] = args.method
    if getattr(args, "steps", None) is not None:
        flat["optim.num_steps"] = args.steps
    if getattr(args, "seed", None) is not None:
        flat["optim.seed"] = args.seed
    flat.update(dotted)
    return cfg.replace_flat(flat) if flat else cfg


def _cmd_erase(args: argparse.Namespace, overrides: list[str]) -> int:
    cfg = build_config(args, overrides)
    if args.print_config:
        print(json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in cfg.to_flat_dict().items()}, indent=1))
        return 0
    result = run_erasure(cfg, out_dir=args.out, resume_from=args.resume_from,
                         checkpoint_dir=args.out / "checkpoints")
    last = result.history[-1] if result.history else {}
    print(f"erased {', '.join(cfg.erase.erase_concept)} from {cfg.model.model_id} with {cfg.erase.method} in "
          f"{result.wall_time_s:.1f} s; final loss {last.get('loss', float('nan')):.4g}; saved to {result.out_dir}")
    return 0
