"""Re-scoring a study's best trials at the full fidelity, in parallel Ray tasks on the study's own cluster.

A trial is scored at the quick fidelity while the study runs. At its end, :func:`rescore` evaluates the saved
edit of every candidate (``<study>/encoders/<trial id>/``, written by the trial) again with
:func:`sage_dist.eval.objective.evaluate_saved_edit`: on the bundled world at
:data:`sage_dist.presets.WORLD_EVAL_FULL` (160 concept-domain and 256 held-out retain images, the prefix attack
on 32 red-team prompts: the attack the objectives are defined on, as in the trials), elsewhere the text proxy on every retain prompt. One Ray task per trial, each on the
CPUs (and GPU) one Train worker of the study gets, so as many run at once as the cluster has room for.

Each task writes its result to ``<study>/rescore/<trial id>.json`` itself (atomically), with a key made of the
fidelity's settings, the trial's configuration and a hash of the saved edit's files; the red team's
adversarial prompts go to ``<study>/rescore/<trial id>/red_team/``. A study killed while re-scoring keeps every
finished record, and ``--resume`` re-scores only the trials without a record whose key matches.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sage_dist.config import StudyConfig
from sage_dist.eval.objective import SEARCH_RED_TEAM_ATTACKS, evaluate_saved_edit, uses_nudity_protocol
from sage_dist.models.registry import is_world
from sage_dist.presets import NUDITY_FULL_PROMPTS, WORLD_EVAL_FULL

log = logging.getLogger(__name__)

RESCORE_DIR = "rescore"
"""Folder of the re-scoring records inside a study folder."""
EDIT_SUFFIXES = (".safetensors", ".bin", ".json")
"""Files of a saved edit that its hash covers (weights and configs; ``record.json`` is excluded)."""


@dataclass(frozen=True, kw_only=True)
class RescoreJob:
    """One trial to re-score."""

    trial_id: str
    config: dict[str, Any]
    """The trial's flat configuration (the study's base config with the trial's searched values)."""
    edit_dir: str
    """The trial's saved edit, ``<study>/encoders/<trial id>``."""


def record_path(study_dir: str | Path, trial_id: str) -> Path:
    """``<study>/rescore/<trial id>.json``."""
    return Path(study_dir) / RESCORE_DIR / f"{trial_id}.json"


