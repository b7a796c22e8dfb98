"""``sage-dist erase``: erase a concept from a model (SAGE, ESD, ESD-x or AdvUnlearn).

    sage-dist erase --concept triangle --out runs/triangle                 # the bundled world (default model)
    sage-dist erase --model CompVis/stable-diffusion-v1-4 --concept nudity --out runs/nudity \\
        --model.frozen_dtype=bfloat16 --retain.retain_loss_weight=0.4
    sage-dist erase --concept triangle --out runs/t --print-config          # every field, then exit
    sage-dist erase --model tiny-sd --concept cat --out runs/cat --steps 4 --erase.warmup_steps=2   # seconds, CPU

The rules for ``--out``, checkpoints, interrupts and tracking are in :data:`EPILOG` (``sage-dist erase --help``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from sage_dist.config import StudyConfig, TrackingConfig, parse_overrides
from sage_dist.files import ensure_writable_folder
from sage_dist.presets import PRESETS, method_preset, preset_for
from sage_dist.tracking import (
    BackgroundTracker,
    MlflowTracker,
    NullTracker,
    check_tracking_reachable,
    ensure_experiment,
    git_sha,
    limit_http_retries,
    resolve_tracking,
)
from sage_dist.train.checkpoint import (
    NO_SPACE,
    checkpoint_step,
    config_mismatch,
    latest_checkpoint,
)
from sage_dist.train.loop import OUTPUT_NAMES, TrainingInterrupted, run_erasure
from sage_dist.train.validate import validate_inputs

log = logging.getLogger(__name__)

AUTO_CHECKPOINT_INTERVAL_S = 600.0
"""Without ``--scaling.checkpoint_every``: a checkpoint after the first step that ends 10 minutes after the
start or the previous checkpoint, so a crash or a kill loses at most about 10 minutes of training."""
KEEP_CHECKPOINTS = 1
"""Checkpoints kept in ``OUT/checkpoints`` (each is written beside the previous one before that is deleted)."""
TRACKING_CLOSE_TIMEOUT_S = 30.0
"""At the end of a run, how long to keep retrying an MLflow server that stopped answering, seconds."""

EPILOG = """\
output folder (checked before any model loads):
  OUT must be a creatable, writable folder. It gets text_encoder/ (text_encoder_2/; ESD-x: unet/) and
  record.json, written into a staging folder and moved into place only when complete. An OUT that holds
  an earlier run's outputs is refused unless --overwrite is given; with it, they are replaced only at the
  end, after this run has trained and saved, so a failed run never destroys a finished one.

checkpoints (OUT/checkpoints/step_N, N completed steps; they resume bit for bit):
  default: one after the first step that ends 10 minutes after the start or the previous checkpoint, so
  runs shorter than 10 minutes write none; they are deleted once the run has saved its outputs.
  --scaling.checkpoint_every=N: every N steps instead, kept after the run; 0: none but on interrupt.
  Only the latest checkpoint is kept. Each is written into a temporary folder and renamed into place, so
  a full disk or a kill mid-write leaves the previous one intact.

interrupts:
  Ctrl-C (SIGINT) or SIGTERM ends the run after the current step with a checkpoint of the completed
  steps, prints the command that resumes it and exits with 128 + the signal number (130, 143). A second
  signal stops at once without saving. An OUT with checkpoints of an unfinished run must be resumed
  (--resume or --resume-from OUT/checkpoints/step_N, same settings) or started over (--overwrite).

tracking:
  --tracking.tracking_uri=http://HOST:PORT (an `mlflow server`) or sqlite:////abs/mlflow.db logs one run
  to experiment tracking.experiment_name: params (the flattened config), per-step metrics (every
  tracking.log_every steps), record.json and the encoder(s) as artifacts. The server is checked before
  any model loads; if it stops answering mid-run, records are kept and retried in the background, and
  the run trains, saves its outputs and ends with a warning. Without a URI nothing is logged.
