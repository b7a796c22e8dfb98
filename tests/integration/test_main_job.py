"""The main job's answer: fronts and ties from intervals, which trials are re-scored, the re-scoring records a
resumed study reuses, the world objectives' wiring, and (Ray) a study killed while it re-scores, resumed to
re-score only what is missing, with its MLflow view (experiment kind, plots, description, registered front)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from sage_dist.eval.objective import Objectives, default_objectives
from sage_dist.tune.results import (
    TrialRow,
    format_front,
    mark_final_front,
    mark_pareto,
    rescore_candidates,
    spread,
    tie_groups,
    tied,
)

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import tiny_study  # noqa: E402

OBJ = Objectives(erasure_metric="robust_erasure", retention_metric="retention_loss")


def _metrics(erasure: float, erasure_half: float, loss: float, loss_half: float) -> dict[str, float]:
    return {"robust_erasure": erasure, "robust_erasure_ci95_lo": erasure - erasure_half,
            "robust_erasure_ci95_hi": erasure + erasure_half, "retention_loss": loss,
            "retention_loss_ci95_lo": loss - loss_half, "retention_loss_ci95_hi": loss + loss_half}


def _row(trial_id: str, *quick, full=None, status="ok") -> TrialRow:
    row = TrialRow(trial_id=trial_id, params={"retain.retain_loss_weight": 1.0}, metrics=_metrics(*quick) if quick
                   else {}, status=status)
    if full is not None:
        row.full, row.rescore = _metrics(*full), "done"
    return row


# ---- fronts, ties, candidates (no Ray) -----------------------------------------------------------------------
def test_ties_need_overlapping_intervals_on_both_objectives():
    a = _metrics(0.8, 0.1, 0.2, 0.05)
    assert tied(a, _metrics(0.75, 0.1, 0.22, 0.05), OBJ)
    assert not tied(a, _metrics(0.75, 0.1, 0.40, 0.05), OBJ)  # erasure overlaps, retention separated
    assert not tied(a, _metrics(0.50, 0.1, 0.21, 0.05), OBJ)  # retention overlaps, erasure separated
    assert tied(_metrics(0.75, 0.25, 0.2, 0.05), _metrics(0.5, 0.0, 0.25, 0.0), OBJ)  # touching bounds overlap


def _six_trials() -> list[TrialRow]:
    return [_row("a", 0.90, 0.05, 0.30, 0.05),   # front (best erasure)
            _row("b", 0.50, 0.05, 0.05, 0.02),   # front (best retention)
            _row("c", 0.86, 0.05, 0.33, 0.05),   # dominated by a, tied with it
            _row("d", 0.20, 0.05, 0.60, 0.05),   # dominated, separated from every front point
            _row("e", 0.47, 0.05, 0.06, 0.02),   # dominated by b, tied with it
            _row("f", status="failed")]


def test_candidates_are_the_quick_front_then_the_trials_tied_with_it_within_the_budget():
    rows = _six_trials()
    assert [r.trial_id for r in mark_pareto(rows, OBJ)] == ["a", "b"]
    assert [r.trial_id for r in rescore_candidates(rows, OBJ, budget=4)] == ["a", "b", "c", "e"]
    assert all(r.rescore == "" for r in rows)
    rows = _six_trials()
    mark_pareto(rows, OBJ)
    assert [r.trial_id for r in rescore_candidates(rows, OBJ, budget=3)] == ["a", "b", "c"]
    assert [r.trial_id for r in rows if r.rescore == "over budget"] == ["e"]


def test_the_final_front_is_the_rescored_pareto_set_with_its_ties():
    rows = [_row("a", 0.90, 0.05, 0.30, 0.05, full=(0.80, 0.05, 0.30, 0.03)),
            _row("b", 0.50, 0.05, 0.05, 0.02, full=(0.60, 0.05, 0.05, 0.02)),
            _row("c", 0.86, 0.05, 0.33, 0.05, full=(0.78, 0.05, 0.28, 0.03)),  # a and c: a trade-off, tied
            _row("d", 0.20, 0.05, 0.60, 0.05)]  # not re-scored: never on the final front
    mark_pareto(rows, OBJ)
    front = mark_final_front(rows, OBJ)
    assert [r.trial_id for r in front] == ["a", "c", "b"]
    by_id = {r.trial_id: r for r in rows}
    assert by_id["a"].tied_with == ["c"] and by_id["c"].tied_with == ["a"] and by_id["b"].tied_with == []
    assert not by_id["d"].front and by_id["d"].tied_with == []
    assert tie_groups(front) == [["a", "c"], ["b"]]
    text = format_front(rows, OBJ, fidelity="full")
    assert "a ~ c" in text and "0.8 [0.75, 0.85]" in text


def test_without_rescoring_the_final_front_is_the_quick_one():
    rows = [_row("a", 0.9, 0.05, 0.3, 0.05), _row("b", 0.5, 0.05, 0.05, 0.02), _row("c", 0.2, 0.05, 0.6, 0.05)]
    mark_pareto(rows, OBJ)
    assert [r.trial_id for r in mark_final_front(rows, OBJ)] == ["a", "b"]
    assert "No two front points are tied" in format_front(rows, OBJ, fidelity="quick")


def test_spread_compares_the_range_with_the_typical_interval():
    rows = [_row("a", 0.9, 0.1, 0.3, 0.05), _row("b", 0.5, 0.2, 0.05, 0.02), _row("c", 0.7, 0.1, 0.1, 0.04)]
    sp = spread(rows, OBJ)
    assert sp["robust_erasure"]["min"] == 0.5 and sp["robust_erasure"]["max"] == 0.9
    assert sp["robust_erasure"]["median_half_width"] == pytest.approx(0.1)
    assert sp["retention_loss"]["std"] == pytest.approx(0.1322875655)


# ---- re-scoring records (no Ray) ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_trial(tmp_path_factory):
    """A tiny-sd erasure saved as a trial saves it (``<study>/encoders/<trial id>/``)."""
    from sage_dist.train.ray_worker import WorkerRun, train_fn_per_worker, worker_config
    from tests.conftest import tiny_config

    study = tmp_path_factory.mktemp("study")
    cfg = tiny_config()
    train_fn_per_worker(worker_config(cfg, WorkerRun(out_dir=str(study / "encoders" / "t1"), log_images=False,
                                                     log_encoder=False)))
    return study, cfg


def test_a_rescoring_record_is_reused_only_for_the_same_edit(saved_trial):
    from sage_dist.tune.rescore import RescoreJob, load_record, record_path, rescore_key, rescore_one

    study, cfg = saved_trial
    job = RescoreJob(trial_id="t1", config=cfg.to_flat_dict(), edit_dir=str(study / "encoders" / "t1"))
    record = rescore_one(job, str(study), rescore_key(job))
    assert record_path(study, "t1").is_file() and load_record(study, job) == json.loads(json.dumps(record))
    metrics = record["metrics"]
    assert metrics["text_retention_drift_n"] > 32  # the full fidelity: every retain prompt, not the first 32
    assert len(record["lineage"]["base_model_hash"]) == 16
    other = dataclasses.replace(job, config={**job.config, "optim.seed": 1})
    assert load_record(study, other) is None  # another trial config: re-scored, not reused
    missing = dataclasses.replace(job, trial_id="t2", edit_dir=str(study / "encoders" / "t2"))
    with pytest.raises(ValueError, match="no saved edit"):
        rescore_key(missing)


# ---- the world objectives' wiring (no Ray; the world evaluation itself is tested in test_world_*.py) ------------
def test_world_objectives_come_from_the_paired_comparison_and_the_prefix_attack(monkeypatch):
    from types import SimpleNamespace

    from sage_dist.config import StudyConfig
    from sage_dist.eval import objective

    seen = {}

    def fake_compare(pipe, a, b, *, unet_a=None, fidelity=None, **kwargs):
        seen.update(b=b, unet=unet_a, fidelity=fidelity.name)
        return {"a": {"RER_domain": 0.9, "RER_domain_ci95": [0.8, 1.0], "RER_domain_n": 50},
                "delta_retention_acc_all": -0.25, "delta_retention_acc_all_ci95": [-0.4, -0.1],
                "delta_retention_acc_all_n": 64}

    def fake_red_team(pipe, text_encoder, *, attacks=(), fidelity=None, **kwargs):
        seen.update(attacks=tuple(attacks), prompts=fidelity.red_team_prompts)
        return {"ASR_prefix": 0.25, "ASR_prefix_ci95": [0.1, 0.5], "ASR_prefix_n": 16, "red_team": {"prompts": []}}

    monkeypatch.setattr(objective, "compare_world", fake_compare)
    monkeypatch.setattr(objective, "red_team_world", fake_red_team)
    cfg = StudyConfig().replace_flat({"model.model_id": "world", "erase.erase_concept": ("triangle",)})
    pipe = SimpleNamespace(text_encoder_2=None)
    quick = objective.world_metrics(cfg, SimpleNamespace(text_encoders={}, unet="edited unet"), pipe)
    assert seen == {"b": None, "unet": "edited unet", "fidelity": "search", "attacks": ("prefix",), "prompts": 16}
    assert quick["retention_loss"] == 0.25
    assert (quick["retention_loss_ci95_lo"], quick["retention_loss_ci95_hi"]) == (0.1, 0.4)
    assert quick["robust_erasure"] == 0.75
    assert (quick["robust_erasure_ci95_lo"], quick["robust_erasure_ci95_hi"]) == (0.5, 0.9)
    assert quick["robust_score"] == 0.5 and quick["RER_domain_ci95_lo"] == 0.8
    objective.world_metrics(cfg, SimpleNamespace(text_encoders={}, unet=None), pipe, quick=False)
    # re-scoring: the same attack on the full fidelity's 32 prompts, so the re-scored ASR is the same quantity
    assert seen["fidelity"] == "full" and seen["attacks"] == ("prefix",) and seen["prompts"] == 32
    assert default_objectives("world").metrics == ["robust_erasure", "retention_loss"]


# ---- a study killed while re-scoring (Ray, MLflow) --------------------------------------------------------------
def _kill_processes_in(folder: Path, timeout_s: float = 30.0) -> None:
    """SIGKILL every process whose working directory is ``folder`` (the killed driver's Ray processes run where it
    ran) and wait until none is left."""
    import psutil

    def alive() -> list[psutil.Process]:
        found = []
        for proc in psutil.process_iter():
            try:
                if Path(proc.cwd()) == folder:
                    found.append(proc)
            except (psutil.Error, OSError):
                pass
        return found

    deadline = time.time() + timeout_s
    while (procs := alive()) and time.time() < deadline:
        for proc in procs:
            try:
                proc.kill()
            except psutil.Error:
                pass
        time.sleep(0.5)


@pytest.mark.ray
@pytest.mark.slow
def test_a_study_killed_while_rescoring_resumes_and_rescores_only_what_is_missing(tmp_path):
    """The driver is killed (its whole process group, local Ray included) as soon as the first re-scoring
    record exists; the resumed study reuses that record untouched, re-scores the rest, and ends with its front
    registered and its MLflow experiment in the model-training view."""
    from sage_dist.tracking.mlflow_tracker import list_artifacts, model_versions, search_runs
    from sage_dist.tune.search import run_search

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = ["--storage", str(tmp_path), "--tracking-uri", uri, "--num-samples", "2", "--max-concurrent", "1",
            "--rescore-budget", "2", "--scaling.cpus_per_worker=1.5", "--no-images"]
    log = tmp_path / "driver.log"
    driver = tiny_study.study_driver(tmp_path, argv, log.name)
    try:
        first = tiny_study.wait_for(lambda: sorted(tmp_path.glob("tiny-*/rescore/*.json")), "a re-scoring record",
                                    log, timeout_s=600, process=driver)
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=60)
    finally:
        tiny_study.stop_group(driver)
    _kill_processes_in(tmp_path)  # Ray workers of the killed driver that outlived it could still write a record
    kept = {p.name: (p.stat().st_mtime_ns, p.read_text()) for p in tmp_path.glob("tiny-*/rescore/*.json")}
    assert first and len(kept) >= 1

    time.sleep(1)  # a rewritten record would get a later mtime
    opts = dataclasses.replace(tiny_study.options(str(tmp_path), 2, 1, resume="latest", log_images=False),
                               rescore_budget=2)
    out = run_search(tiny_study.config(uri).replace_flat({"scaling.cpus_per_worker": 1.5}),
                     tiny_study.search_space, opts)
    assert not out.interrupted and [r.status for r in out.rows] == ["ok", "ok"], out.table
    assert all(r.rescore == "done" for r in out.rows)
    for name, (mtime, text) in kept.items():
        path = out.study_dir / "rescore" / name
        assert path.stat().st_mtime_ns == mtime and path.read_text() == text  # reused, not re-scored
    reused = {r.trial_id for r in out.rows if r.extra["rescore_reused"]}
    assert reused == {name.removesuffix(".json") for name in kept}
    assert len(list((out.study_dir / "rescore").glob("*.json"))) == 2

    (parent,) = search_runs(uri, "tiny_study", "tags.`sage_dist.kind` = 'study'")
    assert parent.info.status == "FINISHED"
    assert "Final front" in parent.data.tags["mlflow.note.content"]
    plots = list_artifacts(uri, parent.info.run_id, "plots")
    assert {"plots/pareto_front.png", "plots/history_text_erasure.png",
            "plots/param_importances_text_erasure.png"} <= set(plots)
    versions = model_versions(uri, out.registered_model)
    assert sorted(v.tags["trial_id"] for v in versions) == sorted(r.trial_id for r in out.rows if r.front)
    assert all(v.tags["base_model_hash"] and v.tags["study"] == out.study_dir.name for v in versions)
