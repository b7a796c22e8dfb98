"""MLflow tracking without Ray: URI resolution, fail-fast on unreachable servers, parent/child runs, and
``train_fn_per_worker`` called directly (no Ray) logging into a child run."""

from __future__ import annotations

import socket
import time

import pytest

from sage_dist.tracking import (
    MlflowTracker,
    check_tracking_reachable,
    ensure_experiment,
    resolve_tracking,
)
from sage_dist.tracking.mlflow_tracker import child_runs, list_artifacts, metric_history


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_resolve_tracking_defaults_to_absolute_sqlite(tmp_path, monkeypatch):
    monkeypatch.setenv("SAGE_DIST_MLFLOW_HOME", str(tmp_path / "home"))
    target = resolve_tracking("")
    assert target.tracking_uri == f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}"
    assert target.artifact_location == (tmp_path / "home" / "artifacts").as_uri()
    with pytest.raises(ValueError, match="absolute SQLite path"):
        resolve_tracking("sqlite:///relative.db")
    with pytest.raises(ValueError, match="file stores"):
        resolve_tracking("./mlruns")


def test_unreachable_server_fails_fast_with_a_clear_error():
    target = resolve_tracking(f"http://127.0.0.1:{_free_port()}")
    t0 = time.perf_counter()
    with pytest.raises(ConnectionError, match="not reachable.*mlflow server"):
        check_tracking_reachable(target, timeout_s=2.0)
    assert time.perf_counter() - t0 < 10


def test_worker_without_ray_logs_into_a_nested_run(tmp_path):
    from sage_dist.train.ray_worker import WorkerRun, train_fn_per_worker, worker_config
    from tests.conftest import tiny_config

    target = resolve_tracking(f"sqlite:///{tmp_path / 'mlflow.db'}")
    check_tracking_reachable(target)
    exp = ensure_experiment(target, "unit")
    parent = MlflowTracker.start(target, exp, run_name="study", tags={"kind": "study"})
    child = MlflowTracker.find_or_start(target, exp, key="trial-a", run_name="trial", tags={"seed": 0},
                                        parent_run_id=parent.run_id)
    cfg = tiny_config(**{"scaling.checkpoint_every": 2})
    child.log_params(cfg.to_flat_dict())
    final = train_fn_per_worker(worker_config(cfg, WorkerRun(tracking_uri=target.tracking_uri, run_id=child.run_id,
                                                             out_dir=str(tmp_path / "enc"), grid_steps=2)))
    child.end()
    parent.end()
    assert {"text_erasure", "text_retention_drift", "text_score"} <= set(final)
    assert [s for s, _ in metric_history(target.tracking_uri, child.run_id, "loss")] == [0, 1, 2, 3]
    assert [s for s, _ in metric_history(target.tracking_uri, child.run_id, "text_erasure")] == [2, 4]
    assert "images/original_vs_erased.png" in list_artifacts(target.tracking_uri, child.run_id, "images")
    assert "erased_encoder/text_encoder" in list_artifacts(target.tracking_uri, child.run_id, "erased_encoder")
    assert (tmp_path / "enc" / "text_encoder" / "model.safetensors").is_file()
    [found] = child_runs(target.tracking_uri, parent.run_id)
    assert found.info.run_id == child.run_id and found.info.status == "FINISHED"
    assert found.data.params["optim.num_steps"] == "4"
    again = MlflowTracker.find_or_start(target, exp, key="trial-a", run_name="trial", tags={},
                                        parent_run_id=parent.run_id)
    assert again.run_id == child.run_id  # a retried trial keeps its child run