def edit_hash(edit_dir: str | Path) -> str:
    """sha256 (hex, 16 chars) of the saved edit's weight and config files (names and bytes).

    Raises:
        ValueError: the folder is missing or holds none of them.
    """
    folder = Path(edit_dir)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in EDIT_SUFFIXES
                   and p.name != "record.json") if folder.is_dir() else []
    if not files:
        raise ValueError(f"{folder}: no saved edit (text_encoder/ or unet/ weights) to re-score; the trial's output "
                         "folder is missing or was deleted")
    h = hashlib.sha256()
    for path in files:
        h.update(str(path.relative_to(folder)).encode())
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def rescore_key(job: RescoreJob) -> dict[str, Any]:
    """What a record must match to be reused: the full fidelity's settings, the trial's config, the edit's hash."""
    cfg = StudyConfig.from_flat_dict(job.config)
    if is_world(cfg.model.model_id):
        fidelity = {**dataclasses.asdict(WORLD_EVAL_FULL), "attacks": list(SEARCH_RED_TEAM_ATTACKS)}
    elif uses_nudity_protocol(cfg.model.model_id, cfg.erase.erase_concept):
        fidelity = {"name": "nudity", "prompts": NUDITY_FULL_PROMPTS, "steps": cfg.erase.ddim_steps, "retain": "all"}
    else:
        fidelity = {"name": "text", "retain": "all"}
    config_hash = hashlib.sha256(json.dumps(job.config, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return {"fidelity": fidelity, "config": config_hash, "edit": edit_hash(job.edit_dir)}


def load_record(study_dir: str | Path, job: RescoreJob, key: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The trial's re-scoring record when it exists, is readable and its key matches (else None: re-score)."""
    path = record_path(study_dir, job.trial_id)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        log.warning("re-scoring record %s unreadable (%s); re-scoring the trial", path, err)
        return None
    if record.get("key") != (key if key is not None else rescore_key(job)):
        log.warning("re-scoring record %s was made for another fidelity, config or edit; re-scoring the trial", path)
        return None
    return record


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def rescore_one(job: RescoreJob, study_dir: str, key: dict[str, Any], num_threads: int = 1) -> dict[str, Any]:
    """Re-score one trial (the body of a Ray task): :func:`~sage_dist.eval.objective.evaluate_saved_edit`, then
    the record ``{"trial_id", "key", "metrics", "lineage", "seconds"}`` written to :func:`record_path`.

    Raises:
        ValueError: no saved edit; FloatingPointError: a metric is not finite.
    """
    import torch

    torch.set_num_threads(max(1, num_threads))
    t0 = time.time()
    cfg = StudyConfig.from_flat_dict(job.config)
    metrics, lineage = evaluate_saved_edit(cfg, job.edit_dir,
                                           red_team_dir=Path(study_dir) / RESCORE_DIR / job.trial_id / "red_team")
    record = {"trial_id": job.trial_id, "key": key, "metrics": metrics, "lineage": lineage,
              "seconds": round(time.time() - t0, 2)}
    _write_atomic(record_path(study_dir, job.trial_id), json.dumps(record, indent=1))
    return record


@dataclass
class RescoreOutcome:
    """What :func:`rescore` found and did."""

    records: dict[str, dict[str, Any]]
    """trial id -> record (re-scored now or earlier)."""
    errors: dict[str, str]
    """trial id -> why its re-scoring failed."""
    reused: list[str]
    """Trials whose record from an earlier (killed) run was reused."""
    wall_time_s: float


def rescore(jobs: list[RescoreJob], study_dir: str | Path, *, num_cpus: float, num_gpus: float = 0.0
            ) -> RescoreOutcome:
    """Re-score ``jobs`` in parallel Ray tasks (``num_cpus`` / ``num_gpus`` each) on the connected cluster,
    reusing every valid record of an earlier run (module docstring). A failing task is reported in
    ``errors`` and the others go on.

    Raises:
        KeyboardInterrupt: Ctrl+C or SIGTERM (the tasks still running are cancelled; finished records stay).
    """
    import ray

    t0 = time.perf_counter()
    records: dict[str, dict[str, Any]] = {}
    errors: dict[str, str] = {}
    reused: list[str] = []
    pending: dict[Any, str] = {}
    task = ray.remote(rescore_one).options(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=1)
    for job in jobs:
        try:
            key = rescore_key(job)
        except ValueError as err:
            errors[job.trial_id] = str(err)
            continue
        found = load_record(study_dir, job, key)
        if found is not None:
            records[job.trial_id] = found
            reused.append(job.trial_id)
            continue
        pending[task.remote(job, str(study_dir), key, max(1, int(num_cpus)))] = job.trial_id
    log.info("re-scoring %d trial(s) at the full fidelity (%d record(s) of an earlier run reused)", len(pending),
             len(reused))
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                trial_id = pending.pop(ref)
                try:
                    records[trial_id] = ray.get(ref)
                    log.info("re-scored trial %s in %.0f s", trial_id, records[trial_id]["seconds"])
                except Exception as err:  # noqa: BLE001 - one trial's failure must not lose the others
                    errors[trial_id] = _root_message(err)
                    log.warning("re-scoring trial %s failed: %s", trial_id, errors[trial_id])
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    return RescoreOutcome(records=records, errors=errors, reused=reused, wall_time_s=time.perf_counter() - t0)


def _root_message(err: BaseException) -> str:
    cause = getattr(err, "cause", None)
    err = cause if isinstance(cause, BaseException) else err
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[-1] if lines else ''}"[:500]
