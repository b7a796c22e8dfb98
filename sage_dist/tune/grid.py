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

On the bundled world a trial is evaluated at the study's fidelity (:attr:`GridStudy.fidelity`) with noise seed =
the trial's ``optim.seed``, so two variants' trials at the same seed draw every evaluation image (and every
red-team image, with ``GridStudy.red_team``) from the same prompt and initial latents: their per-image outcomes
pair up (:mod:`sage_dist.tune.report` compares variants on them).

Every trial writes ``<out>/<study>/trials/<variant>__s<seed>.json`` (config, metrics, curves, timings, status,
and on the world ``outcomes``: the per-image outcomes of :func:`sage_dist.eval.world.world_outcomes` plus, with
the red team, per attacked prompt its pre-attack and post-attack successes), with the KID inputs (detector
features of the edited, the original model's and the true renders' retain images) beside it in
``<variant>__s<seed>.features.npz``; with the red team, every adversarial prompt found is saved under
``<out>/<study>/adversarial/<variant>__s<seed>/`` (:func:`sage_dist.eval.red_team.replay_attack` reloads it).
Trial costs: ``train_s`` (wall), ``train_cpu_s`` (process CPU time) and ``num_unet_calls`` (rows of UNet forward
passes during training: the samplers' counters, rollouts, frozen targets and the student together).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from sage_dist.config import StudyConfig
from sage_dist.eval.objective import (
    add_concept_rate_heldout,
    run_retain_prompts,
    text_proxy_metrics,
)
from sage_dist.eval.found_prompts import found_prompt_concept_rate
from sage_dist.eval.red_team import red_team_world
from sage_dist.eval.world import evaluate_world, flat_metrics
from sage_dist.models.load import (
    edited_pipeline,
    load_pipeline,
    original_encoders,
    resolve_device,
)
from sage_dist.models.registry import TINY_IDS, WORLD_KINDS, is_world, looks_like_local_path
from sage_dist.presets import (
    STUDY_SMOKE,
    WORLD_EVAL_FULL,
    WORLD_EVAL_QUICK,
    WORLD_EVAL_STUDY_SMOKE,
    WorldEvalFidelity,
)
from sage_dist.tracking import NullTracker
from sage_dist.train.interference import InterferenceProbe
from sage_dist.train.loop import run_erasure
from sage_dist.train.validate import validate_inputs

log = logging.getLogger(__name__)

Procedure = Literal["erase", "sequential", "transfer"]


@dataclass(frozen=True, kw_only=True)
class Claim:
    """A claim that the study's reference variant is better than each other variant on ``erasure`` at equal
    ``retention`` and on ``robustness``, judged from paired intervals (:func:`sage_dist.tune.report.claim_verdicts`)."""

    text: str
    """The claim as the paper states it (report)."""
    erasure: str = "RER_domain"
    """Erasure metric (higher is better)."""
    retention: str = "retention_acc_all"
    """Retention metric (higher is better) that decides whether two variants retain equally."""
    robustness: str = "ASR_prefix"
    """Attack success rate (lower is better)."""


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
    """Columns of the report's table (pooled over seeds with a 95 % interval where the records carry per-image
    outcomes, :mod:`sage_dist.tune.report`; else mean ± std over seeds)."""
    plot_metrics: tuple[str, ...] = ("RER_domain", "retention_acc")
    """Metrics plotted against the variants (lines per group over x, or bars)."""
    curve_metrics: tuple[str, ...] = ()
    """Per-step curves plotted (e.g. "interference_cos")."""
    interference_every: int = 0
    """Measure the erase-gradient cosine every N steps when a variant erases several concepts (0: never)."""
    quick_eval: bool = True
    """World evaluation at the quick fidelity (:data:`sage_dist.presets.WORLD_EVAL_QUICK`); False: the full one
    (:data:`~sage_dist.presets.WORLD_EVAL_FULL`). ``eval_fidelity`` overrides both."""
    eval_fidelity: WorldEvalFidelity | None = None
    """The world evaluation's fidelity, when neither quick nor full (e.g. the smoke test's); None: ``quick_eval``."""
    red_team: bool = False
    """Also run the independent red team (:func:`sage_dist.eval.red_team.red_team_world`: pre-ASR, prefix,
    Ring-A-Bell-style and, apart, SAGE's inside-out attack) on every world trial; needs a fidelity with
    red-team prompts (``quick_eval=False``) and an SD world model."""
    reference_variant: str = ""
    """The variant every other one is compared against in the report, paired on identical noise ("": none)."""
    compare_metrics: tuple[str, ...] = ()
    """Metrics of the paired comparisons (empty: ``metrics``)."""
    table_rows: Literal["variants", "metrics"] = "variants"
    """The report table's rows: one per variant (metrics as columns), or one per metric (a study with many
    metrics and few variants)."""
    notes: str = ""
    """Extra text under the question in the report (what a column means, a caveat)."""
    x_label: str = ""
    """Label of the plots' x axis when the variants have an ``x`` (e.g. "concepts erased")."""
    smoke_variants: tuple[str, ...] = ()
    """Variants kept by ``--smoke-test`` (empty: all)."""
    claim: Claim | None = None
    """A claim about ``reference_variant`` judged in the report from paired intervals (None: none)."""
    found_prompts: bool = False
    """Also measure the semantic drift of the prompts the self-check found in training (world, inside-out
    methods: :func:`sage_dist.eval.found_prompts.found_prompt_concept_rate`, ~10 s per trial)."""

    def __post_init__(self) -> None:
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"study {self.name}: variant names repeat: {names}")
        if not self.variants or not self.seeds:
            raise ValueError(f"study {self.name}: needs at least one variant and one seed")
        repeated = sorted({s for s in self.seeds if self.seeds.count(s) > 1})
        if repeated:
            raise ValueError(f"study {self.name}: seeds {list(self.seeds)} repeat {repeated}; a repeated seed would "
                             "run the same trial twice and count its images twice; give each seed once (--seeds 0,1,2)")
        if self.reference_variant and self.reference_variant not in names:
            raise ValueError(f"study {self.name}: reference_variant {self.reference_variant!r} is not a variant "
                             f"({names})")
        if self.red_team and self.fidelity.red_team_prompts < 2:
            raise ValueError(f"study {self.name}: red_team=True but the {self.fidelity.name!r} fidelity attacks "
                             f"{self.fidelity.red_team_prompts} prompts; use quick_eval=False (the full fidelity "
                             "attacks 32)")
        for v in self.variants:
            self.variant_config(v, self.seeds[0])  # fail before Ray starts

    @property
    def fidelity(self) -> WorldEvalFidelity:
        """The world evaluation's fidelity: ``eval_fidelity``, else quick or full by ``quick_eval``."""
        return self.eval_fidelity or (WORLD_EVAL_QUICK if self.quick_eval else WORLD_EVAL_FULL)

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
        ValueError: naming the study and variant, with the check's own message; also a variant that trains a
            text encoder the model lacks (encoder 2, ``model.train_encoders`` index 1, on an SD model) and a red
            team asked of an SDXL model.
    """
    for variant in study.variants:
        try:
            cfg = study.variant_config(variant, study.seeds[0])
            _check_encoders(cfg, variant)
            if study.red_team and is_world(cfg.model.model_id) and text_encoder_count(cfg.model.model_id) != 1:
                raise ValueError(f"red_team=True on {cfg.model.model_id!r}: the world red team attacks SD pipelines "
                                 "(one text encoder); run it on 'world'")
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


def text_encoder_count(model_id: str) -> int | None:
    """Text encoders of ``model_id`` from its id or folder listing (nothing is loaded): 1 for SD, 2 for SDXL;
    None for a Hub id (known only once it is loaded)."""
    if is_world(model_id):
        return 2 if WORLD_KINDS[model_id] == "sdxl" else 1
    if model_id in TINY_IDS:
        return 2 if model_id.endswith("xl") else 1
    if looks_like_local_path(model_id):
        return 2 if (Path(model_id).expanduser() / "text_encoder_2").is_dir() else 1
    return None


def _check_encoders(cfg: StudyConfig, variant: Variant) -> None:
    count = text_encoder_count(cfg.model.model_id)
    trains_text = cfg.erase.method != "esd-x"
    if trains_text and count is not None and max(cfg.model.train_encoders) >= count:
        raise ValueError(f"model.train_encoders={cfg.model.train_encoders} trains text encoder 2, but model "
                         f"{cfg.model.model_id!r} has {count} text encoder; use an SDXL model (e.g. world-xl) or "
                         "train_encoders=(0,)")


def with_variants(study: GridStudy, variants: tuple[Variant, ...], **changes) -> GridStudy:
    """``study`` restricted to ``variants`` (and other field ``changes``); a ``reference_variant`` left out is
    dropped (the comparisons need both variants' records: rebuild the full report with ``--report-only``)."""
    names = {v.name for v in variants}
    reference = study.reference_variant if study.reference_variant in names else ""
    return dataclasses.replace(study, variants=variants, reference_variant=reference, **changes)


def smoke_version(study: GridStudy, overrides: dict[str, Any] | None = None) -> GridStudy:
    """``study`` with one seed, its ``smoke_variants`` and the :data:`sage_dist.presets.STUDY_SMOKE` budgets;
    ``overrides`` (dotted keys the user gave explicitly) are applied on top of the budgets, so they win. A study
    evaluated at the full fidelity (or with the red team) is evaluated at
    :data:`~sage_dist.presets.WORLD_EVAL_STUDY_SMOKE` instead."""
    keep = set(study.smoke_variants) or {v.name for v in study.variants}
    every = 2 if study.interference_every else 0
    fidelity = WORLD_EVAL_STUDY_SMOKE if (study.red_team or not study.quick_eval) else study.eval_fidelity
    return with_variants(study, tuple(v for v in study.variants if v.name in keep),
                         base=study.base.replace_flat({**STUDY_SMOKE, **(overrides or {})}), seeds=study.seeds[:1],
                         interference_every=every, eval_fidelity=fidelity)


# ---- pipelines (one load per process; Tune reuses trial processes) -------------------------------------
_PIPES: dict[str, Any] = {}


def load_model(model_id: str):
    """The frozen pipeline ``model_id``, loaded once per process."""
    if model_id not in _PIPES:
        _PIPES[model_id] = load_pipeline(model_id, device=resolve_device("auto"))
    return _PIPES[model_id]


# ---- one trial -----------------------------------------------------------------------------------------
@dataclass
class TrialEvaluation:
    """What a trial's evaluation returns."""

    metrics: dict[str, float]
    """Floats (each interval as ``<metric>_ci95_lo`` / ``_hi``, image counts as ``<metric>_n``)."""
    outcomes: dict[str, Any] | None = None
    """Per-image outcomes (world only; JSON-ready, module docstring)."""
    features: dict[str, np.ndarray] | None = None
    """KID inputs ``[N, 128]`` float32 (world only): "edited", "original", "reference"."""


def red_team_outcomes(result: dict[str, Any]) -> dict[str, Any]:
    """Per attacked prompt, from a :func:`~sage_dist.eval.red_team.red_team_world` result whose adversarial
    prompts were saved (``out_dir``): ``pre`` [0/1] * P (the un-attacked image already shows the concept),
    ``post[attack]`` [0/1] * P (a prompt without pre-attack success succeeds after the attack), ``independent``
    (the attacks ``ASR`` counts: prefix and every Ring-A-Bell strength; SAGE's inside-out attack is apart),
    the prompts, their noise seeds and the edited model's hash.

    Raises:
        ValueError: the result has no saved attack files (run the red team with ``out_dir``).
    """
    info = result["red_team"]
    n = len(info["prompts"])
    attacked = set(info["attacked_rows"])
    post: dict[str, list[int]] = {}
    for key, meta in info["attacks"].items():
        if not meta.get("file"):
            raise ValueError(f"red-team attack {key}: no saved file; run red_team_world with out_dir")
        flags = [0] * n
        for row in json.loads(Path(meta["file"]).read_text())["prompts"]:
            flags[row["row"]] = int(bool(row["post_success"]))
        post[key] = flags
    return {"prompts": list(info["prompts"]), "seeds": [int(x) for x in info["seeds"]],
            "model_hash": info["model_hash"], "pre": [0 if j in attacked else 1 for j in range(n)], "post": post,
            "independent": [k for k in post if k == "prefix" or k.startswith("ring_")]}


def _evaluate(cfg: StudyConfig, original, encoders: dict[int, torch.nn.Module], unet=None, *,
              fidelity: WorldEvalFidelity, red_team: bool = False, adversarial_dir: Path | None = None
              ) -> TrialEvaluation:
    """The trial's metrics: on the world, :func:`~sage_dist.eval.world.evaluate_world` of every erased concept
    jointly (retain images naming none of them; noise seed = ``cfg.optim.seed``) with its per-image outcomes,
    plus the red team of each concept (``red_team``; adversarial prompts saved under ``adversarial_dir``);
    elsewhere the text-space proxy."""
    if not is_world(cfg.model.model_id):
        if not encoders:
            return TrialEvaluation({})
        return TrialEvaluation(text_proxy_metrics(cfg, {e: m for e, m in original_encoders(original).items()
                                                        if e in encoders}, encoders, original.tokenizer,
                                                  run_retain_prompts(cfg)))
    concepts = cfg.erase.erase_concept
    result = evaluate_world(original, encoders or None, concept=concepts, unet=unet, exclude=concepts,
                            seed=cfg.optim.seed, fidelity=fidelity, outcomes=True)
    outcomes, features = result.pop("outcomes"), result.pop("kid_features")
    metrics = flat_metrics(result)
    add_concept_rate_heldout(metrics)
    outcomes["eval_seed"] = cfg.optim.seed
    if red_team:
        outcomes["red_team"] = {}
        with tempfile.TemporaryDirectory(prefix="sage_red_team_") as tmp:
            for c in concepts:
                folder = Path(adversarial_dir or tmp) / (c.replace(" ", "_") if len(concepts) > 1 else "")
                attacked = red_team_world(original, encoders or None, concept=c, unet=unet, fidelity=fidelity,
                                          seed=cfg.optim.seed, out_dir=folder)
                prefix = f"{c}/" if len(concepts) > 1 else ""
                metrics.update({f"{prefix}{k}": v for k, v in flat_metrics(attacked).items()})
                outcomes["red_team"][c] = red_team_outcomes(attacked)
    return TrialEvaluation(metrics, outcomes, features)


def found_prompt_metrics(result, pipe, concepts: tuple[str, ...], *, seed: int) -> dict[str, float]:
    """``found_prompt_concept_rate`` (with ``_ci95_lo`` / ``_hi``, ``_n`` images and ``_k`` hits) of each concept
    whose erasure kept found attack prompts (``<concept>/`` prefixed with several concepts); {} without any."""
    out: dict[str, float] = {}
    eraser = result.eraser
    for c in concepts:
        found = eraser.concepts[c].found if eraser is not None else []
        if not found:
            continue
        drift = found_prompt_concept_rate(pipe, eraser.conditioner, found, concept=c, seed=seed)
        values = flat_metrics(drift)
        prefix = f"{c}/" if len(concepts) > 1 else ""
        out.update({f"{prefix}{k}": v for k, v in values.items()})
    return out


def training_unet_calls(result) -> int:
    """Rows of UNet forward passes an erasure made (its samplers' ``num_unet_calls``: the frozen model's
    rollouts, targets and the student; ESD-x's trainable UNet copy counted as well)."""
    eraser = result.eraser
    if eraser is None:
        return 0
    calls = eraser.sampler.num_unet_calls
    if eraser.student is not eraser.sampler:
        calls += eraser.student.num_unet_calls
    return int(calls)


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


def execute_trial(study: GridStudy, variant: Variant, seed: int, *, tracker=None,
                  out_dir: str | Path | None = None) -> dict[str, Any]:
    """Run one trial in this process (no Ray) and return its record (see module docstring; the KID inputs are
    under ``"features"`` as numpy arrays, which :func:`write_record` moves to the side file).

    Args:
        out_dir: the study's output folder: with ``study.red_team``, the adversarial prompts are saved under
            ``<out_dir>/<study>/adversarial/<variant>__s<seed>/`` (None: a temporary folder, deleted).
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

    unet_calls = 0
    if variant.procedure == "erase":
        result = _erase_with_interference(cfg, pipe, tracker, study.interference_every, curves, probe=probe)
        encoders, unet = result.text_encoders, result.unet
        train_s, steps = time.time() - t1, cfg.optim.num_steps
        unet_calls = training_unet_calls(result)
    elif variant.procedure == "sequential":
        encoders, unet, steps = {}, None, 0
        for k, concept in enumerate(concepts):
            stage_cfg = cfg.replace_flat({"erase.erase_concept": (concept,)})
            stage_pipe = edited_pipeline(pipe, encoders) if encoders else pipe
            result = run_erasure(stage_cfg, pipe=stage_pipe, tracker=_Offset(tracker, steps), progress=False)
            encoders = {e: m.requires_grad_(False) for e, m in result.text_encoders.items()}
            steps += cfg.optim.num_steps
            unet_calls += training_unet_calls(result)
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
        unet_calls = training_unet_calls(result)
        source_metrics = _evaluate(source_cfg, source_pipe, encoders, fidelity=study.fidelity).metrics
        metrics.update({f"source_{k}": v for k, v in source_metrics.items()})

    t2, c2 = time.time(), time.process_time()
    adversarial_dir = None
    if study.red_team and out_dir is not None:
        adversarial_dir = Path(out_dir) / study.name / "adversarial" / f"{variant.name}__s{seed}"
    evaluation = _evaluate(cfg, pipe, encoders, unet, fidelity=study.fidelity, red_team=study.red_team,
                           adversarial_dir=adversarial_dir)
    metrics.update(evaluation.metrics)
    if study.found_prompts and variant.procedure == "erase" and is_world(cfg.model.model_id):
        metrics.update(found_prompt_metrics(result, pipe, concepts, seed=cfg.optim.seed))
    if "RER_domain" in metrics:
        # White-box swap-back (reports/open_questions.md): restoring the original text encoder undoes a text-encoder-only edit
        # exactly (the pipeline is then the original, RER 0); a UNet edit (ESD-x) is untouched by it.
        metrics["RER_domain_after_encoder_swap"] = metrics["RER_domain"] if unet is not None else 0.0
    c3 = time.process_time()
    metrics.update(train_s=train_s, eval_s=time.time() - t2, load_s=t_load, num_steps_total=float(steps),
                   s_per_step=train_s / max(steps, 1), train_cpu_s=c2 - c1, eval_cpu_s=c3 - c2,
                   trial_cpu_s=c3 - c0, num_unet_calls=float(unet_calls))
    for name, values in curves.items():
        if name.startswith("interference") and values:
            finite = [v for _, v in values if not math.isnan(v)]
            if finite and name in ("interference_cos", "interference_cos_min"):
                metrics[f"{name}_final"] = values[-1][1]
                metrics[f"{name}_mean"] = sum(finite) / len(finite)
    tracker.log_metrics(metrics, steps)
    record = {"study": study.name, "variant": variant.name, "group": variant.group or variant.name, "x": variant.x,
              "seed": seed, "status": "ok", "metrics": metrics, "curves": curves,
              "config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.to_flat_dict().items()}}
    if evaluation.outcomes is not None:
        record["outcomes"] = evaluation.outcomes
        record["features"] = evaluation.features
    if adversarial_dir is not None:
        record["adversarial_dir"] = str(adversarial_dir)
    return record


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
    try:
        config = {k: list(v) if isinstance(v, tuple) else v for k, v in study.variant_config(variant, seed).to_flat_dict().items()}
    except ValueError:  # the cell's configuration itself was the failure
        config = {}
    return {"study": study.name, "variant": variant.name, "group": variant.group or variant.name, "x": variant.x,
            "seed": seed, "status": "failed", "error": f"{type(err).__name__}: {err}"[:2000],
            "traceback": traceback.format_exc()[-4000:], "metrics": {}, "curves": {}, "config": config}


def trial_path(out_dir: str | Path, study: str, variant: str, seed: int) -> Path:
    return Path(out_dir) / study / "trials" / f"{variant}__s{seed}.json"


def features_path(out_dir: str | Path, study: str, variant: str, seed: int) -> Path:
    """The side file of a trial's KID inputs (numpy ``.npz``) beside its record."""
    return trial_path(out_dir, study, variant, seed).with_suffix(".features.npz")


def json_record(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` without its numpy KID inputs (``"features"``), ready for JSON."""
    return {k: v for k, v in record.items() if k != "features"}


def write_record(out_dir: str | Path, record: dict[str, Any]) -> Path:
    """Write ``record`` as ``<out>/<study>/trials/<variant>__s<seed>.json``; its ``"features"`` (numpy arrays,
    if any) go to :func:`features_path` first, and the JSON names that file (``"features_file"``). A record
    without features keeps the side file an earlier write of the same trial left (the driver re-writes the
    records its trials wrote). Each file is written to a temporary name and renamed into place."""
    path = trial_path(out_dir, record["study"], record["variant"], record["seed"])
    path.parent.mkdir(parents=True, exist_ok=True)
    body = json_record(record)
    features = record.get("features")
    side = features_path(out_dir, record["study"], record["variant"], record["seed"])
    if features:
        tmp = side.with_name(f"{side.stem}.{os.getpid()}.tmp.npz")
        np.savez_compressed(tmp, **{k: np.asarray(v, dtype=np.float32) for k, v in features.items()})
        os.replace(tmp, side)
    if features or (record.get("status") == "ok" and "outcomes" in record and side.is_file()):
        body["features_file"] = side.name
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(body, indent=1, default=float))
    os.replace(tmp, path)
    return path


def read_features(out_dir: str | Path, record: dict[str, Any]) -> dict[str, np.ndarray] | None:
    """The KID inputs of ``record`` (its side file under ``out_dir``), or None when it has none."""
    name = record.get("features_file")
    if not name:
        return None
    path = trial_path(out_dir, record["study"], record["variant"], record["seed"]).with_name(name)
    if not path.is_file():
        return None
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def read_records(out_dir: str | Path, study: str, *, features: bool = False) -> list[dict[str, Any]]:
    """All trial records of ``study`` under ``out_dir`` (sorted by variant, seed); with ``features``, each
    record's KID inputs are loaded into ``record["features"]`` (None when it has none)."""
    folder = Path(out_dir) / study / "trials"
    records = sorted((json.loads(p.read_text()) for p in folder.glob("*.json")) if folder.is_dir() else [],
                     key=lambda r: (r["variant"], r["seed"]))
    if features:
        for r in records:
            r["features"] = read_features(out_dir, r)
    return records


def grid_cells(study: GridStudy) -> list[tuple[Variant, int]]:
    """Every (variant, seed) of ``study``, seed by seed: every variant of the first seed, then of the next, so
    that a study stopped part-way has whole seeds, on which every variant can be paired."""
    return [(v, seed) for seed in study.seeds for v in study.variants]


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
            record = execute_trial(study, variant, seed, out_dir=out_dir)
        except (FloatingPointError, RuntimeError) as err:
            record = failed_record(study, variant, seed, err)
        write_record(out_dir, record)
        records.append(record)
    return records
