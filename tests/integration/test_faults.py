"""Faults injected into ``sage-dist erase`` on tiny-sd: a full disk while writing a checkpoint or the final
outputs, SIGINT to a real ``sage-dist erase`` process, and an MLflow server that is down at start or killed
mid-run (a real ``mlflow server`` on 127.0.0.1 in its own process group). Each ends in a clear message, with
nothing finished lost, and every resume ends with the same encoder, bit for bit, as an uninterrupted run."""

from __future__ import annotations

import errno
import json
import os
import pathlib
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

import sage_dist.train.checkpoint as checkpoint_mod
from sage_dist.cli.main import main
from tests.component.test_erase_cli import (
    encoder_tensors,
    erase_args,
    folder_digest,
    same_tensors,
)

REPO = Path(__file__).resolve().parents[2]
MLFLOW = str(Path(sys.executable).parent / "mlflow")
CLI = [sys.executable, "-m", "sage_dist.cli.main"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return {**env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fail_on_call(monkeypatch, target, name: str, call: int, should_fail=lambda *a: True) -> None:
    """Make ``target.name`` raise ENOSPC on its ``call``-th matching call (1-based), as a full disk would."""
    original = getattr(target, name)
    seen = {"n": 0}

    def writer(*args, **kwargs):
        if should_fail(*args):
            seen["n"] += 1
            if seen["n"] == call:
                raise OSError(errno.ENOSPC, "No space left on device")
        return original(*args, **kwargs)

    monkeypatch.setattr(target, name, writer)


def test_disk_full_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        # each checkpoint writes three safetensors files: fail the second file of the second checkpoint
        _fail_on_call(m, checkpoint_mod, "save_file", call=5)
        assert main(erase_args(out, 6, "--scaling.checkpoint_every=2")) == 1
    err = capsys.readouterr().err
    previous = out / "checkpoints" / "step_000002"
    assert (f"no space left on device while writing checkpoint {out / 'checkpoints' / 'step_000004'}; the previous "
            f"checkpoint {previous} is intact") in err
    assert "Traceback" not in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000002"]  # no half-written folder
    assert main(erase_args(out, 6, "--scaling.checkpoint_every=2", "--resume")) == 0
    reference = tmp_path / "reference"
    assert main(erase_args(reference, 6, "--scaling.checkpoint_every=2")) == 0
    assert same_tensors(encoder_tensors(out), encoder_tensors(reference))


def test_disk_full_at_the_final_save_keeps_the_earlier_outputs(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert main(erase_args(out, 6, "--seed", "1")) == 0
    finished = (folder_digest(out / "text_encoder"), (out / "record.json").read_bytes())
    again = [*erase_args(out, 6), "--overwrite", "--scaling.checkpoint_every=2"]
    with monkeypatch.context() as m:
        _fail_on_call(m, pathlib.Path, "write_text", call=1,
                      should_fail=lambda path, *a: path.name == "record.json" and ".outputs.partial-" in str(path))
        assert main(again) == 1
    err = capsys.readouterr().err
    latest = out / "checkpoints" / "step_000004"
    assert f"no space left on device while writing the outputs to {out}; nothing in {out} was replaced" in err
    assert f"resume from the latest checkpoint with: sage-dist {' '.join(again)} --resume-from {latest}" in err
    assert (folder_digest(out / "text_encoder"), (out / "record.json").read_bytes()) == finished
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # the staging folder is gone
    assert main([*again, "--resume-from", str(latest)]) == 0
    reference = tmp_path / "reference"
    assert main(erase_args(reference, 6)) == 0
    assert same_tensors(encoder_tensors(out), encoder_tensors(reference))


def _wait_for(predicate, timeout_s: float, what: str, proc: subprocess.Popen | None = None):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the process ended (rc {proc.returncode}) before {what}")
        time.sleep(0.02)
    pytest.fail(f"timed out after {timeout_s} s waiting for {what}")


def _run(args: list[str], cwd: Path, timeout_s: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout_s)


def test_sigint_to_a_real_erase_saves_a_checkpoint_that_resumes_bit_for_bit(tmp_path):
    """SIGINT as soon as the first checkpoint (step 2) is on disk; a tiny-sd step takes 0.1-0.3 s, so the run
    is still training when the signal arrives."""
    steps = 24
    out = tmp_path / "run"
    args = erase_args(out, steps, "--scaling.checkpoint_every=2")
    proc = subprocess.Popen([*CLI, *args], cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        _wait_for(lambda: checkpoint_mod.latest_checkpoint(out / "checkpoints"), 300, "the first checkpoint", proc)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    [line] = [ln for ln in err.splitlines() if ln.startswith("resume with: ")]
    command = shlex.split(line.removeprefix("resume with: "))
    assert command[0] == "sage-dist" and command[-2] == "--resume-from"
    ckpt = Path(command[-1])
    assert checkpoint_mod.list_checkpoints(out / "checkpoints") == [ckpt]  # the latest only
    assert 2 <= checkpoint_mod.checkpoint_step(ckpt) < steps and not (out / "record.json").exists()
    resumed = _run(command[1:], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reference = _run(erase_args(tmp_path / "reference", steps, "--scaling.checkpoint_every=2"), tmp_path)
    assert reference.returncode == 0, reference.stderr[-3000:]
    assert same_tensors(encoder_tensors(out), encoder_tensors(tmp_path / "reference"))
    history = [h["loss"] for h in json.loads((out / "record.json").read_text())["history"]]
    assert history == [h["loss"] for h in json.loads((tmp_path / "reference" / "record.json").read_text())["history"]]


def _stop_group(proc: subprocess.Popen) -> None:
    """Stop a process group this test started (KILL: a server that dies without a word)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


@pytest.fixture
def mlflow_server(tmp_path):
    """``mlflow server`` on 127.0.0.1:<free port> in its own process group, with a SQLite store that the test
    reads directly after the server is gone; yields ``(url, store uri, process)``."""
    root = tmp_path / "mlflow_server"
    root.mkdir()
    port = _free_port()
    store = f"sqlite:///{root / 'mlflow.db'}"
    proc = subprocess.Popen([MLFLOW, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                             "--backend-store-uri", store, "--artifacts-destination", str(root / "artifacts")],
                            stdout=open(root / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def healthy():
        try:
            return requests.get(f"{url}/health", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    try:
        _wait_for(healthy, 180, "mlflow server to answer /health", proc)
        yield url, store, proc
    finally:
        _stop_group(proc)


def test_tracking_server_down_at_start_fails_before_any_model_loads(tmp_path):
    port = _free_port()
    t0 = time.monotonic()
    result = _run(erase_args(tmp_path / "run", 60, f"--tracking.tracking_uri=http://127.0.0.1:{port}"), tmp_path)
    assert result.returncode == 2
    assert f"error: MLflow server http://127.0.0.1:{port} is not reachable" in result.stderr
    assert "or drop --tracking.tracking_uri to train without MLflow logging" in result.stderr
    assert "Traceback" not in result.stderr and "step/s" not in result.stderr  # no training step started
    assert not (tmp_path / "run" / "record.json").exists()
    assert time.monotonic() - t0 < 120


@pytest.mark.slow  # about 90 s: a server start, and 30 s of retries at the end (TRACKING_CLOSE_TIMEOUT_S)
def test_tracking_server_killed_mid_run_the_run_finishes_and_warns(tmp_path, mlflow_server):
    from sage_dist.tracking.mlflow_tracker import metric_history, search_runs

    url, store, server = mlflow_server
    out = tmp_path / "run"
    args = erase_args(out, 60, f"--tracking.tracking_uri={url}", "--tracking.experiment_name=faults")
    proc = subprocess.Popen([*CLI, *args], cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        def first_losses():
            runs = search_runs(store, "faults")
            return runs and metric_history(store, runs[0].info.run_id, "loss")

        _wait_for(first_losses, 300, "the first loss in MLflow", proc)
        _stop_group(server)
        stdout, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    assert "training goes on" in err and "not logged; the run's outputs and record.json are complete" in err
    assert "MLflow logging incomplete" in stdout
    record = json.loads((out / "record.json").read_text())
    assert len(record["history"]) == 60 and (out / "text_encoder" / "model.safetensors").is_file()
    [run] = search_runs(store, "faults")
    assert run.data.params["optim.num_steps"] == "60"
    assert 1 <= len(metric_history(store, run.info.run_id, "loss")) < 60
