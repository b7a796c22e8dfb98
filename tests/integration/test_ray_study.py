"""End to end under local Ray (2 CPUs): a 2-trial tiny-sd study logged to an ``mlflow server`` (found through
its REST API and MLflow's client), a NaN trial recorded as failed while the study goes on, a study whose
driver is killed mid-run resumed without losing or repeating the finished trial, and a study interrupted by
Ctrl+C and then by SIGTERM, each time marked KILLED with the command that resumes it."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest
import requests

pytestmark = pytest.mark.ray

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import tiny_study  # noqa: E402


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """``mlflow server`` on 127.0.0.1:<free port> in its own process group; the group is stopped at the end."""
    port = tiny_study.free_port()
    proc = tiny_study.start_mlflow_server(tmp_path_factory.mktemp("mlflow_server"), port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        tiny_study.stop_group(proc)


def _api(url: str, path: str, **payload):
    response = requests.post(f"{url}/api/2.0/mlflow/{path}", json=payload, timeout=30)
    response.raise_for_status()
    return response.json()


def test_two_trial_study_logged_to_a_server_with_a_failed_trial(tmp_path, mlflow_server, local_ray):
    """...and its finished trial re-scored (the text proxy on every retain prompt), on the final front, registered
    in the Model Registry; the parent run carries the summary as its description and Optuna's plots as PNG."""
    from sage_dist.tune.search import run_search

    opts = dataclasses.replace(tiny_study.options(str(tmp_path), num_samples=2, max_concurrent=2), rescore_budget=1)
    out = run_search(tiny_study.config(mlflow_server), tiny_study.search_space_with_nan, opts)
    status = sorted(r.status for r in out.rows)
    assert status == ["failed", "ok"], out.table
    failed = next(r for r in out.rows if r.status == "failed")
    assert "loss is nan" in failed.error or "FloatingPointError" in failed.error, failed.error
    ok = next(r for r in out.rows if r.status == "ok")
    assert ok.pareto and {"text_erasure", "text_retention_drift", "text_erasure_ci95_lo"} <= set(ok.metrics)
    assert ok.rescore == "done" and ok.front and failed.rescore == "" and not failed.front
    assert ok.full["text_retention_drift_n"] > ok.metrics["text_retention_drift_n"]  # every retain prompt
    assert (out.study_dir / "rescore" / f"{ok.trial_id}.json").is_file()
    assert ok.trial_id in out.front_table and "re-scored" in out.front_table

    # The study's runs through the server's REST API (what the UI shows).
    exp = _api(mlflow_server, "experiments/search", max_results=10)
    exp_id = next(e["experiment_id"] for e in exp["experiments"] if e["name"] == "tiny_study")
    tags = {t["key"]: t["value"] for e in exp["experiments"] if e["name"] == "tiny_study" for t in e.get("tags", [])}
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    runs = _api(mlflow_server, "runs/search", experiment_ids=[exp_id], max_results=100)["runs"]
    parent = next(r for r in runs if r["info"]["run_id"] == out.parent_run_id)
    assert parent["info"]["status"] == "FINISHED"
    children = [r for r in runs if any(t["key"] == "mlflow.parentRunId" and t["value"] == out.parent_run_id
                                       for t in r["data"].get("tags", []))]
    assert sorted(c["info"]["status"] for c in children) == ["FAILED", "FINISHED"]
    bad = next(c for c in children if c["info"]["status"] == "FAILED")
    reason = next(t["value"] for t in bad["data"]["tags"] if t["key"] == "failure_reason")
    assert "FloatingPointError" in reason and "nan" in reason
    good = next(c for c in children if c["info"]["status"] == "FINISHED")
    tags = {t["key"]: t["value"] for t in good["data"]["tags"]}
    assert tags["model"] == "tiny-sd" and tags["concept"] == "triangle" and tags["seed"] == "0" and tags["git_sha"]
    metrics = {m["key"] for m in good["data"]["metrics"]}
    assert {"loss", "erase_loss", "retain_loss", "text_erasure", "text_retention_drift"} <= metrics
    history = requests.get(f"{mlflow_server}/api/2.0/mlflow/metrics/get-history",
                           params={"run_id": good["info"]["run_id"], "metric_key": "loss"}, timeout=30).json()
    assert len(history["metrics"]) == 4
    arts = requests.get(f"{mlflow_server}/api/2.0/mlflow/artifacts/list",
                        params={"run_id": good["info"]["run_id"]}, timeout=30).json()
    assert {"erased_encoder", "images"} <= {f["path"] for f in arts["files"]}
    assert {"full/text_erasure", "full/text_retention_drift"} <= metrics
    parent_arts = requests.get(f"{mlflow_server}/api/2.0/mlflow/artifacts/list",
                               params={"run_id": out.parent_run_id}, timeout=30).json()
    assert {"pareto_table.md", "front.md", "summary.md", "trials.json", "plots"} <= {f["path"] for f in parent_arts["files"]}
    plots = requests.get(f"{mlflow_server}/api/2.0/mlflow/artifacts/list",
                         params={"run_id": out.parent_run_id, "path": "plots"}, timeout=30).json()
    assert {"plots/pareto_front.png", "plots/history_text_erasure.png"} <= {f["path"] for f in plots["files"]}
    parent_tags = {t["key"]: t["value"] for t in parent["data"]["tags"]}
    assert "Final front" in parent_tags["mlflow.note.content"] and ok.trial_id in parent_tags["mlflow.note.content"]
    versions = requests.get(f"{mlflow_server}/api/2.0/mlflow/model-versions/search",
                            params={"filter": f"name='{out.registered_model}'"}, timeout=30).json()["model_versions"]
    (version,) = versions
    version_tags = {t["key"]: t["value"] for t in version["tags"]}
    assert version["run_id"] == good["info"]["run_id"] and version_tags["trial_id"] == ok.trial_id
    assert version_tags["base_model_hash"] and version_tags["git_sha"] and version_tags["fidelity"] == "full"

    # The same through MLflow's client.
    from sage_dist.tracking.mlflow_tracker import child_runs, metric_history

    assert len(child_runs(out.tracking_uri, out.parent_run_id)) == 2
    assert len(metric_history(out.tracking_uri, good["info"]["run_id"], "text_erasure")) == 2


