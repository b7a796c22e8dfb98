"""A tiny-sd study for the Ray/MLflow integration tests (also run as a study script by the resume and
interruption tests, through the search studies' command line).

    python -c "import sys; sys.path.insert(0, 'tests/integration'); import tiny_study; \
tiny_study.main(['--storage', 'STORAGE', '--tracking-uri', 'TRACKING_URI', '--num-samples', '2'])"
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from sage_dist.cli import study as study_cli
from sage_dist.cli.studies import main as grid_cli
from sage_dist.config import (
    AttackConfig,
    EraseConfig,
    ModelConfig,
    OptimConfig,
    RetainConfig,
    ScalingConfig,
    StudyConfig,
    TrackingConfig,
)
from sage_dist.tune.grid import GridStudy, Variant
from sage_dist.tune.search import StudyOptions
from sage_dist.tune.space import SageSpace

SPACE = SageSpace(retain_loss_weight=(0.1, 10.0), attack_steps=(1, 3), top_k=(1, 2), warmup_steps=(0, 2))
NAN_TRIAL = 1
"""Optuna trial number whose learning rate makes the loss NaN (fault-injection for the failure path)."""


def config(tracking_uri: str = "") -> StudyConfig:
    return StudyConfig(model=ModelConfig(model_id="tiny-sd"), optim=OptimConfig(num_steps=4, lr=1e-3),
                       erase=EraseConfig(warmup_steps=2, ddim_steps=4), attack=AttackConfig(attack_steps=2),
                       retain=RetainConfig(retain_batch_size=4, top_k=2),
                       scaling=ScalingConfig(num_workers=1, cpus_per_worker=0.8, checkpoint_every=2),
                       tracking=TrackingConfig(tracking_uri=tracking_uri, experiment_name="tiny_study"))


def search_space(trial) -> dict:
    SPACE.suggest(trial)
    return {}


def search_space_with_nan(trial) -> dict:
    """As :func:`search_space`; trial number ``NAN_TRIAL`` gets lr 1e4, which makes tiny-sd's loss NaN."""
    SPACE.suggest(trial)
    return {"optim.lr": 1e4} if trial.number == NAN_TRIAL else {}


def options(storage: str, num_samples: int, max_concurrent: int, resume: str = "", *,
            log_images: bool = True) -> StudyOptions:
    return StudyOptions(name="tiny", num_samples=num_samples, storage=storage, ray_address="local",
                        max_concurrent=max_concurrent, resume=resume, log_encoder=True, log_images=log_images)


def smoke(cfg: StudyConfig) -> StudyConfig:
    """The ``--smoke-test`` budget: half the steps, one checkpoint."""
    return cfg.replace_flat({"optim.num_steps": 2, "erase.warmup_steps": 1, "scaling.checkpoint_every": 1})


def main(argv: list[str]):
    """Run as ``python -c "import tiny_study; tiny_study.main([...])"`` so that the searcher state pickles
    ``tiny_study.search_space`` (not ``__main__.search_space``) and the test process can restore it. ``argv``
    are the search studies' options; the study runs on its own local Ray instance."""
    return study_cli.main(config, search_space, ["--ray-address", "local", *argv], name="tiny", default_samples=2,
                          smoke=smoke, description=__doc__)


def grid_study(model: str | None = None) -> GridStudy:
    """A two-cell grid study on tiny-sd (text-space metrics), for the grid studies' command line."""
    return GridStudy(name="tiny_grid", question="Does the retention weight move the text proxy?",
                     base=config().replace_flat({"scaling.checkpoint_every": 0}),
                     variants=(Variant(name="low", overrides={"retain.retain_loss_weight": 0.2}),
                               Variant(name="high", overrides={"retain.retain_loss_weight": 5.0})),
                     seeds=(0,), metrics=("text_erasure", "text_retention_drift"), plot_metrics=("text_erasure",))


def grid_main(argv: list[str]):
    """``python -c "import tiny_study; tiny_study.grid_main([...])"``: the grid studies' command line on
    :func:`grid_study`, on its own local Ray instance."""
    return grid_cli(grid_study, ["--ray-address", "local", *argv], title="tiny grid")


# ---- processes of the integration tests ------------------------------------------------------------------
HERE = Path(__file__).resolve().parent
MLFLOW = str(Path(sys.executable).parent / "mlflow")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_group(proc: subprocess.Popen, first: int = signal.SIGTERM) -> None:
    """Stop a process group a test started (``first``, then KILL)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, first)
        proc.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=20)


def start_mlflow_server(root: Path, port: int, timeout_s: float = 120.0) -> subprocess.Popen:
    """``mlflow server`` on 127.0.0.1:``port`` with its store under ``root``, in its own process group; returns
    once it answers ``/health``."""
    import requests

    root.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([MLFLOW, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                             "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                             "--artifacts-destination", str(root / "artifacts")],
                            stdout=open(root / "server.log", "a"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except requests.RequestException:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited: {(root / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    stop_group(proc)
    raise RuntimeError(f"mlflow server did not answer /health within {timeout_s:.0f} s")


def study_driver(folder: Path, argv: list[str], log_name: str, entry: str = "main") -> subprocess.Popen:
    """``tiny_study.<entry>(argv)`` (a study's command line) in its own session, as a user starts it."""
    code = f"import sys; sys.path.insert(0, {str(HERE)!r}); import tiny_study; tiny_study.{entry}({argv!r})"
    return subprocess.Popen([sys.executable, "-c", code], cwd=folder, start_new_session=True,
                            stdout=open(folder / log_name, "w"), stderr=subprocess.STDOUT)


def wait_for(condition, what: str, log: Path | None = None, timeout_s: float = 240.0,
             process: subprocess.Popen | None = None):
    """Poll ``condition()`` until it returns something truthy (returned); AssertionError with the log's tail on a
    timeout, or as soon as ``process`` (the driver being watched) has exited."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        found = condition()
        if found:
            return found
        if process is not None and process.poll() is not None:
            tail = log.read_text()[-3000:] if log is not None and log.is_file() else ""
            raise AssertionError(f"the driver exited (code {process.returncode}) before {what}\n{tail}")
        time.sleep(0.3)
    tail = log.read_text()[-3000:] if log is not None and log.is_file() else ""
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}\n{tail}")


if __name__ == "__main__":
    main(sys.argv[1:])
