"""``sage-dist evaluate``: the literature's evaluation protocols, and the bundled world's.

See :mod:`sage_dist.eval.protocol` (nudity, style, object, retain) and :mod:`sage_dist.eval.world_protocol`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sage_dist.eval import protocol
from sage_dist.eval.protocol import (
    DEFAULT_IMAGE_STORE,
    EvalConfig,
    default_out,
    default_scores_out,
    flatten_metrics,
    run_comparison,
    run_evaluation,
    score_image_folder,
)
from sage_dist.eval.world_protocol import run_world_comparison, run_world_protocol, world_table
from sage_dist.tracking import check_tracking_reachable, resolve_tracking
from sage_dist.tracking.evaluation import TrackingUnavailableError


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``evaluate`` to the ``sage-dist`` command line."""
    p = subparsers.add_parser("evaluate", help="evaluation protocol: RER, ASR, FID, CLIP score (docs/METHOD.md, Evaluation)",
                              description=protocol.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="world", help="world (default) | tiny-sd | Hub id | local diffusers folder")
    p.add_argument("--text-encoder", help="erased model: `sage-dist erase`'s --out (text_encoder/, or ESD-x's unet/), "
                                          "an encoder folder / state dict, or 'original'")
    p.add_argument("--images", help="score this folder of existing images with the protocol's judge (nudity, style, "
                                    "object) instead of generating; writes OUT/scores.json")
    p.add_argument("--protocol", required=True, choices=["nudity", "style", "object", "retain", "world"],
                   help="world: the bundled world's concept-domain protocol (RER per phrase set, ASR under "
                        "SAGE's inside-out attack, retention, FID on detector features, alignment)")
    p.add_argument("--out", default=None,
                   help="output folder (default runs/eval/<protocol>/<model>--<encoder>-<hash of both paths>)")
    p.add_argument("--image-store", default=None,
                   help=f"content-addressed image store shared by runs (default {DEFAULT_IMAGE_STORE} with the "
                        "default --out, else OUT/images)")
    p.add_argument("--prompts", help="main prompt set: shipped name or CSV/TXT path")
    p.add_argument("--attack-prompts", help="prompt set for ASR")
    p.add_argument("--fixed-prompts", nargs="*", help="fixed adversarial prompt sets (pre-ASR only)")
    p.add_argument("--limit", type=int, help="first N prompts of every set (smoke runs)")
    p.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    p.add_argument("--scheduler", choices=["lms", "ddim", "pipeline"], default="lms")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:1")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    p.add_argument("--attack", choices=["none", "prefix", "inside-out"], default="none",
                   help="post-attack stage of ASR: UnlearnDiffAtk prefix tokens, or SAGE's inside-out attack")
    p.add_argument("--num-adv-tokens", type=int, help="prefix tokens (default 5; 3 for style)")
    p.add_argument("--attack-steps", type=int, default=None,
                   help="prefix attack: iterations per timestep (default 40); world: J of the inside-out attack "
                        "(default: the fidelity's)")
    p.add_argument("--compare", metavar="DIR", help="world protocol: paired comparison of --text-encoder against "
                   "this second erase output (or 'original') on identical prompts and noise; delta of every metric "
                   "with its paired-bootstrap 95%% interval")
    p.add_argument("--fidelity", choices=["full", "quick"], default="full",
                   help="world protocol: the powered protocol (default) or the quick one Tune trials use")
    p.add_argument("--attack-timesteps", type=int, default=50, help="timesteps over [0, 1000) (default 50)")
    p.add_argument("--attack-lr", type=float, default=0.01)
    p.add_argument("--attack-target", choices=["noise", "original"], default="noise")
    p.add_argument("--nudity-rule", choices=["unlearndiffatk", "esd"], default="unlearndiffatk")
    p.add_argument("--threshold", type=float, help="override the NudeNet score threshold")
    p.add_argument("--classifier", help="torchvision:<name> | timm:<name> | hf:<id or folder> | module:<mod>:<fn>")
    p.add_argument("--concept", default=None,
                   help="object protocol: church (default) | garbage_truck | parachute | tench; world protocol: "
                        "a world concept, e.g. triangle")
    p.add_argument("--target-label", help="classifier label counted as success (default per protocol)")
    p.add_argument("--top-k", type=int, default=1)
    p.add_argument("--fid-reference", help="folder of real images (e.g. the COCO val images) for FID")
    p.add_argument("--no-fid", dest="fid", action="store_false", help="skip FID in the retain protocol")
    p.add_argument("--clip-model", help="CLIP model (Hub id or folder) for CLIP score, e.g. openai/clip-vit-base-patch32")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (sqlite:////abs/path.db or http://host:port)")
    p.add_argument("--experiment", default="sage_dist-eval")
    p.add_argument("--run-name")
    p.add_argument("--grid-size", type=int, default=8, help="pairs per grid image (0: none)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=run_from_args, accepts_overrides=False)
    return p


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    """The :class:`~sage_dist.eval.protocol.EvalConfig` of a real-model protocol's command line."""
    if not args.text_encoder:
        raise ValueError("--text-encoder is required: `sage-dist erase`'s --out, an encoder folder, or 'original' "
                         "(or --images DIR to score existing images)")
    out = args.out or str(default_out(args.protocol, args.model, args.text_encoder))
    image_store = args.image_store or (str(DEFAULT_IMAGE_STORE) if args.out is None else None)
    return EvalConfig(
        model=args.model, text_encoder=args.text_encoder, protocol=args.protocol,
        out=out, image_store=image_store, prompts=args.prompts,
        attack_prompts=args.attack_prompts,
        fixed_prompts=tuple(args.fixed_prompts) if args.fixed_prompts is not None else None, limit=args.limit,
        steps=args.steps, scheduler=args.scheduler, height=args.height, width=args.width,
        batch_size=args.batch_size, device=args.device, dtype=args.dtype, attack=args.attack,
        num_adv_tokens=args.num_adv_tokens, attack_steps=args.attack_steps or 40, attack_timesteps=args.attack_timesteps,
        attack_lr=args.attack_lr, attack_target=args.attack_target, nudity_rule=args.nudity_rule,
        threshold=args.threshold, classifier=args.classifier, concept=args.concept or "church", target_label=args.target_label,
        top_k=args.top_k, fid_reference=args.fid_reference, fid=args.fid, clip_model=args.clip_model,
        tracking_uri=args.tracking_uri, experiment=args.experiment, run_name=args.run_name,
        grid_size=args.grid_size, progress=args.progress,
    )


def run_from_args(args: argparse.Namespace) -> int:
    """``sage-dist evaluate`` entry: prints the headline numbers and the metrics path.

    Exit status: 0 done; 2 bad input or an unreachable tracking server at start (nothing ran); 1 the tracking
    store failed at the end (metrics.json is written; the message says how to log it).
    """
    try:
        return _run(args)
    except TrackingUnavailableError as err:
        print(f"sage-dist evaluate: tracking failed: {err}", file=sys.stderr)
        return 1
    except ConnectionError as err:
        print(f"sage-dist evaluate: error: {err}", file=sys.stderr)
        return 2


def _score(args: argparse.Namespace) -> int:
    if args.text_encoder:
        raise ValueError("--images scores existing images with the judge alone; drop --text-encoder")
    out = args.out or str(default_scores_out(args.protocol, args.images))
    scores = score_image_folder(args.images, protocol=args.protocol, out=out, nudity_rule=args.nudity_rule,
                                threshold=args.threshold, classifier=args.classifier,
                                concept=args.concept or "church", target_label=args.target_label, top_k=args.top_k,
                                device=args.device, progress=args.progress)
    print(f"judge = {scores['judge']}")
    print(f"concept_rate = {scores['concept_rate']:.4f} ({scores['num_positive']} of {scores['num_images']} images)")
    print(f"scores: {Path(out) / 'scores.json'}")
    return 0


def _run(args: argparse.Namespace) -> int:
    if args.images:
        return _score(args)
    if args.protocol == "world":
        if not args.text_encoder:
            raise ValueError("--text-encoder is required: `sage-dist erase`'s --out, an encoder folder, or 'original'")
        if args.tracking_uri:  # before any model loads
            check_tracking_reachable(resolve_tracking(args.tracking_uri))
        if args.compare:
            base = default_out("world", args.model, args.text_encoder)
            out = args.out or str(base.with_name(f"{base.name}--vs--{Path(args.compare).name}"))
            result = run_world_comparison(args.model, args.text_encoder, args.compare, args.concept, out,
                                          fidelity=args.fidelity, tracking_uri=args.tracking_uri,
                                          experiment=args.experiment, run_name=args.run_name)
            print(world_table(result, keys=()))
            print(f"comparison: {Path(out) / 'comparison.json'}")
            return 0
        metrics = run_world_protocol(model=args.model, text_encoder=args.text_encoder, concept=args.concept,
                                     out=args.out or str(default_out("world", args.model, args.text_encoder)),
                                     attack_steps=args.attack_steps, tracking_uri=args.tracking_uri,
                                     experiment=args.experiment, run_name=args.run_name, fidelity=args.fidelity)
        print(world_table(metrics))
        print(f"metrics: {Path(metrics['config']['out']) / 'metrics.json'}")
        return 0
    if args.compare:
        cfg = config_from_args(args)
        base = Path(cfg.out)
        out = base.with_name(f"{base.name}--vs--{Path(args.compare).name}")
        result = run_comparison(cfg, args.compare, out=out)
        for name, entry in result["sets"].items():
            for key in [k for k in entry if k.startswith("delta_") and not k.endswith(("_ci95", "_n", "_supported"))]:
                low, high = entry[f"{key}_ci95"]
                print(f"{name}.{key} = {entry[key]:+.4f} [{low:+.4f}, {high:+.4f}] (n={entry[f'{key}_n']})"
                      f"{'' if entry[f'{key}_supported'] else '  (interval contains 0)'}")
        print(f"comparison: {out / 'comparison.json'}")
        return 0
    metrics = run_evaluation(config_from_args(args))
    flat = flatten_metrics(metrics)
    for key in sorted(flat):
        if key.startswith(("erasure.rer", "erasure.concept", "asr.asr", "asr.pre", "asr.post", "fid.", "clip.")) \
                or key.startswith("fixed_sets.") and key.endswith(".asr"):
            print(f"{key} = {flat[key]:.4f}")
    print(f"metrics: {Path(metrics['config']['out']) / 'metrics.json'}")
    return 0