def test_a_resumed_run_moves_the_earlier_failure_to_history(tmp_path):
    """A study or trial that failed and is resumed reuses its run; the earlier failure must not stay as the
    current ``failure_reason`` of a run that then finishes."""
    from mlflow.tracking import MlflowClient

    target = resolve_tracking(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = ensure_experiment(target, "unit")
    first = MlflowTracker.find_or_start(target, exp, key="study-a", run_name="study", tags={})
    first.set_tags({"interrupted": "RuntimeError: boom"})
    first.end("FAILED", reason="RuntimeError: boom")
    again = MlflowTracker.find_or_start(target, exp, key="study-a", run_name="study", tags={})
    again.end("FINISHED")
    run = MlflowClient(target.tracking_uri).get_run(first.run_id)
    assert again.run_id == first.run_id and run.info.status == "FINISHED"
    assert "failure_reason" not in run.data.tags and "interrupted" not in run.data.tags
    assert run.data.tags["previous_failure_reason"] == "RuntimeError: boom"
    assert run.data.tags["sage_dist.attempts"] == "2"


def test_closing_a_failed_study_never_replaces_its_error(caplog):
    """If MLflow itself fails while the parent run is being closed after an error, the warning is logged and the
    caller re-raises its own error (not MLflow's)."""
    from sage_dist.tune.search import _close_failed_parent

    class Unreachable:
        def set_tags(self, tags):
            raise ConnectionError("tracking server down")

        def end(self, status="FINISHED", reason=""):
            raise AssertionError("not reached")

    _close_failed_parent(Unreachable(), RuntimeError("the study's own error"))
    assert "could not close the parent MLflow run" in caplog.text and "tracking server down" in caplog.text


def test_experiments_open_in_the_model_training_view(tmp_path):
    """Every experiment sage_dist creates or logs into without a kind gets ``mlflow.experimentKind`` =
    ``custom_model_development`` (MLflow 3 otherwise opens it on the GenAI overview); a kind someone chose stays."""
    from mlflow.tracking import MlflowClient

    target = resolve_tracking(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient(target.tracking_uri)
    kind = "mlflow.experimentKind"
    assert client.get_experiment(ensure_experiment(target, "new")).tags[kind] == "custom_model_development"
    old = client.create_experiment("made_before", artifact_location=(tmp_path / "a").as_uri())
    assert kind not in client.get_experiment(old).tags
    assert ensure_experiment(target, "made_before") == old
    assert client.get_experiment(old).tags[kind] == "custom_model_development"
    chosen = client.create_experiment("genai", artifact_location=(tmp_path / "b").as_uri(),
                                      tags={kind: "genai_development"})
    ensure_experiment(target, "genai")
    assert client.get_experiment(chosen).tags[kind] == "genai_development"


def test_front_versions_are_registered_once_each(tmp_path):
    """A resumed study registers its front again: versions already registered (same key) are not duplicated."""
    from sage_dist.tracking.mlflow_tracker import ModelVersionSpec, model_versions, register_versions, run_artifact_uri

    target = resolve_tracking(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = ensure_experiment(target, "unit")
    run = MlflowTracker.start(target, exp, run_name="trial", tags={})
    folder = tmp_path / "enc" / "text_encoder"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights")
    run.log_artifacts(tmp_path / "enc", "erased_encoder")
    specs = [ModelVersionSpec(source=run_artifact_uri(run.run_id, "erased_encoder"), run_id=run.run_id, key="t1",
                              tags={"trial_id": "t1", "base_model_hash": "abc"}, description="front point")]
    assert register_versions(target.tracking_uri, "sage_dist-s", specs, tags={"study": "s"}) == {"t1": "1"}
    assert register_versions(target.tracking_uri, "sage_dist-s", specs) == {"t1": "1"}
    (version,) = model_versions(target.tracking_uri, "sage_dist-s")
    assert version.run_id == run.run_id and version.tags["base_model_hash"] == "abc"
    assert version.source == f"runs:/{run.run_id}/erased_encoder"


def test_ui_links_open_the_model_training_view():
    """MLflow 3's UI opens an experiment in its GenAI view unless the address asks for the model-training one."""
    from sage_dist.tracking.mlflow_tracker import ui_instructions, ui_link

    assert ui_link("http://h:5000/", "3", "abc") == "http://h:5000/#/experiments/3/runs/abc?workflowType=machine_learning"
    local = ui_instructions(resolve_tracking("sqlite:////tmp/x/mlflow.db"), "sage_dist", "1", "r")
    assert "mlflow ui --backend-store-uri sqlite:////tmp/x/mlflow.db" in local
    assert "http://127.0.0.1:5000/#/experiments/1/runs/r?workflowType=machine_learning" in local
    assert "(experiment 'sage_dist')" in ui_instructions(resolve_tracking("sqlite:////tmp/x/mlflow.db"), "sage_dist")