def test_killed_study_resumes_without_losing_or_repeating_trials(tmp_path, local_ray):
    from ray.tune.search.optuna import OptunaSearch

    from sage_dist.tracking.mlflow_tracker import child_runs, search_runs
    from sage_dist.tune.search import run_search

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    driver = tiny_study.study_driver(tmp_path, ["--storage", str(tmp_path), "--tracking-uri", uri, "--num-samples", "2",
                                                "--max-concurrent", "1"], "driver.log")
    try:
        deadline = time.time() + 300
        finished = []
        while time.time() < deadline and driver.poll() is None:
            finished = [p for p in tmp_path.glob("tiny-*/run_trial_*/result.json") if "trial_finished" in p.read_text()]
            if finished:
                break
            time.sleep(2)
        assert finished, (tmp_path / "driver.log").read_text()[-3000:]
        # kill only once Tune's saved experiment state records the trial as finished (under load the state is
        # written seconds after the trial's result; killing earlier legitimately re-runs the trial)
        trial_id = finished[0].parent.name.split("_")[2]
        saved = False
        while time.time() < deadline + 120 and not saved:
            for state in tmp_path.glob("tiny-*/experiment_state-*.json"):
                try:
                    entries = json.loads(state.read_text())["trial_data"]
                except (ValueError, KeyError):
                    continue  # being written
                saved = saved or any(trial_id in json.dumps(e) and "TERMINATED" in json.dumps(e) for e in entries)
            time.sleep(1)
        assert saved, "Tune never saved the finished trial's state"
    finally:
        tiny_study.stop_group(driver)  # the driver "crashes": its whole process group, local Ray included, goes

    out = run_search(tiny_study.config(uri), tiny_study.search_space,
                     tiny_study.options(str(tmp_path), 2, 1, resume="latest"))
    assert [r.status for r in out.rows] == ["ok", "ok"], out.table
    first_id = finished[0].parent.name.split("_")[2]
    assert first_id in {r.trial_id for r in out.rows}
    runs = child_runs(out.tracking_uri, out.parent_run_id)
    assert len(runs) == 2  # no trial ran twice as separate runs
    first = next(r for r in runs if r.data.tags["trial_id"] == first_id)
    assert "sage_dist.attempts" not in first.data.tags  # the finished trial was not re-run
    assert len(search_runs(out.tracking_uri, "tiny_study", "tags.`sage_dist.kind` = 'study'")) == 1
    searcher = OptunaSearch()
    searcher.restore_from_dir(str(out.study_dir))
    assert len(searcher._ot_study.trials) == 2  # the searcher's history survived the kill


