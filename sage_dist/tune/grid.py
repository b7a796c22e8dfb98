"""Grid studies: a named set of variants x seeds, each trial one erasure plus its evaluation.

A study file (``studies/*.py``) describes its question as a :class:`GridStudy`: a base ``StudyConfig`` and
:class:`Variant` s (dotted overrides plus a procedure). This module runs one trial *without Ray*
(:func:`execute_trial`); :mod:`sage_dist.tune.grid_runner` runs the grids as Ray Tune experiments, and
:mod:`sage_dist.tune.report` turns the trial records into the Markdown report.

Procedures (generic; the library never branches on a study's name):

* ``"erase"``: one ``run_erasure`` of the variant's config (all its concepts jointly), then the edited pipeline
  (erased encoder(s), or the ESD-x UNet) is evaluated against the original.
* ``"sequential"``: the concepts are erased one after another, ``optim.num_steps`` steps each; stage k starts
  from (and keeps retention relative to) stage k-1's model.
* ``"transfer"``: the encoder is erased on ``source_model`` (slot 0), then put into slot 0 of the study model
  (e.g. the SD world's erased encoder inside its SDXL twin) and evaluated there and on the source.

With ``interference_every > 0`` and several concepts, the per-concept erase-gradient cosine
(:mod:`sage_dist.train.interference`) is measured every that many steps (and at the start and the end).

Every trial writes ``<out>/<study>/trials/<variant>__s<seed>.json`` (config, metrics, curves, timings, status).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from sage_dist.config import StudyConfig
from sage_dist.eval.objective import (
    evaluate_edit,
    run_retain_prompts,
    text_proxy_metrics,
)
from sage_dist.models.load import (
    edited_pipeline,
    load_pipeline,
    original_encoders,
    resolve_device,
)
from sage_dist.models.registry import is_world
from sage_dist.presets import STUDY_SMOKE
from sage_dist.tracking import NullTracker
from sage_dist.train.interference import InterferenceProbe
from sage_dist.train.loop import run_erasure
from sage_dist.train.validate import validate_inputs

log = logging.getLogger(__name__)

Procedure = Literal["erase", "sequential", "transfer"]


@dataclass(frozen=True, kw_only=True)
class Variant:
    """One cell of a study's grid (run once per seed)."""

    name: str
    """Short unique name, e.g. "joint-4" (file and MLflow run names)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Dotted config overrides applied to the study's base config, e.g. {"model.train_encoders": (1,)}."""
    procedure: Procedure = "erase"
    """How the trial runs (module docstring)."""
    group: str = ""
    """Series the variant belongs to in tables and plots (e.g. "joint" / "sequential"); "" = its name."""
    x: float | None = None
    """Position on the plot's x axis (e.g. the number of concepts); None plots bars per variant."""
    source_model: str = ""
    """``"transfer"`` only: the model the encoder is erased on (e.g. "world" for the world-xl study)."""
    steps_scale: int = 1
    """``optim.num_steps`` and ``erase.warmup_steps`` are multiplied by this (a joint round-robin erasure of N
    concepts with scale N gives each concept the base budget, like N sequential stages)."""

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or " " in self.name:
            raise ValueError(f"variant name {self.name!r}: use a short name without spaces or '/'")
        if self.steps_scale < 1:
            raise ValueError(f"variant {self.name}: steps_scale={self.steps_scale} must be >= 1")
        if self.procedure == "transfer" and not self.source_model:
            raise ValueError(f"variant {self.name}: procedure 'transfer' needs source_model (e.g. 'world')")

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "overrides": {k: list(v) if isinstance(v, tuple) else v
                                                          for k, v in self.overrides.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Variant":
        return cls(**{**d, "overrides": dict(d["overrides"])})


@dataclass(frozen=True, kw_only=True)
class GridStudy:
    """A study: a question answered by a grid of variants x seeds."""

    name: str
    """Study name (MLflow experiment ``open_questions/<name>``, output folder)."""
    question: str
    """The open question, one sentence (report heading)."""
    hypothesis: str = ""
    """What the study expects to see (report)."""
    base: StudyConfig
    """Configuration every variant starts from."""
    variants: tuple[Variant, ...]
    """The grid."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """``optim.seed`` values; every variant runs once per seed."""
    metrics: tuple[str, ...] = ("RER_domain", "RER_heldout", "retention_acc", "KID")
    """Columns of the report's table (mean ± std over seeds)."""
    plot_metrics: tuple[str, ...] = ("RER_domain", "retention_acc")
    """Metrics plotted against the variants (lines per group over x, or bars)."""
    curve_metrics: tuple[str, ...] = ()
    """Per-step curves plotted (e.g. "interference_cos")."""
    interference_every: int = 0
    """Measure the erase-gradient cosine every N steps when a variant erases several concepts (0: never)."""
    quick_eval: bool = True
    """Quick world evaluation (2 contexts per phrase, 18 retain prompts)."""
    notes: str = ""
    """Extra text under the question in the report (what a column means, a caveat)."""
    x_label: str = ""
    """Label of the plots' x axis when the variants have an ``x`` (e.g. "concepts erased")."""
    smoke_variants: tuple[str, ...] = ()
    """Variants kept by ``--smoke-test`` (empty: all)."""

    def __post_init__(self) -> None:
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"study {self.name}: variant names repeat: {names}")
        if not self.variants or not self.seeds:
            raise ValueError(f"study {self.name}: needs at least one variant and one seed")
        for v in self.variants:
            self.variant_config(v, self.seeds[0])  # fail before Ray starts

    def variant_config(self, variant: Variant, seed: int) -> StudyConfig:
        """The trial's config: base, then the variant's overrides, then the seed (validated)."""
        cfg = self.base.replace_flat({**variant.overrides, "optim.seed": seed})
        if variant.steps_scale == 1:
            return cfg
        return cfg.replace_flat({"optim.num_steps": cfg.optim.num_steps * variant.steps_scale,
                                 "erase.warmup_steps": cfg.erase.warmup_steps * variant.steps_scale})


