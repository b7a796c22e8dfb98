"""Command line of the search studies (``studies/tune_gamma.py``): options, config, the run, the printed summary.

A study file supplies ``config()`` and ``search_space(trial)`` (and optionally ``smoke(cfg)``) and calls
:func:`main`; the study itself is :func:`sage_dist.tune.search.run_search`. Options (:func:`build_parser`):
``--model``, ``--concept``, ``--num-samples``, ``--mode``, ``--tracking-uri``, ``--resume``, ``--smoke-test``,
``--ray-address``, ``--storage``, ``--max-concurrent``, ``--seed``, ``--objectives``, ``--rescore-budget``,
``--no-images``, ``--no-encoder-artifacts``, plus dotted config overrides such as ``--optim.num_steps=60``.

``--smoke-test`` shrinks the budget (the study's ``smoke`` function and ``smoke_samples`` trials) but never a
setting given explicitly: ``--model``, ``--concept``, ``--num-samples`` and every ``--section.field=value`` win
over it.

Exit status: 0 when the study ran to its end; 2 for bad input (the message names the field and the fix, and
nothing has started: no Ray, no MLflow run); 130 when it was interrupted (Ctrl+C, SIGTERM), after printing the
command that resumes it.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from typing import Any, Callable

from sage_dist.config import StudyConfig, parse_overrides
from sage_dist.tracking import resolve_tracking, ui_instructions
from sage_dist.tune.search import StudyOptions, StudyOutcome, locate_study, run_search
from sage_dist.tune.space import SearchSpaceFn

DEFAULT_RESCORE_BUDGET = 4
"""Trials re-scored at the full fidelity when ``--rescore-budget`` is not given (at most the study's trials)."""
INTERRUPTED_EXIT = 130
"""Exit status of an interrupted study (the shell's for SIGINT)."""


def build_parser(description: str, *, default_samples: int, smoke_samples: int = 2) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Any --section.field=value is a config override, e.g. --optim.num_steps=60.")
    p.add_argument("--smoke-test", action="store_true",
                   help=f"{smoke_samples} trials with the study's smoke budget (minutes); explicit options still win")
    p.add_argument("--model", default=None, help="world (default), world-xl, tiny-sd, a Hub id or a local folder")
    p.add_argument("--concept", default=None, help="concept(s) to erase, comma-separated (default: the study's)")
    p.add_argument("--num-samples", type=int, default=None,
                   help=f"number of trials (default {default_samples}; {smoke_samples} with --smoke-test)")
    p.add_argument("--mode", choices=("multi", "single"), default="multi",
                   help="multi: Pareto front of the two objectives; single: their single score (robust_score = "
                   "robust_erasure - retention_loss, or text_score for the text proxy) with ASHA early stopping")
    p.add_argument("--objectives", default="", metavar="erasure=M,retention=M",
                   help="the two metrics to optimise (directions are the metrics' own). Default on the bundled world: "
                   "erasure=robust_erasure,retention=retention_loss, where robust_erasure = 1 - ASR of the "
                   "UnlearnDiffAtk prefix attack on held-out paraphrases (pre + post) and retention_loss = "
                   "retention_acc_all_original - retention_acc_all on the held-out retain split (same noise). "
                   "Cheap text-space proxies (the only ones off the world): "
                   "erasure=text_erasure,retention=text_retention_drift. Others: RER_domain, RER_heldout, KID, "
                   "retention_acc, retention_drop, ...")
    p.add_argument("--rescore-budget", type=int, default=None, metavar="N",
                   help="at the end, re-score at most N trials (the quick front, then the trials tied with it) at the "
                   "full fidelity (red team included) on the same cluster; the final front is theirs. 0: off; "
                   f"must not exceed --num-samples (default {DEFAULT_RESCORE_BUDGET}, or the number of trials if smaller)")
    p.add_argument("--tracking-uri", default="", help="MLflow server (http://HOST:PORT) or sqlite:////abs.db; "
                   "default: $MLFLOW_TRACKING_URI, else sqlite under ~/.sage_dist/mlflow")
    p.add_argument("--resume", nargs="?", const="latest", default="",
                   help="continue a killed study: the newest matching one, or the folder name given")
    p.add_argument("--storage", default="", help="root folder of study outputs (default: $SAGE_DIST_STORAGE "
                   "or runs/studies)")
    p.add_argument("--ray-address", default="", help="'' joins a running cluster else starts one; 'local'; host:port")
    p.add_argument("--max-concurrent", type=int, default=0, help="trials at once (0: from cluster resources)")
    p.add_argument("--seed", type=int, default=0, help="Optuna sampler seed")
    p.add_argument("--no-images", action="store_true", help="skip the per-trial image grid")
    p.add_argument("--no-encoder-artifacts", action="store_true", help="do not upload erased encoders to MLflow")
    return p


def explicit_settings(args: argparse.Namespace, overrides: list[str]) -> dict[str, Any]:
    """The dotted config settings the user gave: ``--model``, ``--concept``, the ``--section.field=value``
    overrides (which win over the two flags), then ``--tracking-uri``.

    Raises:
        ValueError: a malformed override (an unknown key is found when the settings are applied).
    """
    flat: dict[str, Any] = {}
    if args.model:
        flat["model.model_id"] = args.model
    if args.concept:
        flat["erase.erase_concept"] = tuple(c.strip() for c in args.concept.split(",") if c.strip())
    flat.update(parse_overrides(overrides))
    if args.tracking_uri:
        flat["tracking.tracking_uri"] = args.tracking_uri
    return flat


def study_config(config: Callable[[], StudyConfig], explicit: dict[str, Any], *, smoke_test: bool,
                 smoke: Callable[[StudyConfig], StudyConfig] | None) -> StudyConfig:
    """The study's config with the user's settings; with ``smoke_test`` the ``smoke`` budget is applied to it
    and the user's settings again on top, so that they win.

    Raises:
        ValueError: an unknown field or a bad value (naming the field).
    """
    cfg = config().replace_flat(explicit)
    if smoke_test and smoke is not None:
        cfg = smoke(cfg).replace_flat(explicit)
    return cfg


def study_options(args: argparse.Namespace, *, name: str, default_samples: int, smoke_samples: int) -> StudyOptions:
    """:class:`StudyOptions` from the parsed options; ``--num-samples`` given explicitly wins over the smoke
    test's ``smoke_samples``; the default re-scoring budget shrinks to a smaller study (one given explicitly
    must fit: :class:`StudyOptions` refuses a budget above the number of trials)."""
    num_samples = args.num_samples
    if num_samples is None:
        num_samples = smoke_samples if args.smoke_test else default_samples
    rescore_budget = args.rescore_budget
    if rescore_budget is None:
        rescore_budget = min(DEFAULT_RESCORE_BUDGET, num_samples)
    return StudyOptions(name=name, num_samples=num_samples, mode=args.mode, resume=args.resume, storage=args.storage,
                        ray_address=args.ray_address, max_concurrent=args.max_concurrent, seed=args.seed,
                        objectives=args.objectives, rescore_budget=rescore_budget,
                        log_images=not args.no_images, log_encoder=not args.no_encoder_artifacts)


def resume_command(argv: list[str], study_name: str, program: str | None = None) -> str:
    """The command line that resumes ``study_name``: this run's ``argv`` without its ``--resume`` and with
    ``--resume study_name``."""
    kept, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg == "--resume":
            skip = i + 1 < len(argv) and not argv[i + 1].startswith("-")
            continue
        if arg.startswith("--resume="):
            continue
        kept.append(arg)
    program = program or f"python {sys.argv[0]}"
    return " ".join([program, *kept, "--resume", study_name])


def main(config: Callable[[], StudyConfig], search_space: SearchSpaceFn, argv: list[str] | None = None, *,
         name: str, default_samples: int = 12, description: str = "",
         smoke: Callable[[StudyConfig], StudyConfig] | None = None, smoke_samples: int = 2) -> StudyOutcome:
    """Parse ``argv`` (default ``sys.argv[1:]``), run the study, print its table and where to browse it.

    Returns the outcome when the study ran to its end. Exits with status 2 on bad input (before Ray or MLflow
    start) and :data:`INTERRUPTED_EXIT` when interrupted, after printing how to resume.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(description or name, default_samples=default_samples, smoke_samples=smoke_samples)
    args, rest = parser.parse_known_args(argv)
    if not logging.getLogger().handlers:  # the study script is the entry point: it configures logging
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = study_config(config, explicit_settings(args, rest), smoke_test=args.smoke_test, smoke=smoke)
        opts = study_options(args, name=name, default_samples=default_samples, smoke_samples=smoke_samples)
    except ValueError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    try:
        outcome = run_search(cfg, search_space, opts)
    except (ValueError, ConnectionError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    except KeyboardInterrupt as err:
        _print_interrupted(argv, _interrupted_study(opts, cfg), f"{type(err).__name__}")
        raise SystemExit(INTERRUPTED_EXIT) from err
    print(f"\n{outcome.table}\n")
    print(f"{outcome.front_table}\n")
    print(f"study folder: {outcome.study_dir}")
    print(f"wall time: {outcome.wall_time_s:.0f} s for {len(outcome.rows)} trials "
          f"(re-scoring {outcome.rescore_wall_time_s:.0f} s)")
    if outcome.registered_model:
        print(f"front's erased encoders: MLflow registered model {outcome.registered_model}")
    if outcome.tracking_error:
        print(f"MLflow: the results could not be logged ({outcome.tracking_error}); they are in the study folder")
    print(ui_instructions(resolve_tracking(cfg.tracking.tracking_uri), cfg.tracking.experiment_name,
                          outcome.experiment_id, outcome.parent_run_id))
    if outcome.interrupted:
        _print_interrupted(argv, outcome.study_dir.name, "stopped before all trials ended")
        raise SystemExit(INTERRUPTED_EXIT)
    return outcome


def _interrupted_study(opts: StudyOptions, cfg: StudyConfig) -> str:
    """The folder name of the study an interrupt stopped (the newest matching one; "latest" if none yet)."""
    try:
        return locate_study(dataclasses.replace(opts, resume=opts.resume or "latest"), cfg)[0].name
    except ValueError:
        return "latest"


def _print_interrupted(argv: list[str], study_name: str, why: str) -> None:
    print(f"\nstudy interrupted ({why}); the parent MLflow run is marked KILLED and finished trials are kept.\n"
          f"resume with: {resume_command(argv, study_name)}")
