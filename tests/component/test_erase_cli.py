"""``sage-dist erase`` on tiny-sd, in process: the ``--out`` rules, interrupts, the checkpoint policy, resume,
and MLflow tracking (a SQLite store; the server faults are in tests/integration/test_faults.py)."""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sage_dist.cli.erase as erase_cli
import sage_dist.train.loop as loop
from sage_dist.cli.main import main
from sage_dist.tracking import BackgroundTracker
from sage_dist.train.step import Eraser

TINY = ["--model", "tiny-sd", "--concept", "cat", "--erase.warmup_steps=2", "--erase.ddim_steps=4",
        "--attack.attack_steps=2", "--retain.retain_batch_size=4", "--retain.top_k=2", "--attack.reinit=latest"]


def erase_args(out: Path, steps: int = 6, *extra: str) -> list[str]:
    return ["erase", *TINY, "--out", str(out), "--steps", str(steps), *extra]


def folder_digest(folder: Path) -> str:
    """SHA-256 over every file's relative path and bytes (equal digests: the folder is unchanged)."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def encoder_tensors(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "text_encoder" / "model.safetensors")


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def refuse_to_load(*args, **kwargs):
    raise AssertionError("a model was loaded before the bad input was reported")


@pytest.fixture
def no_model_loads(monkeypatch):
    monkeypatch.setattr(loop, "load_pipeline", refuse_to_load)


def at_step(monkeypatch, step: int, action) -> None:
    """Run ``action()`` when training step ``step`` (0-based) begins."""
    original = Eraser.train_step

    def train_step(self, s):
        if s == step:
            action()
        return original(self, s)

    monkeypatch.setattr(Eraser, "train_step", train_step)


def test_unwritable_out_fails_before_any_model_loads(tmp_path, capsys, no_model_loads):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert main(erase_args(blocker / "run")) == 2
    err = capsys.readouterr().err
    assert f"--out {blocker / 'run'}: cannot create or write this folder" in err
    assert main(erase_args(blocker)) == 2
    assert f"--out {blocker} is a file, not a folder" in capsys.readouterr().err


def test_a_finished_run_is_refused_without_overwrite(tmp_path, capsys, no_model_loads):
    out = tmp_path / "run"
    (out / "text_encoder").mkdir(parents=True)
    (out / "text_encoder" / "model.safetensors").write_bytes(b"weights")
    (out / "record.json").write_text("{}")
    before = folder_digest(out)
    assert main(erase_args(out)) == 2
    err = capsys.readouterr().err
    assert f"--out {out} holds a finished run (text_encoder, record.json); pass --overwrite" in err
    assert folder_digest(out) == before


def test_overwrite_replaces_a_finished_run_only_after_success(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert main(erase_args(out)) == 0
    finished = folder_digest(out)

    def crash():
        raise RuntimeError("simulated crash in step 3")

    with monkeypatch.context() as m:
        at_step(m, 3, crash)
        with pytest.raises(RuntimeError, match="simulated crash"):
            main(erase_args(out, 6, "--overwrite", "--seed", "1"))
    assert folder_digest(out) == finished  # the failed run left the finished one as it was
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # and no staging folder
    assert main(erase_args(out, 6, "--overwrite", "--seed", "1")) == 0
    assert folder_digest(out) != finished
    assert '"seed": 1' in (out / "record.json").read_text()


def test_ctrl_c_saves_a_checkpoint_says_how_to_resume_and_resume_matches(tmp_path, monkeypatch, capfd):
    reference = tmp_path / "reference"
    assert main(erase_args(reference)) == 0
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        at_step(m, 2, lambda: os.kill(os.getpid(), signal.SIGINT))
        assert main(erase_args(out)) == 130
    err = capfd.readouterr().err
    ckpt = out / "checkpoints" / "step_000003"
    assert "SIGINT received" in err and "Traceback" not in err
    assert f"stopped after step 3 of 6; checkpoint {ckpt}" in err
    assert f"resume with: sage-dist {' '.join(erase_args(out))} --resume-from {ckpt}" in err
    assert (ckpt / "state.json").is_file() and not (out / "record.json").exists()
    # the unfinished run is not started over by accident
    assert main(erase_args(out)) == 2
    err = capfd.readouterr().err
    assert "holds checkpoints of an unfinished run" in err and f"--resume-from {ckpt}" in err and "--resume" in err
    assert main(erase_args(out, 6, "--resume")) == 0
    assert same_tensors(encoder_tensors(out), encoder_tensors(reference))
    assert not (out / "checkpoints").exists()  # automatic checkpoints go once the outputs are saved


def test_sigterm_exits_143_and_a_second_signal_stops_at_once(tmp_path, monkeypatch, capfd):
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        at_step(m, 2, lambda: os.kill(os.getpid(), signal.SIGTERM))
        assert main(erase_args(out)) == 143
    assert "SIGTERM received" in capfd.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler does not outlive the command

    def two_signals():
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)

    other = tmp_path / "other"
    with monkeypatch.context() as m:
        at_step(m, 2, two_signals)
        assert main(erase_args(other)) == 130
    err = capfd.readouterr().err
    assert "stopped at once, without saving" in err and "Traceback" not in err
    assert not list((other / "checkpoints").glob("step_*"))


def test_automatic_checkpoints_keep_only_the_latest(tmp_path, monkeypatch, capsys):
    """Without --scaling.checkpoint_every the time rule applies (made 0 s here: a checkpoint after every step);
    only the latest stays, and a crash leaves it resumable."""
    monkeypatch.setattr(erase_cli, "AUTO_CHECKPOINT_INTERVAL_S", 0.0)
    out = tmp_path / "run"

    def crash():
        raise RuntimeError("simulated crash in step 4")

    with monkeypatch.context() as m:
        at_step(m, 4, crash)
        with pytest.raises(RuntimeError):
            main(erase_args(out))
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_000004"]
    assert main(erase_args(out, 6, "--resume")) == 0
    reference = tmp_path / "reference"
    assert main(erase_args(reference)) == 0
    assert same_tensors(encoder_tensors(out), encoder_tensors(reference))


def test_explicit_checkpoint_every_overrides_the_automatic_rule(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(erase_cli, "AUTO_CHECKPOINT_INTERVAL_S", 0.0)

    def crash():
        raise RuntimeError("simulated crash in step 4")

    none = tmp_path / "none"
    with monkeypatch.context() as m:
        at_step(m, 4, crash)
        with pytest.raises(RuntimeError):
            main(erase_args(none, 6, "--scaling.checkpoint_every=0"))
    assert not list((none / "checkpoints").glob("step_*"))  # 0: no periodic checkpoint
    every2 = tmp_path / "every2"
    assert main(erase_args(every2, 7, "--scaling.checkpoint_every=2")) == 0
    assert [p.name for p in (every2 / "checkpoints").iterdir()] == ["step_000006"]  # kept, latest only


def test_resume_checks_run_before_any_model_loads(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        at_step(m, 2, lambda: os.kill(os.getpid(), signal.SIGINT))
        assert main(erase_args(out)) == 130
    capsys.readouterr()
    monkeypatch.setattr(loop, "load_pipeline", refuse_to_load)
    assert main(erase_args(out, 6, "--resume", "--retain.top_k=1")) == 2
    assert "was written with other settings (retain.top_k)" in capsys.readouterr().err
    assert main(erase_args(out, 3, "--resume")) == 2
    assert "has 3 completed steps and optim.num_steps=3: raise --steps" in capsys.readouterr().err
    assert main(erase_args(tmp_path / "empty", 6, "--resume")) == 2
    assert "--resume: no checkpoint in" in capsys.readouterr().err
    assert main(erase_args(tmp_path / "x", 6, "--resume-from", str(tmp_path))) == 2
    assert "is not a sage_dist checkpoint (no state.json)" in capsys.readouterr().err


def test_erase_logs_params_metrics_and_artifacts_to_mlflow(tmp_path, capsys):
    from mlflow import MlflowClient

    from sage_dist.tracking.mlflow_tracker import (
        list_artifacts,
        metric_history,
        search_runs,
    )

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "run"
    assert main(erase_args(out, 4, f"--tracking.tracking_uri={uri}", "--tracking.experiment_name=erase-test")) == 0
    [run] = search_runs(uri, "erase-test")
    assert f"run {run.info.run_id}" in capsys.readouterr().out
    assert run.info.status == "FINISHED" and run.data.tags["kind"] == "erase"
    assert run.data.params["optim.num_steps"] == "4" and run.data.params["model.model_id"] == "tiny-sd"
    assert [s for s, _ in metric_history(uri, run.info.run_id, "loss")] == [0, 1, 2, 3]
    assert {"record.json", "text_encoder"} <= set(list_artifacts(uri, run.info.run_id))
    assert "text_encoder/model.safetensors" in list_artifacts(uri, run.info.run_id, "text_encoder")
    local = MlflowClient(uri).download_artifacts(run.info.run_id, "text_encoder", str(tmp_path / "dl"))
    assert same_tensors(load_file(Path(local) / "model.safetensors"), encoder_tensors(out))


def test_bad_input_with_tracking_leaves_no_mlflow_run(tmp_path, capsys, no_model_loads):
    from sage_dist.tracking.mlflow_tracker import search_runs

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    retain = tmp_path / "retain.txt"
    retain.write_text("a photo of a chair\n")
    assert main(erase_args(tmp_path / "run", 4, f"--tracking.tracking_uri={uri}",
                           f"--retain.retain_prompts={retain}")) == 2
    assert "retain" in capsys.readouterr().err
    assert search_runs(uri, "sage_dist") == []


def test_unreachable_tracking_server_fails_before_any_model_loads(tmp_path, capsys, no_model_loads):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    assert main(erase_args(tmp_path / "run", 4, f"--tracking.tracking_uri=http://127.0.0.1:{port}")) == 2
    assert f"MLflow server http://127.0.0.1:{port} is not reachable" in capsys.readouterr().err
    assert time.perf_counter() - t0 < 30


def test_tracking_fields_without_a_uri_warn_that_they_are_ignored(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        assert main(erase_args(tmp_path / "run", 2, "--tracking.experiment_name=mine")) == 0
    assert "tracking.experiment_name ignored: sage-dist erase logs to MLflow only with --tracking.tracking_uri" \
        in caplog.text


class FlakyTracker:
    """Fails its first ``failures`` calls (a server that is down, then back), records the rest."""

    run_id = "flaky"

    def __init__(self, failures: int, delay_s: float = 0.0):
        self.failures, self.delay_s, self.calls, self.received = failures, delay_s, 0, []

    def log_metrics(self, metrics, step):
        self.calls += 1
        time.sleep(self.delay_s)
        if self.calls <= self.failures:
            raise ConnectionError("server down")
        self.received.append((step, metrics["loss"]))

    def end(self, status="FINISHED", reason=""):
        self.received.append(("end", status))


def test_background_tracker_retries_in_order_without_blocking_the_caller(monkeypatch):
    monkeypatch.setattr(BackgroundTracker, "RETRY_MAX_S", 0.05)
    inner = FlakyTracker(failures=3, delay_s=0.05)
    tracker = BackgroundTracker(inner)
    t0 = time.perf_counter()
    for step in range(20):
        tracker.log_metrics({"loss": float(step)}, step)
    tracker.end("FINISHED")
    assert time.perf_counter() - t0 < 0.05  # 20 calls queued while the first one was still failing
    assert tracker.close(timeout_s=10)
    assert inner.received == [(s, float(s)) for s in range(20)] + [("end", "FINISHED")]
    assert not [t for t in threading.enumerate() if t.name == "sage-dist-tracking" and t.is_alive()]


def test_background_tracker_gives_up_on_a_dead_server_with_a_warning(caplog):
    inner = FlakyTracker(failures=10**9)
    tracker = BackgroundTracker(inner)
    for step in range(5):
        tracker.log_metrics({"loss": 1.0}, step)
    tracker.end("FINISHED")
    t0 = time.perf_counter()
    with caplog.at_level(logging.WARNING):
        assert tracker.close(timeout_s=0.5) is False
    assert time.perf_counter() - t0 < 5
    assert "log_metrics failed (ConnectionError: server down); training goes on" in caplog.text
    assert "MLflow FlakyTracker did not answer for 0.5 s (ConnectionError: server down)" in caplog.text
    assert "5 log_metrics calls, 1 end call not logged" in caplog.text