def preflight(study: GridStudy) -> None:
    """Every variant's pre-flight checks (concepts, model source, retain set size) before anything starts.

    Raises:
        ValueError: naming the study and variant, with the check's own message.
    """
    for variant in study.variants:
        try:
            cfg = study.variant_config(variant, study.seeds[0])
            if variant.procedure == "sequential":  # one single-concept erasure per stage (execute_trial)
                runs = [cfg.replace_flat({"erase.erase_concept": (c,)}) for c in cfg.erase.erase_concept]
            elif variant.procedure == "transfer":  # erased on the source model, evaluated on this one
                runs = [cfg.replace_flat({"model.model_id": variant.source_model, "model.train_encoders": (0,)})]
            else:
                runs = [cfg]
            for run in runs:
                validate_inputs(run)
        except ValueError as err:
            raise ValueError(f"study {study.name}, variant {variant.name}: {err}") from err


def smoke_version(study: GridStudy, overrides: dict[str, Any] | None = None) -> GridStudy:
    """``study`` with one seed, its ``smoke_variants`` and the :data:`sage_dist.presets.STUDY_SMOKE` budgets;
    ``overrides`` (dotted keys the user gave explicitly) are applied on top of the budgets, so they win."""
    keep = set(study.smoke_variants) or {v.name for v in study.variants}
    every = 2 if study.interference_every else 0
    return dataclasses.replace(study, base=study.base.replace_flat({**STUDY_SMOKE, **(overrides or {})}),
                               seeds=study.seeds[:1], variants=tuple(v for v in study.variants if v.name in keep),
                               interference_every=every)


# ---- pipelines (one load per process; Tune reuses trial processes) -------------------------------------
_PIPES: dict[str, Any] = {}


def load_model(model_id: str):
    """The frozen pipeline ``model_id``, loaded once per process."""
    if model_id not in _PIPES:
        _PIPES[model_id] = load_pipeline(model_id, device=resolve_device("auto"))
    return _PIPES[model_id]


# ---- one trial -----------------------------------------------------------------------------------------
def _evaluate(cfg: StudyConfig, original, encoders: dict[int, torch.nn.Module], unet=None, *,
              quick: bool) -> dict[str, float]:
    if is_world(cfg.model.model_id):
        return evaluate_edit(cfg.model.model_id, concepts=cfg.erase.erase_concept, text_encoders=encoders, unet=unet,
                             seed=cfg.optim.seed, quick=quick)
    if not encoders:
        return {}
    return text_proxy_metrics(cfg, {e: m for e, m in original_encoders(original).items() if e in encoders},
                              encoders, original.tokenizer, run_retain_prompts(cfg))


