"""Command line of the open-question studies (``studies/*.py`` and ``studies/open_questions.py``).

A study file defines ``study(model: str | None = None) -> GridStudy`` (optionally with a ``concept`` argument)
and calls :func:`main` with it; ``open_questions.py`` calls :func:`main` with several. Options:

* ``--smoke-test``: one seed, the study's smoke variants, :data:`sage_dist.presets.STUDY_SMOKE` budgets (seconds per
  trial); what is given explicitly wins over it (``--seeds``, ``--variants``, every ``--section.field=value``);
* ``--model``: the model to erase from (each study has its default: "world", or "world-xl" for the
  dual-encoder study); Hub ids / folders of SD v1.4 or SDXL run the same grids with the text-space proxy;
* ``--concept``: the concept of a study that takes one (e.g. ``studies/methods.py --concept red``);
* ``--tracking-uri``, ``--ray-address``, ``--cpus-per-trial``, ``--out``, ``--report``, ``--seeds``;
* ``--local``: run every trial one after another in this process, without Ray or MLflow (debugging, tests);
* ``--resume``: run only the trials without an ``ok`` record in ``--out`` (after an interrupt or failures);
* any ``--section.field=value``: a config override applied to every study's base config.

Bad input (an override, a seed list with a repeated seed, a variant's pre-flight check such as a text encoder the
model lacks, the tracking URI, an unwritable ``--out`` or report folder) stops the launch before Ray starts and
before any MLflow run exists (exit status 2). The report is always written from the trial records on disk
(per-image outcomes and KID side files included), so ``--report-only`` gives the same report; every trial also
logs its record to its MLflow run, and ``--report-only --from-mlflow`` rebuilds the report from the tracking
store alone (:mod:`sage_dist.tune.from_mlflow`). An interrupt
(Ctrl+C, SIGTERM) keeps the records of the trials that ended, marks the unfinished studies' parent runs KILLED
and prints the ``--resume`` command (exit status 130).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import logging
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from sage_dist.config import parse_overrides
from sage_dist.files import ensure_writable_folder
from sage_dist.tracking import check_tracking_reachable, resolve_tracking
from sage_dist.tune.from_mlflow import records_from_mlflow
from sage_dist.tune.grid import (
    GridStudy,
    grid_cells,
    preflight,
    read_records,
    run_local,
    smoke_version,
    with_variants,
)
from sage_dist.tune.grid_runner import RunSettings, launch
from sage_dist.tune.report import write_report

log = logging.getLogger(__name__)

StudyFn = Callable[..., GridStudy]


def build_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Any --section.field=value is a config override for every study.")
    p.add_argument("--smoke-test", action="store_true", help="tiny budgets, one seed (a few minutes in all)")
    p.add_argument("--model", default=None, help="model to erase from (default: each study's own, the world)")
    p.add_argument("--concept", default=None, help="concept of a study that takes one (default: the study's own)")
    p.add_argument("--tracking-uri", default="", help="MLflow server http://HOST:PORT or sqlite:////abs.db "
                   "(default: $MLFLOW_TRACKING_URI, else local SQLite under ~/.sage_dist/mlflow)")
    p.add_argument("--ray-address", default="", help="'' joins a running cluster else starts one; 'local'; host:port")
    p.add_argument("--cpus-per-trial", type=float, default=0.5, help="Ray CPUs per trial (fractions allowed)")
    p.add_argument("--out", default="", help="output folder (trial records, Tune experiments; default: "
                   "$SAGE_DIST_STORAGE/open_questions, else runs/open_questions)")
    p.add_argument("--report", default="", help="Markdown report path (default: <out>/<study>.md for one study, "
                   "else <out>/report.md)")
    p.add_argument("--seeds", default="", help="comma-separated seeds (default: each study's, 0,1,2)")
    p.add_argument("--variants", default="", help="comma-separated variant names to run (default: all); e.g. "
                   "re-run failed ones into the same --out, then --report-only")
    p.add_argument("--local", action="store_true", help="run trials one after another here, no Ray/MLflow")
    p.add_argument("--report-only", action="store_true", help="rewrite the report from the trial records under "
                   "--out (nothing runs)")
    p.add_argument("--resume", action="store_true", help="run only the trials without an ok record in --out (after "
                   "an interrupt or failed trials); the report covers every trial")
    p.add_argument("--from-mlflow", action="store_true", help="with --report-only: read the trial records from the "
                   "MLflow tracking store (--tracking-uri) instead of --out; cells without a record read missing")
    return p


def parse_seeds(text: str) -> tuple[int, ...]:
    """``"0,1,2"`` -> (0, 1, 2); "" -> () (each study's own seeds).

    Raises:
        ValueError: a value that is not an integer, or a repeated seed (it would run one trial twice and count
            its images twice in the pooled intervals).
    """
    try:
        seeds = tuple(int(s) for s in text.split(",") if s.strip()) if text else ()
    except ValueError as err:
        raise ValueError(f"--seeds {text!r}: give comma-separated integers, e.g. --seeds 0,1,2") from err
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise ValueError(f"--seeds {text!r} repeats {repeated}; give each seed once, e.g. --seeds 0,1,2")
    return seeds


def output_folder(out: str, default_out: str = "open_questions") -> Path:
    """The studies' output folder: ``--out`` if given, else ``$SAGE_DIST_STORAGE/<default_out>`` (``runs/`` when
    unset), absolute."""
    folder = Path(out or Path(os.environ.get("SAGE_DIST_STORAGE", "") or "runs") / default_out)
    return folder.expanduser().resolve()


def prepare(study_fns: list[StudyFn], argv: list[str] | None, description: str):
    """Parse ``argv`` and build the studies (validated, before Ray starts); returns ``(args, studies)``.

    ``--smoke-test`` applies the smoke budgets first; the explicit ``--section.field=value`` overrides,
    ``--tracking-uri``, ``--seeds`` and ``--variants`` are applied after it, so they win.

    Raises:
        ValueError: a bad override, a ``--variants`` name no study has, or a variant's failed pre-flight check.
    """
    args, rest = build_parser(description).parse_known_args(argv)
    explicit = parse_overrides(rest)
    if args.tracking_uri:
        explicit["tracking.tracking_uri"] = args.tracking_uri
    seeds = parse_seeds(args.seeds)
    wanted = {v.strip() for v in args.variants.split(",") if v.strip()}
    studies, known = [], set()
    for fn in study_fns:
        kwargs = {"model": args.model} if args.model else {}
        if args.concept:
            if "concept" not in inspect.signature(fn).parameters:
                raise ValueError(f"--concept {args.concept!r}: study {fn.__module__} takes no concept argument")
            kwargs["concept"] = args.concept
        study = fn(**kwargs)
        known |= {v.name for v in study.variants}
        if wanted:
            chosen = tuple(v for v in study.variants if v.name in wanted)
            if not chosen:
                continue
            # the chosen variants run under --smoke-test too, whatever the study's smoke variants are
            study = with_variants(study, chosen, smoke_variants=tuple(v.name for v in chosen))
        study = smoke_version(study, explicit) if args.smoke_test else dataclasses.replace(
            study, base=study.base.replace_flat(explicit))
        if seeds:
            study = dataclasses.replace(study, seeds=seeds)
        preflight(study)
        studies.append(study)
    if wanted - known:
        raise ValueError(f"--variants {sorted(wanted - known)}: no such variant; the studies have {sorted(known)}")
    return args, studies


def main(study_fns: StudyFn | list[StudyFn], argv: list[str] | None = None, *, description: str = "",
         title: str = "Open questions", default_report: str = "", default_out: str = "open_questions",
         experiment_prefix: str = "open_questions.", command_argv: list[str] | None = None) -> Path:
    """Run the studies (concurrently on Ray, or ``--local``), then write the report; returns its path.

    Exits with status 2 on bad input (before Ray or MLflow start) and 130 when interrupted, after printing the
    command that resumes the launch: the script with ``command_argv`` (default ``argv``: a launcher that takes
    options of its own before passing the rest here gives its whole command line) and ``--resume``.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    fns = study_fns if isinstance(study_fns, list) else [study_fns]
    parser = build_parser(description)
    try:
        args, studies = prepare(fns, argv, description)
        out_dir = output_folder(args.out, default_out)
        # studies sharing an output folder (the claims, the open questions) keep one report each
        report = Path(args.report or default_report
                      or out_dir / (f"{studies[0].name}.md" if len(studies) == 1 else "report.md"))
        if args.from_mlflow and not args.report_only:
            raise ValueError("--from-mlflow reads a finished study's records: use it with --report-only")
        if args.report_only and args.from_mlflow:
            return _report_from_mlflow(studies, args.tracking_uri, experiment_prefix, report, title)
        if args.report_only:
            return _rewrite_report(studies, out_dir, report, title)
        ensure_writable_folder(report.resolve().parent, "--report folder")
        settings = RunSettings(out_dir=str(out_dir), tracking_uri=args.tracking_uri, ray_address=args.ray_address,
                               cpus_per_trial=args.cpus_per_trial, experiment_prefix=experiment_prefix)
        if args.local:
            ensure_writable_folder(out_dir, "--out")
    except (ValueError, ConnectionError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    t0 = time.time()
    try:
        if args.local:
            records = {s.name: run_local(s, out_dir, resume=args.resume) for s in studies}
        else:
            records = launch(studies, settings, resume=args.resume)
    except (ValueError, ConnectionError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    except KeyboardInterrupt as err:
        given = argv if command_argv is None else command_argv
        command = shlex.join(["python", sys.argv[0], *[a for a in given if a != "--resume"], "--resume"])
        print(f"\nstudies interrupted ({type(err).__name__}); the records of the trials that ended are in {out_dir}, "
              f"the unfinished studies' parent MLflow runs are marked KILLED.\nresume with: {command}")
        raise SystemExit(130) from err
    wall = time.time() - t0
    ran = sum(len(r) for r in records.values())
    # the report reads the records back from disk (with their KID side files); after --resume it covers every
    # cell of the grids, those run before included
    records = {s.name: _grid_records(s, out_dir) for s in studies}
    trials = sum(len(r) for r in records.values())
    preamble = (f"Generated by `{' '.join(['python', sys.argv[0], *argv])}`"
                f"{' (smoke test: budgets too small for the numbers to mean anything)' if args.smoke_test else ''}. "
                f"{len(studies)} studies, {trials} trials, wall time {wall / 60:.1f} min for {ran} trials "
                f"{'(this resumed run) ' if args.resume else ''}"
                f"({'in-process' if args.local else f'Ray, {args.cpus_per_trial:g} CPU per trial'}).")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "run_summary.json").write_text(json.dumps({"preamble": preamble, "wall_s": wall, "trials": trials,
                                                          "trials_run": ran}))
    path = write_report(studies, records, report, title=title, preamble=preamble)
    print(f"report: {path}\ntrial records: {out_dir}\nwall time: {wall:.0f} s for {ran} trials")
    return path


def _grid_records(study: GridStudy, out_dir: Path) -> list[dict]:
    """The records under ``out_dir`` of the cells of ``study``'s grid."""
    cells = {(v.name, seed) for v, seed in grid_cells(study)}
    return [r for r in read_records(out_dir, study.name, features=True) if (r["variant"], r["seed"]) in cells]


def _report_from_mlflow(studies: list[GridStudy], tracking_uri: str, experiment_prefix: str, report: Path,
                        title: str) -> Path:
    """``--report-only --from-mlflow``: the report from the records the trials logged to MLflow."""
    ensure_writable_folder(report.resolve().parent, "--report folder")
    check_tracking_reachable(resolve_tracking(tracking_uri))
    with tempfile.TemporaryDirectory(prefix="sage_report_from_mlflow_") as tmp:
        found = [records_from_mlflow(s, tracking_uri, experiment_prefix + s.name, tmp) for s in studies]
        if not any(f.found for f in found):
            raise ValueError(f"none of the experiments {[f.experiment for f in found]} exists at "
                             f"{tracking_uri or 'the local store'}: give the --tracking-uri the studies logged to")
        records = {s.name: _grid_records(s, Path(tmp)) for s in studies}
        sources = "; ".join(f"experiment `{f.experiment}`: " + (f"{f.runs} trial runs, {f.without_record} without a "
                            f"record, {f.other_config} of another configuration" if f.found else "not found")
                            for f in found)
        preamble = (f"Rebuilt from MLflow alone by `{' '.join(['python', sys.argv[0], *sys.argv[1:]])}` "
                    f"({tracking_uri or 'local store'}; {sources}).")
        path = write_report(studies, records, report, title=title, preamble=preamble)
    print(f"report: {path} (rebuilt from {sum(len(r) for r in records.values())} trial records in MLflow)")
    return path


def _rewrite_report(studies: list[GridStudy], out_dir: Path, report: Path, title: str) -> Path:
    """``--report-only``: the report from the trial records under ``out_dir`` and the saved preamble."""
    records = {s.name: read_records(out_dir, s.name, features=True) for s in studies}
    summary = out_dir / "run_summary.json"
    preamble = json.loads(summary.read_text())["preamble"] if summary.is_file() else ""
    path = write_report(studies, records, report, title=title, preamble=preamble)
    print(f"report: {path} (rewritten from {sum(len(r) for r in records.values())} trial records in {out_dir})")
    return path