def test_parent_run_is_closed_when_the_tuner_cannot_be_built(tmp_path, local_ray, monkeypatch):
    """An error between the parent run's start and the study's end leaves the parent FAILED with the reason,
    not RUNNING forever in the UI."""
    from sage_dist.tracking.mlflow_tracker import search_runs
    from sage_dist.tune import search

    def broken(*args, **kwargs):
        raise RuntimeError("tuner construction failed (injected)")

    monkeypatch.setattr(search, "build_tuner", broken)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(RuntimeError, match="injected"):
        search.run_search(tiny_study.config(uri), tiny_study.search_space, tiny_study.options(str(tmp_path), 1, 1))
    (parent,) = search_runs(uri, "tiny_study", "tags.`sage_dist.kind` = 'study'")
    assert parent.info.status == "FAILED"
    assert "injected" in parent.data.tags["failure_reason"]


def test_interrupted_study_is_killed_and_says_how_to_resume(tmp_path):
    """Ctrl+C (SIGINT to the driver's process group, as a terminal sends it; Ray Tune catches the first one and
    returns early) and then SIGTERM (what ``kill``, systemd and Kubernetes send) to the resumed study: each
    time the parent run ends KILLED, never FINISHED, the driver exits 130 and prints the resume command."""
    from sage_dist.tracking.mlflow_tracker import search_runs

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = ["--storage", str(tmp_path), "--tracking-uri", uri, "--num-samples", "2", "--max-concurrent", "1"]
    log1 = tmp_path / "driver1.log"
    driver = tiny_study.study_driver(tmp_path, argv, log1.name)
    try:
        tiny_study.wait_for(lambda: list(tmp_path.glob("tiny-*/train/*/step_*")), "a trial's first checkpoint", log1)
        os.killpg(driver.pid, signal.SIGINT)
        assert driver.wait(timeout=180) == 130, log1.read_text()[-3000:]
    finally:
        tiny_study.stop_group(driver)
    printed = re.search(r"^resume with: .* --resume (\S+)$", log1.read_text(), re.M)
    assert printed, log1.read_text()[-3000:]
    (parent,) = search_runs(uri, "tiny_study", "tags.`sage_dist.kind` = 'study'")
    assert parent.info.status == "KILLED" and "interrupted" in parent.data.tags

    log2 = tmp_path / "driver2.log"
    driver = tiny_study.study_driver(tmp_path, [*argv, "--resume", printed.group(1)], log2.name)
    try:
        tiny_study.wait_for(lambda: "erasing (" in log2.read_text(), "the resumed study to train", log2)
        os.kill(driver.pid, signal.SIGTERM)
        assert driver.wait(timeout=180) == 130, log2.read_text()[-3000:]
    finally:
        tiny_study.stop_group(driver)
    assert f"--resume {printed.group(1)}" in log2.read_text()
    (again,) = search_runs(uri, "tiny_study", "tags.`sage_dist.kind` = 'study'")
    assert again.info.run_id == parent.info.run_id and again.info.status == "KILLED"
    assert again.data.tags["sage_dist.attempts"] == "2"


def test_results_survive_a_tracking_store_that_fails_after_the_trials(tmp_path, local_ray, monkeypatch):
    """The tracking store fails in the driver once the trials have run (MLflow's client gives up after its
    retries): the study still returns its outcome, writes its table and trials.json to the study folder, and
    says what failed, instead of raising and losing them."""
    from sage_dist.tracking import MlflowTracker
    from sage_dist.tune.search import run_search

    def down(self, *args, **kwargs):
        raise ConnectionError("MLflow server 127.0.0.1 refused the connection (injected)")

    monkeypatch.setattr(MlflowTracker, "log_text", down)  # the driver's first call after the trials
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = run_search(tiny_study.config(uri), tiny_study.search_space, tiny_study.options(str(tmp_path), 1, 1))
    assert [r.status for r in out.rows] == ["ok"] and "injected" in out.tracking_error
    assert (out.study_dir / "pareto_table.md").read_text() == out.table
    assert json.loads((out.study_dir / "trials.json").read_text())[0]["status"] == "ok"