def _erase_with_interference(cfg: StudyConfig, pipe, tracker, every: int, curves: dict, offset: int = 0,
                             probe=None):
    """``run_erasure`` of ``cfg`` on ``pipe``; with ``probe``, the interference cosine every ``every`` steps
    (from the loop's checkpoints) into ``curves`` and the tracker, steps shifted by ``offset``."""
    if probe is None or every <= 0:
        return run_erasure(cfg, pipe=pipe, tracker=tracker, progress=False)

    def record(step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            curves.setdefault(k, []).append((offset + step, v))
        tracker.log_metrics({k: v for k, v in values.items() if k.startswith("interference")}, offset + step)

    with tempfile.TemporaryDirectory(prefix="sage_interference_") as tmp:
        def on_checkpoint(done: int, folder: Path) -> None:
            probe.load(folder)
            record(done, probe.measure())

        cfg = cfg.replace_flat({"scaling.checkpoint_every": every})
        result = run_erasure(cfg, pipe=pipe, tracker=tracker, progress=False, checkpoint_dir=tmp,
                             on_checkpoint=on_checkpoint)
    probe.load(result.eraser.trainable_module.state_dict())
    record(cfg.optim.num_steps, probe.measure())
    return result


def execute_trial(study: GridStudy, variant: Variant, seed: int, *, tracker=None) -> dict[str, Any]:
    """Run one trial in this process (no Ray) and return its record (see module docstring).

    Raises:
        ValueError: bad config (before loading a model).
        FloatingPointError: a loss became NaN/inf.
    """
    tracker = tracker or NullTracker()
    torch.set_flush_denormal(True)
    cfg = study.variant_config(variant, seed)
    concepts = cfg.erase.erase_concept
    t0, c0 = time.time(), time.process_time()
    pipe = load_model(cfg.model.model_id)
    t_load = time.time() - t0
    curves: dict[str, list] = {}
    measure = study.interference_every > 0 and len(concepts) > 1
    probe = InterferenceProbe(cfg, pipe) if measure else None
    if probe is not None:
        probe.load(probe.eraser.trainable_module.state_dict())
        values = probe.measure()
        for k, v in values.items():
            curves.setdefault(k, []).append((0, v))
    metrics: dict[str, float] = {}
    t1, c1 = time.time(), time.process_time()

    if variant.procedure == "erase":
        result = _erase_with_interference(cfg, pipe, tracker, study.interference_every, curves, probe=probe)
        encoders, unet = result.text_encoders, result.unet
        train_s, steps = time.time() - t1, cfg.optim.num_steps
    elif variant.procedure == "sequential":
        encoders, unet, steps = {}, None, 0
        for k, concept in enumerate(concepts):
            stage_cfg = cfg.replace_flat({"erase.erase_concept": (concept,)})
            stage_pipe = edited_pipeline(pipe, encoders) if encoders else pipe
            result = run_erasure(stage_cfg, pipe=stage_pipe, tracker=_Offset(tracker, steps), progress=False)
            encoders = {e: m.requires_grad_(False) for e, m in result.text_encoders.items()}
            steps += cfg.optim.num_steps
            if probe is not None:
                probe.load({f"encoders.{e}.{n}": p for e, m in encoders.items() for n, p in m.state_dict().items()})
                values = probe.measure()
                for key, v in values.items():
                    curves.setdefault(key, []).append((steps, v))
                tracker.log_metrics({k: v for k, v in values.items() if k.startswith("interference")}, steps)
        train_s = time.time() - t1
    else:  # transfer
        source_cfg = cfg.replace_flat({"model.model_id": variant.source_model, "model.train_encoders": (0,)})
        source_pipe = load_model(variant.source_model)
        result = run_erasure(source_cfg, pipe=source_pipe, tracker=tracker, progress=False)
        encoders, unet = {0: result.text_encoders[0]}, None
        train_s, steps = time.time() - t1, source_cfg.optim.num_steps
        source_metrics = _evaluate(source_cfg, source_pipe, encoders, quick=study.quick_eval)
        metrics.update({f"source_{k}": v for k, v in source_metrics.items()})

    t2, c2 = time.time(), time.process_time()
    metrics.update(_evaluate(cfg, pipe, encoders, unet, quick=study.quick_eval))
    if "RER_domain" in metrics:
        # White-box swap-back (reports/open_questions.md): restoring the original text encoder undoes a text-encoder-only edit
        # exactly (the pipeline is then the original, RER 0); a UNet edit (ESD-x) is untouched by it.
        metrics["RER_domain_after_encoder_swap"] = metrics["RER_domain"] if unet is not None else 0.0
    c3 = time.process_time()
    metrics.update(train_s=train_s, eval_s=time.time() - t2, load_s=t_load, num_steps_total=float(steps),
                   s_per_step=train_s / max(steps, 1), train_cpu_s=c2 - c1, eval_cpu_s=c3 - c2,
                   trial_cpu_s=c3 - c0)
    for name, values in curves.items():
        if name.startswith("interference") and values:
            finite = [v for _, v in values if not math.isnan(v)]
            if finite and name in ("interference_cos", "interference_cos_min"):
                metrics[f"{name}_final"] = values[-1][1]
                metrics[f"{name}_mean"] = sum(finite) / len(finite)
    tracker.log_metrics(metrics, steps)
    return {"study": study.name, "variant": variant.name, "group": variant.group or variant.name, "x": variant.x,
            "seed": seed, "status": "ok", "metrics": metrics, "curves": curves,
            "config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.to_flat_dict().items()}}


class _Offset:
    """Tracker wrapper that shifts steps (sequential stages log one continuous curve)."""

    def __init__(self, tracker, offset: int):
        self.tracker, self.offset = tracker, offset

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.tracker.log_metrics(metrics, step + self.offset)

    def log_params(self, params: dict) -> None:
        self.tracker.log_params(params)


def failed_record(study: GridStudy, variant: Variant, seed: int, err: BaseException) -> dict[str, Any]:
    """The record of a trial that raised (kept in the report's counts)."""
    return {"study": study.name, "variant": variant.name, "group": variant.group or variant.name, "x": variant.x,
            "seed": seed, "status": "failed", "error": f"{type(err).__name__}: {err}"[:2000],
            "traceback": traceback.format_exc()[-4000:], "metrics": {}, "curves": {}}


def trial_path(out_dir: str | Path, study: str, variant: str, seed: int) -> Path:
    return Path(out_dir) / study / "trials" / f"{variant}__s{seed}.json"


def write_record(out_dir: str | Path, record: dict[str, Any]) -> Path:
    path = trial_path(out_dir, record["study"], record["variant"], record["seed"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, default=float))
    return path


def read_records(out_dir: str | Path, study: str) -> list[dict[str, Any]]:
    """All trial records of ``study`` under ``out_dir`` (sorted by variant, seed)."""
    folder = Path(out_dir) / study / "trials"
    return sorted((json.loads(p.read_text()) for p in folder.glob("*.json")) if folder.is_dir() else [],
                  key=lambda r: (r["variant"], r["seed"]))


def grid_cells(study: GridStudy) -> list[tuple[Variant, int]]:
    """Every (variant, seed) of ``study``, variants first."""
    return [(v, seed) for v in study.variants for seed in study.seeds]


def pending_cells(study: GridStudy, out_dir: str | Path) -> list[tuple[Variant, int]]:
    """The cells of ``study`` without an ``ok`` trial record under ``out_dir`` (what a resume runs)."""
    done = {(r["variant"], r["seed"]) for r in read_records(out_dir, study.name) if r["status"] == "ok"}
    return [(v, seed) for v, seed in grid_cells(study) if (v.name, seed) not in done]


def run_local(study: GridStudy, out_dir: str | Path, *, resume: bool = False) -> list[dict[str, Any]]:
    """Every trial of ``study`` one after another in this process (tests; no Ray, no MLflow), each record
    written as soon as the trial ends; ``resume`` skips the cells with an ``ok`` record. Returns the records of
    the trials run."""
    records = []
    for variant, seed in pending_cells(study, out_dir) if resume else grid_cells(study):
        try:
            record = execute_trial(study, variant, seed)
        except (FloatingPointError, RuntimeError) as err:
            record = failed_record(study, variant, seed, err)
        write_record(out_dir, record)
        records.append(record)
    return records
