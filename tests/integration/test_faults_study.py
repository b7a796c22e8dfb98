"""Faults injected into running search studies (tiny-sd under local Ray, 2 CPUs):

* the MLflow tracking server killed mid-study and brought back 2 s later: every trial finishes, no metric is
  lost or logged twice, the study ends FINISHED;
* a Ray Train worker process killed mid-trial: the trial resumes from its last checkpoint and ends with the
  same encoder, bit for bit, as an uninterrupted run;
* the study driver killed (SIGKILL) twice in a row, each time followed by ``--resume``: nothing finished is
  lost and nothing is repeated (counted through the trials' MLflow runs, their per-step losses and records).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.ray

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import tiny_study  # noqa: E402

NUM_STEPS = 6
"""Steps per trial: checkpoints after 2 and 4 steps (``scaling.checkpoint_every=2``); MLflow logs the losses at
steps 0..5."""


def _config(uri: str):
    return tiny_study.config(uri).replace_flat({"optim.num_steps": NUM_STEPS})


def _loss_steps(uri: str, run_id: str) -> list[int]:
    """The steps (0-based) at which ``run_id`` logged its loss, one entry per logging, sorted."""
    from sage_dist.tracking.mlflow_tracker import metric_history

    return sorted(step for step, _ in metric_history(uri, run_id, "loss"))


def _saved_steps(storage: Path) -> dict[str, int]:
    """Per trial id, the steps done at the latest checkpoint its Train run would resume from (Ray Train's own
    record of it; for a one-worker trial running in its own process, its latest ``train/<trial id>/step_N``),
    0 for a trial without one."""
    from sage_dist.train.checkpoint import checkpoint_step, latest_checkpoint

    saved = {}
    for folder in storage.glob("tiny-*/train/*"):
        latest = latest_checkpoint(folder)
        if latest is not None:
            saved[folder.name] = checkpoint_step(latest)
    for snapshot in storage.glob("tiny-*/train/*/checkpoint_manager_snapshot.json"):
        try:
            latest = json.loads(snapshot.read_text())["latest_checkpoint_result"]
        except (ValueError, KeyError):
            latest = None  # being written: resume would use the one before, which this undercounts safely
        saved[snapshot.parent.name] = int(latest["metrics"]["step"]) if latest else 0
    return saved


def _logged_steps(uri: str) -> dict[str, list[int]]:
    """Per trial id, the loss steps its child run has logged so far."""
    from sage_dist.tracking.mlflow_tracker import search_runs

    return {r.data.tags["trial_id"]: _loss_steps(uri, r.info.run_id)
            for r in search_runs(uri, "tiny_study", "tags.`trial_id` != ''")}


def _my_processes(marker: str) -> list:
    """Descendants of this test process whose command line (Ray's process title) contains ``marker``."""
    import psutil

    found = []
    for proc in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if marker in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def _in_background(fn) -> threading.Thread:
    errors: list[BaseException] = []

    def run():
        try:
            fn()
        except BaseException as err:  # noqa: BLE001 - re-raised by the test through join_checked
            errors.append(err)

    thread = threading.Thread(target=run, daemon=True)
    thread.errors = errors
    thread.start()
    return thread


def _join_checked(thread: threading.Thread) -> None:
    thread.join(timeout=300)
    assert not thread.is_alive(), "the fault injector never finished"
    if thread.errors:
        raise thread.errors[0]


def test_tracking_server_killed_mid_study(tmp_path, local_ray):
    """SIGKILL of the server's process group while both trials train; a supervisor brings it back on the same
    port and store 2 s later. MLflow's client retries its requests meanwhile (with backoff), so the trials
    wait instead of failing, and every per-step loss arrives exactly once."""
    from mlflow import MlflowClient

    from sage_dist.tracking.mlflow_tracker import child_runs, search_runs
    from sage_dist.tune.search import run_search

    root, port = tmp_path / "server", tiny_study.free_port()
    uri = f"http://127.0.0.1:{port}"
    servers = [tiny_study.start_mlflow_server(root, port)]
    storage = tmp_path / "studies"
    outage = []

    def kill_and_restart():
        tiny_study.wait_for(lambda: list(storage.glob("tiny-*/train/*/step_*")), "a trial's first checkpoint")
        tiny_study.stop_group(servers[0], first=signal.SIGKILL)
        outage.append(time.time())
        time.sleep(2)
        servers.append(tiny_study.start_mlflow_server(root, port))

    injector = _in_background(kill_and_restart)
    try:
        out = run_search(_config(uri), tiny_study.search_space,
                         tiny_study.options(str(storage), num_samples=2, max_concurrent=2, log_images=False))
        _join_checked(injector)
        assert [r.status for r in out.rows] == ["ok", "ok"], out.table
        assert not out.interrupted and out.tracking_error == ""
        runs = child_runs(uri, out.parent_run_id)
        assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
        client_history = MlflowClient(uri)
        for run in runs:
            # every step's loss arrived; a request in flight when the server died may arrive twice (MLflow's
            # client retries it), always with the same value
            history = client_history.get_metric_history(run.info.run_id, "loss")
            assert sorted({m.step for m in history}) == list(range(NUM_STEPS))
            values = {}
            for m in history:
                assert values.setdefault(m.step, m.value) == m.value, (m.step, values[m.step], m.value)
        # the trials were still logging when the server went down (their last losses date from the outage on)
        client = MlflowClient(uri)
        last_loss_ms = max(m.timestamp for r in runs for m in client.get_metric_history(r.info.run_id, "loss"))
        assert last_loss_ms >= outage[0] * 1000, (last_loss_ms, outage)
        (parent,) = search_runs(uri, "tiny_study", "tags.`sage_dist.kind` = 'study'")
        assert parent.info.status == "FINISHED"
    finally:
        for server in servers:
            tiny_study.stop_group(server)


def test_train_worker_killed_mid_trial_resumes_to_the_same_encoder(tmp_path, local_ray):
    """SIGKILL of the trial's Ray Train worker after its first checkpoint: Tune retries the trial, whose Train
    run continues from the checkpoint; the encoder equals, bit for bit, an uninterrupted in-process run of the
    same trial config."""
    from safetensors.torch import load_file

    from sage_dist.config import StudyConfig
    from sage_dist.train.ray_worker import WorkerRun, train_fn_per_worker, worker_config
    from sage_dist.tune.search import run_search

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage = tmp_path / "studies"
    killed = []

    def kill_worker():
        tiny_study.wait_for(lambda: any(_saved_steps(storage).values()), "the trial's first checkpoint")
        workers = tiny_study.wait_for(lambda: _my_processes("ray::RayTrainWorker") or _my_processes("ray::ImplicitFunc"),
                                      "the process that trains (Train worker, or the one-worker trial's own)")
        for proc in workers:
            proc.send_signal(signal.SIGKILL)
            killed.append(proc.pid)

    injector = _in_background(kill_worker)
    out = run_search(_config(uri), tiny_study.search_space, tiny_study.options(str(storage), 1, 1, log_images=False))
    _join_checked(injector)
    assert killed and [r.status for r in out.rows] == ["ok"], out.table

    from sage_dist.tracking.mlflow_tracker import child_runs

    (run,) = child_runs(out.tracking_uri, out.parent_run_id)
    assert run.data.tags["sage_dist.attempts"] == "2"  # the trial was retried ...
    steps = _loss_steps(out.tracking_uri, run.info.run_id)
    assert steps[:2] == [0, 1] and set(steps) == set(range(NUM_STEPS)), steps  # ... from its checkpoint

    trial_dir = out.study_dir / "encoders" / out.rows[0].trial_id
    record = json.loads((trial_dir / "record.json").read_text())
    cfg = StudyConfig.from_flat_dict({k: tuple(v) if isinstance(v, list) else v for k, v in record["config"].items()})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the Ray worker (cpus_per_worker < 2)
    try:
        train_fn_per_worker(worker_config(cfg, WorkerRun(out_dir=str(tmp_path / "reference"), log_images=False,
                                                         log_encoder=False)))
    finally:
        torch.set_num_threads(threads)
    resumed = load_file(trial_dir / "text_encoder" / "model.safetensors")
    reference = load_file(tmp_path / "reference" / "text_encoder" / "model.safetensors")
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)
    assert record["history"] == json.loads((tmp_path / "reference" / "record.json").read_text())["history"]
    assert len(record["history"]) == NUM_STEPS