"""


def register(sub) -> None:
    p = sub.add_parser("erase", help="erase a concept from a model's text encoder (SAGE, ESD or AdvUnlearn)",
                       description="Train the text encoder to erase a concept. Extra --section.field=value "
                                   "arguments override any config field.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="Hub id, local diffusers folder, 'world' (default) or 'tiny-sd'")
    p.add_argument("--concept", action="append", help="concept to erase (repeat for several)")
    p.add_argument("--method", choices=["sage", "esd", "esd-x", "advunlearn"])
    p.add_argument("--steps", type=int, help="total training steps (optim.num_steps)")
    p.add_argument("--seed", type=int, help="optim.seed")
    p.add_argument("--out", required=True, type=Path, help="output folder (text_encoder/, record.json, "
                                                          "checkpoints/)")
    resume = p.add_mutually_exclusive_group()
    resume.add_argument("--resume-from", type=Path, metavar="CHECKPOINT",
                        help="continue from this checkpoint folder (e.g. OUT/checkpoints/step_000400)")
    resume.add_argument("--resume", action="store_true",
                        help="continue from the latest checkpoint in OUT/checkpoints")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the earlier run's outputs in --out (only once this run has succeeded)")
    p.add_argument("--preset", choices=["auto", "world", "none"], default="auto",
                   help="per-model defaults applied before your flags (auto: 'world' for the bundled world, "
                        "the spec's SD v1.4 defaults otherwise), plus the method's published settings "
                        "(--method advunlearn: b_retain 5, retain_loss_weight 0.3, attack.reinit latest); "
                        "'none': the spec's defaults only; see sage_dist/presets.py")
    p.add_argument("--print-config", action="store_true", help="print the effective config and exit")
    p.set_defaults(func=_cmd_erase, accepts_overrides=True)


def _preset_layer(args: argparse.Namespace, dotted: dict[str, str], cfg: StudyConfig) -> dict[str, object]:
    """The model's preset, then the method's published settings (:data:`sage_dist.presets.METHOD_PRESETS`:
    ``--method advunlearn`` gets AdvUnlearn's b_retain 5, γt 0.3, ``attack.reinit=latest``); ``--preset none``
    turns both off (the spec's defaults). Explicit flags and overrides are applied after this layer."""
    model_id = getattr(args, "model", None) or dotted.get("model.model_id") or cfg.model.model_id
    preset = getattr(args, "preset", "auto")
    if preset == "none":
        return {}
    method = dotted.get("erase.method") or getattr(args, "method", None) or cfg.erase.method
    return {**PRESETS[preset_for(model_id) if preset == "auto" else preset], **method_preset(method)}


def build_config(args: argparse.Namespace, overrides: list[str], base: StudyConfig | None = None) -> StudyConfig:
    """The effective config: ``base`` (default config), the model's preset and the method's published settings
    (:func:`_preset_layer`), the named flags, dotted overrides (each later layer wins)."""
    cfg = base or StudyConfig()
    dotted = parse_overrides(overrides)
    flat = _preset_layer(args, dotted, cfg)
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


def checkpoint_policy(args: argparse.Namespace, overrides: list[str]) -> float | None:
    """``checkpoint_interval_s`` for :func:`run_erasure`: :data:`AUTO_CHECKPOINT_INTERVAL_S` unless
    ``scaling.checkpoint_every`` is given (by an override or the preset), which then rules alone."""
    dotted = parse_overrides(overrides)
    explicit = "scaling.checkpoint_every" in dotted or \
        "scaling.checkpoint_every" in _preset_layer(args, dotted, StudyConfig())
    return None if explicit else AUTO_CHECKPOINT_INTERVAL_S


@dataclass(frozen=True)
class OutFolder:
    """What an ``--out`` folder holds before the run."""

    path: Path
    outputs: tuple[str, ...]
    """The entries of :data:`OUTPUT_NAMES` present."""
    latest_checkpoint: Path | None
    """The latest complete checkpoint in ``OUT/checkpoints``."""

    @property
    def finished(self) -> bool:
        """``record.json`` with ``text_encoder/`` or ``unet/``: a run that saved its outputs."""
        return "record.json" in self.outputs and bool({"text_encoder", "unet"} & set(self.outputs))


def inspect_out(out: Path) -> OutFolder:
    """The outputs and checkpoints already in ``out``."""
    present = tuple(name for name in OUTPUT_NAMES if (out / name).exists())
    return OutFolder(out, present, latest_checkpoint(out / "checkpoints"))


def plan_out(args: argparse.Namespace, cfg: StudyConfig) -> Path | None:
    """Check ``--out`` and the resume flags before anything loads; returns the checkpoint to resume from.

    Raises:
        ValueError: ``--out`` cannot be created or written; it holds an earlier run's outputs and
            ``--overwrite`` is not given; it holds checkpoints of an unfinished run and neither a resume flag nor
            ``--overwrite`` is given; ``--resume`` finds no checkpoint; the checkpoint to resume from is not one,
            was written with other settings or already has ``optim.num_steps`` steps.
    """
    out: Path = args.out
    ensure_writable_folder(out, "--out")
    ensure_writable_folder(out / "checkpoints", "--out")
    state = inspect_out(out)
    if state.outputs and not args.overwrite:
        what = "a finished run" if state.finished else "outputs of an earlier run"
        raise ValueError(f"--out {out} holds {what} ({', '.join(state.outputs)}); pass --overwrite to replace it "
                         "once this run has trained and saved (it stays intact if this run fails), or choose "
                         "another --out")
    resume_from = args.resume_from
    if args.resume:
        if state.latest_checkpoint is None:
            raise ValueError(f"--resume: no checkpoint in {out / 'checkpoints'}; run without --resume to start "
                             "a new run")
        resume_from = state.latest_checkpoint
    if resume_from is None and state.latest_checkpoint is not None and not args.overwrite:
        latest = state.latest_checkpoint
        raise ValueError(f"--out {out} holds checkpoints of an unfinished run (latest: {latest}, "
                         f"{checkpoint_step(latest)} steps done); continue it with the same settings and --resume "
                         f"(or --resume-from {latest}), or start over with --overwrite")
    if resume_from is not None:
        diff = config_mismatch(resume_from, cfg)
        if diff:
            raise ValueError(f"--resume-from {resume_from} was written with other settings ({', '.join(diff)}); "
                             "resume with the settings of that run (see its state.json) or start a new run")
        done = checkpoint_step(resume_from)
        if done >= cfg.optim.num_steps:
            raise ValueError(f"--resume-from {resume_from} has {done} completed steps and optim.num_steps="
                             f"{cfg.optim.num_steps}: raise --steps to train on")
    return resume_from


def resume_command(argv: list[str], checkpoint: Path) -> str:
    """``argv`` (this command's arguments) with any resume flag replaced by ``--resume-from checkpoint``."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--resume-from":
            skip = True
        elif arg != "--resume" and not arg.startswith("--resume-from="):
            kept.append(arg)
    return shlex.join(["sage-dist", *kept, "--resume-from", str(checkpoint)])


class StopOnSignal:
    """SIGINT / SIGTERM become a stop request that the training loop polls after each step; a second signal
    raises ``KeyboardInterrupt`` (stop at once). Installed only in the main thread; the previous handlers come
    back on exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        """128 + the signal number (the shell's convention: 130 for SIGINT, 143 for SIGTERM)."""
        return 128 + (self.signum or signal.SIGINT)

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        # os.write: print() here could re-enter a stderr write that the signal interrupted
        os.write(2, f"\nsage-dist erase: {signal.Signals(signum).name} received: finishing the current step, then "
                    "saving a checkpoint (send it again to stop at once, without saving)\n".encode())


def start_tracking(cfg: StudyConfig, out: Path, resume_from: Path | None):
    """The run's tracker: a :class:`BackgroundTracker` on an MLflow run when ``tracking.tracking_uri`` is set
    (reused on resume: the run tagged with the output folder), else :class:`NullTracker` (with a warning
    when other ``tracking.*`` fields were set, since they are then ignored).

    Raises:
        ValueError: a malformed URI or an unwritable SQLite folder.
        ConnectionError: the server does not answer, or refuses to create the run.
    """
    if not cfg.tracking.tracking_uri:
        ignored = [f"tracking.{k}" for k in ("experiment_name", "log_every")
                   if getattr(cfg.tracking, k) != getattr(TrackingConfig(), k)]
        if ignored:
            log.warning("%s ignored: sage-dist erase logs to MLflow only with --tracking.tracking_uri",
                        ", ".join(ignored))
        return NullTracker()
    target = resolve_tracking(cfg.tracking.tracking_uri)
    check_tracking_reachable(target, flag="--tracking.tracking_uri", without="train without MLflow logging")
    limit_http_retries()
    key = f"erase:{out.resolve()}"
    tags = {"kind": "erase", "git_sha": git_sha(), "out": str(out.resolve()), "model": cfg.model.model_id,
            "concept": ",".join(cfg.erase.erase_concept), "method": cfg.erase.method}
    name = f"erase-{'+'.join(cfg.erase.erase_concept)}-{cfg.erase.method}"
    try:
        experiment_id = ensure_experiment(target, cfg.tracking.experiment_name)
        if resume_from is not None:
            run = MlflowTracker.find_or_start(target, experiment_id, key=key, run_name=name, tags=tags)
        else:
            run = MlflowTracker.start(target, experiment_id, run_name=name, tags={**tags, "sage_dist.key": key})
    except Exception as err:  # MLflow's own errors: the run cannot be logged, so nothing starts
        raise ConnectionError(f"MLflow {target.tracking_uri}: could not create a run in experiment "
                              f"{cfg.tracking.experiment_name!r} ({type(err).__name__}: {err})") from err
    tracker = BackgroundTracker(run)
    tracker.log_params(cfg.to_flat_dict())
    print(f"logging to MLflow {target.tracking_uri}, experiment {cfg.tracking.experiment_name!r}, run {run.run_id}")
    return tracker


def _finish_tracking(tracker, status: str, reason: str = "", timeout_s: float = TRACKING_CLOSE_TIMEOUT_S) -> bool:
    tracker.end(status, reason=reason)
    return tracker.close(timeout_s)


def _cmd_erase(args: argparse.Namespace, overrides: list[str]) -> int:
    cfg = build_config(args, overrides)
    if args.print_config:
        print(json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in cfg.to_flat_dict().items()}, indent=1))
        return 0
    out: Path = args.out
    interval = checkpoint_policy(args, overrides)
    resume_from = plan_out(args, cfg)
    if cfg.tracking.tracking_uri:
        validate_inputs(cfg)  # before the MLflow run exists: bad input never leaves a failed run behind
    tracker = start_tracking(cfg, out, resume_from)
    argv = getattr(args, "argv", None) or sys.argv[1:]
    checkpoints = out / "checkpoints"
    try:
        with StopOnSignal() as stop:
            result = run_erasure(cfg, out_dir=out, tracker=tracker, resume_from=resume_from,
                                 checkpoint_dir=checkpoints, checkpoint_interval_s=interval,
                                 keep_checkpoints=KEEP_CHECKPOINTS, stop_requested=stop.requested)
    except TrainingInterrupted as err:
        ckpt = err.checkpoint or resume_from
        if ckpt is not None:
            print(f"sage-dist erase: stopped after step {err.step} of {cfg.optim.num_steps}; checkpoint {ckpt}\n"
                  f"resume with: {resume_command(argv, ckpt)}", file=sys.stderr)
        else:
            print("sage-dist erase: stopped before the first step; nothing to save", file=sys.stderr)
        _finish_tracking(tracker, "KILLED", f"interrupted after step {err.step}", timeout_s=5.0)
        return stop.exit_code
    except KeyboardInterrupt:
        latest = latest_checkpoint(checkpoints)
        hint = f"; resume from the latest checkpoint with: {resume_command(argv, latest)}" if latest else ""
        print(f"sage-dist erase: stopped at once, without saving{hint}", file=sys.stderr)
        _finish_tracking(tracker, "KILLED", "stopped by a second interrupt", timeout_s=5.0)
        return stop.exit_code
    except BaseException as err:
        _finish_tracking(tracker, "FAILED", f"{type(err).__name__}: {err}", timeout_s=5.0)
        latest = latest_checkpoint(checkpoints)
        if isinstance(err, OSError) and err.errno in NO_SPACE and latest is not None:
            raise OSError(err.errno, f"{err.strerror}; resume from the latest checkpoint with: "
                                     f"{resume_command(argv, latest)}") from err
        raise
    for name in OUTPUT_NAMES:
        path = out / name
        if path.is_dir():
            tracker.log_artifacts(path, name)
        elif path.is_file():
            tracker.log_artifact(path)
    tracker.log_metrics({"wall_time_s": result.wall_time_s}, cfg.optim.num_steps)
    if interval is not None:  # automatic checkpoints only guard the run; its outputs supersede them
        shutil.rmtree(checkpoints, ignore_errors=True)
    elif checkpoints.is_dir() and not any(checkpoints.iterdir()):
        checkpoints.rmdir()
    try:
        logged = _finish_tracking(tracker, "FINISHED")
    except KeyboardInterrupt:
        logged = False
    last = result.history[-1] if result.history else {}
    note = "" if logged else " (MLflow logging incomplete: see the warning above)"
    print(f"erased {', '.join(cfg.erase.erase_concept)} from {cfg.model.model_id} with {cfg.erase.method} in "
          f"{result.wall_time_s:.1f} s; final loss {last.get('loss', float('nan')):.4g}; saved to {result.out_dir}"
          f"{note}")
    return 0
