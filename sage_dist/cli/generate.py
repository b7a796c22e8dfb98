"""``sage-dist generate``: images for prompts with the original and an erased encoder, at the same seeds.

    sage-dist generate --text-encoder runs/triangle --prompt "a red striped triangle" --out grid.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sage_dist.eval.generate import side_by_side
from sage_dist.models.load import (
    edited_pipeline,
    load_pipeline,
    load_text_encoders,
    original_encoders,
    resolve_device,
    text_encoder_files,
)
from sage_dist.models.registry import check_model_source, sampling_defaults
from sage_dist.prompts import load_prompts


def register(sub) -> None:
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
    prompts = list(args.prompt)
    if args.prompt_file:
        prompts += [r.prompt for r in load_prompts(args.prompt_file).records]
    if not prompts:
        raise ValueError("give --prompt TEXT (repeatable) or --prompt-file FILE")
    check_model_source(args.model)
    if args.text_encoder is not None:
        text_encoder_files(args.text_encoder)  # a bad folder fails before the model loads
    defaults = sampling_defaults(args.model)
    pipe = load_pipeline(args.model, device=resolve_device(args.device))
    edited = None
    if args.text_encoder is not None:
        edited = edited_pipeline(pipe, load_text_encoders(args.text_encoder, original_encoders(pipe)))
    grid = side_by_side(pipe, prompts, edited=edited, seed=args.seed,
                        num_inference_steps=args.steps or defaults.num_inference_steps,
                        guidance=defaults.guidance if args.guidance is None else args.guidance)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(args.out)
    print(f"wrote {args.out}")
    return 0