def _trial_finished_in_saved_state(storage: Path) -> str:
    """The id of a trial that Tune's saved experiment state records as TERMINATED ("" if none yet)."""
    for state in storage.glob("tiny-*/experiment_state-*.json"):
        try:
            entries = json.loads(state.read_text())["trial_data"]
        except (ValueError, KeyError):
            continue  # being written
        for entry in entries:
            trial = json.loads(entry[0]) if isinstance(entry[0], str) else entry[0]
            if trial.get("status") == "TERMINATED":
                return trial["trial_id"]
    return ""


@pytest.mark.slow  # timing-bound: one-worker trials in a reused process finish in ~5 s, often before Tune has saved
# the first one as finished, and then no trial is left for the second kill; it needs a slower second trial
def test_driver_killed_twice_then_resumed_loses_and_repeats_nothing(tmp_path, local_ray):
    """The driver's whole process group (its local Ray included) gets SIGKILL once Tune has saved the first
    trial as finished; the ``--resume`` driver gets SIGKILL while it trains the second trial; a last
    ``--resume`` finishes the study. Counted: two trials, two child runs, one parent run, two trial records;
    the finished trial's losses logged once each; and after each kill no step that a checkpoint held was
    trained (logged) again."""
    from collections import Counter

    from ray.tune.search.optuna import OptunaSearch

    from sage_dist.tracking.mlflow_tracker import child_runs, search_runs
    from sage_dist.tune.search import run_search

    # long enough that the second trial is still training when Tune has saved the first one as finished (a
    # trial in a reused process takes ~0.5 s per step)
    steps_per_trial = 5 * NUM_STEPS
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage = tmp_path / "studies"
    argv = ["--storage", str(storage), "--tracking-uri", uri, "--num-samples", "2", "--max-concurrent", "1",
            "--no-images", f"--optim.num_steps={steps_per_trial}"]
    at_kill = []  # per kill: (checkpointed steps, logged steps) per trial, read just before the SIGKILL

    def kill(driver) -> None:
        saved = _saved_steps(storage)  # first: a checkpoint is saved only after its steps were logged
        at_kill.append((saved, _logged_steps(uri)))
        tiny_study.stop_group(driver, first=signal.SIGKILL)

    log1 = tmp_path / "driver1.log"
    driver = tiny_study.study_driver(tmp_path, argv, log1.name)
    try:
        first_id = tiny_study.wait_for(lambda: _trial_finished_in_saved_state(storage),
                                       "Tune's saved state to hold the first trial as finished", log1)
        kill(driver)
    finally:
        tiny_study.stop_group(driver, first=signal.SIGKILL)

    log2 = tmp_path / "driver2.log"
    driver = tiny_study.study_driver(tmp_path, [*argv, "--resume"], log2.name)
    try:
        tiny_study.wait_for(lambda: "erasing (" in log2.read_text(), "the resumed driver to train", log2)
        kill(driver)
    finally:
        tiny_study.stop_group(driver, first=signal.SIGKILL)

    out = run_search(_config(uri).replace_flat({"optim.num_steps": steps_per_trial}), tiny_study.search_space,
                     tiny_study.options(str(storage), 2, 1, resume="latest", log_images=False))
    assert [r.status for r in out.rows] == ["ok", "ok"] and not out.interrupted, out.table
    assert first_id in {r.trial_id for r in out.rows}
    (parent,) = search_runs(uri, "tiny_study", "tags.`sage_dist.kind` = 'study'")
    assert parent.info.status == "FINISHED" and parent.data.tags["sage_dist.attempts"] == "3"
    runs = {r.data.tags["trial_id"]: r for r in child_runs(uri, out.parent_run_id)}
    assert len(runs) == 2 and {r.info.status for r in runs.values()} == {"FINISHED"}
    assert "sage_dist.attempts" not in runs[first_id].data.tags  # the finished trial never ran again
    final = {trial_id: _loss_steps(uri, run.info.run_id) for trial_id, run in runs.items()}
    assert final[first_id] == list(range(steps_per_trial))
    for trial_id, steps in final.items():
        assert set(steps) == set(range(steps_per_trial)), (trial_id, steps)  # nothing lost
        for saved, logged in at_kill:  # steps a checkpoint held at a kill were not logged again after it
            before, after = Counter(logged.get(trial_id, [])), Counter(steps)
            assert all(after[s] == before[s] for s in range(saved.get(trial_id, 0))), (trial_id, at_kill, steps)
    records = sorted(p.parent.name for p in out.study_dir.glob("encoders/*/record.json"))
    assert records == sorted(runs)
    for trial_id in runs:
        history = json.loads((out.study_dir / "encoders" / trial_id / "record.json").read_text())["history"]
        assert len(history) == steps_per_trial
    searcher = OptunaSearch()
    searcher.restore_from_dir(str(out.study_dir))
    assert len(searcher._ot_study.trials) == 2
