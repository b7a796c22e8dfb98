"""``sage-dist``: erase a concept, generate side-by-side images, and the world / evaluation commands.

Examples (the bundled world is the default model)::

    sage-dist erase --concept triangle --out runs/triangle
    sage-dist erase --model CompVis/stable-diffusion-v1-4 --concept nudity --out runs/nudity \\
        --model.frozen_dtype=float16 --retain.retain_loss_weight=0.4
    sage-dist generate --text-encoder runs/triangle --prompt "a red striped triangle" --out grid.png
    sage-dist erase --concept triangle --out runs/t --print-config    # show every field and exit

Every config field can be overridden with ``--section.field=value`` (``--erase.negative_guidance=2.0``);
an unknown key or a bad value is an error naming the field and what is allowed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from pathlib import Path

from sage_dist.config import StudyConfig, parse_overrides

log = logging.getLogger("sage_dist")


def _add_erase(sub) -> None:
    p = sub.add_parser("erase", help="erase a concept from a model's text encoder (SAGE, ESD or AdvUnlearn)",
                       description="Train the text encoder to erase a concept. Extra --section.field=value "
                                   "arguments override any config field.")
    p.add_argument("--model", help="Hub id, local diffusers folder, 'world' (default) or 'tiny-sd'")
    p.add_argument("--concept", action="append", help="concept to erase (repeat for several)")
    p.add_argument("--method", choices=["sage", "esd", "advunlearn"])
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
    from sage_dist.presets import PRESETS, preset_for

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
    from sage_dist.train.loop import run_erasure

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


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="images for prompts with the original and an erased encoder, same seeds")
    p.add_argument("--model", default="world", help="Hub id, local folder, 'world' (default) or 'tiny-sd'")
    p.add_argument("--text-encoder", type=Path, help="folder written by `sage-dist erase` (omit: original only)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    p.add_argument("--prompt-file", type=Path, help="a TXT (one prompt a line) or CSV prompt file")
    p.add_argument("--seed", type=int, default=0, help="seed of the first prompt; prompt j uses seed + j")
    p.add_argument("--steps", type=int, help="inference steps (default: the model's; 50 for Hub models)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance (default: the model's; 7.5 for Hub models)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--out", type=Path, required=True, help="grid PNG path (rows: prompts; columns: original, erased)")
    p.set_defaults(func=_cmd_generate, accepts_overrides=False)


def _cmd_generate(args: argparse.Namespace) -> int:
    from sage_dist.generate import generate_side_by_side

    prompts = list(args.prompt)
    if args.prompt_file:
        from sage_dist.eval.prompts import load_prompts

        prompts += [r.prompt for r in load_prompts(args.prompt_file).records]
    if not prompts:
        raise SystemExit("sage-dist generate: give --prompt TEXT (repeatable) or --prompt-file FILE")
    path = generate_side_by_side(args.model, prompts, text_encoder=args.text_encoder, seed=args.seed,
                                 num_inference_steps=args.steps, guidance=args.guidance, device=args.device,
                                 out=args.out)
    print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sage-dist", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_erase(sub)
    _add_generate(sub)
    for module in ("sage_dist.world.commands", "sage_dist.eval.commands"):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise
            continue
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``sage-dist`` console script."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if extra and not getattr(args, "accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if getattr(args, "accepts_overrides", False):
            return int(args.func(args, extra) or 0)
        return int(args.func(args) or 0)
    except ValueError as err:
        if args.verbose:
            raise
        print(f"sage-dist {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
