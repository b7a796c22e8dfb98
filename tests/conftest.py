"""Shared fixtures: tiny configs and paths. Everything is CPU, offline and seeded."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: see sage_dist/__init__.py
# A developer's own MLflow server or study storage must not receive test runs (the defaults read these).
for _name in ("MLFLOW_TRACKING_URI", "SAGE_DIST_STORAGE", "SAGE_DIST_STORAGE_SHARED"):
    os.environ.pop(_name, None)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_flush_denormal(True)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def tiny_config(**flat):
    """A seconds-long SAGE config on tiny-sd; ``flat`` holds dotted overrides."""
    from sage_dist.config import StudyConfig

    base = {"model.model_id": "tiny-sd", "optim.num_steps": 4, "optim.lr": 1e-3, "erase.warmup_steps": 2,
            "erase.ddim_steps": 4, "attack.attack_steps": 3, "retain.retain_batch_size": 4, "retain.top_k": 2}
    base.update(flat)
    return StudyConfig().replace_flat(base)


@pytest.fixture
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"../shared is not beside the repo ({SHARED}); the shared prompt sets are needed")
    return SHARED


# ---- process exit -------------------------------------------------------------------------------------------
# Tests that start Ray in this process leave its gRPC and core-worker native threads running after ray.shutdown()
# (8 more threads than before ray.init); CPython's module teardown under live native threads can crash the
# process once every result is final (exit status 139 after a green summary). The session therefore ends by
# running the exit handlers and leaving without that teardown, with pytest's own exit status; a crash in an exit
# handler still fails the run and prints every thread's stack. SAGE_DIST_TEST_FULL_TEARDOWN=1 keeps the normal
# interpreter exit (to look for what crashes there).
_EXIT_STATUS: int | None = None


@pytest.fixture(autouse=True)
def _mlflow_retry_setting_stays_in_its_test():
    """The erase command caps MLflow's HTTP retries process-wide (``limit_http_retries``); run in-process by a
    test, the cap would reach every later test, and the Ray workers started after it, so a test that restarts
    its tracking server would get 2 retries instead of MLflow's 7."""
    saved = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    yield
    if saved is None:
        os.environ.pop("MLFLOW_HTTP_REQUEST_MAX_RETRIES", None)
    else:
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = saved


def pytest_sessionfinish(session, exitstatus):
    global _EXIT_STATUS
    _EXIT_STATUS = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    import atexit
    import faulthandler
    import sys

    if _EXIT_STATUS is None or os.environ.get("SAGE_DIST_TEST_FULL_TEARDOWN"):
        return
    capture = config.pluginmanager.getplugin("capturemanager")
    if capture is not None:  # its cleanup would run after this hook: give the terminal its file descriptors back
        capture.stop_global_capturing()
    faulthandler.enable(file=sys.__stderr__, all_threads=True)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_EXIT_STATUS)
