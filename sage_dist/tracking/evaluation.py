"""Log one ``sage-dist evaluate`` run to MLflow (the only MLflow import of the evaluation code).

    >>> log_evaluation("sqlite:////abs/mlflow.db", experiment="sage_dist-eval", run_name="eval-nudity",
    ...                params={"protocol": "nudity"}, metrics={"erasure.rer_images": 0.8},
    ...                artifacts=[Path("runs/eval/nudity/metrics.json")])
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

MAX_PARAM_LENGTH = 6000
BATCH = 100
HTTP_RETRY_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                       "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
"""MLflow's HTTP retry settings while an evaluation logs (unless the user set them): a server that stopped
answering fails in seconds, not after MLflow's default of 7 retries with exponential back-off (minutes)."""


class TrackingUnavailableError(ConnectionError):
    """The tracking store stopped answering (or refused a write) while an evaluation was being logged."""


@contextlib.contextmanager
def _short_http_retries() -> Iterator[None]:
    added = [k for k in HTTP_RETRY_DEFAULTS if k not in os.environ]
    os.environ.update({k: HTTP_RETRY_DEFAULTS[k] for k in added})
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def _artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """``sqlite:////abs/mlflow.db`` -> ``file:///abs/artifacts/<experiment>``; servers choose their own."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///"):])
        if not db.is_absolute():
            raise ValueError(f"--tracking-uri {tracking_uri!r}: use an absolute path, sqlite:////abs/path.db")
        return (db.parent / "artifacts" / experiment).as_uri()
    return None


def log_evaluation(tracking_uri: str, *, experiment: str, run_name: str, params: dict[str, Any],
                   metrics: dict[str, float], artifacts: Sequence[Path] = (), tags: dict[str, str] | None = None
                   ) -> str:
    """Create a finished MLflow run with ``params``, numeric ``metrics`` and files ``artifacts``.

    Returns:
        The run id.

    Raises:
        ValueError: a relative SQLite path.
        TrackingUnavailableError: the store failed while logging (server down, network, disk); the message
            names the URI and the cause. The run, if it was created, is marked FAILED when the store still
            answers.
    """
    import requests
    from mlflow.exceptions import MlflowException

    _artifact_location(tracking_uri, experiment)  # a bad URI is a ValueError, not a tracking failure
    try:
        with _short_http_retries():
            return _log(tracking_uri, experiment=experiment, run_name=run_name, params=params, metrics=metrics,
                        artifacts=artifacts, tags=tags)
    except (MlflowException, requests.RequestException, OSError) as err:
        first_line = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
        raise TrackingUnavailableError(f"MLflow at {tracking_uri} failed while logging the evaluation "
                                       f"({type(err).__name__}: {first_line})") from err


def _log(tracking_uri: str, *, experiment: str, run_name: str, params: dict[str, Any], metrics: dict[str, float],
         artifacts: Sequence[Path], tags: dict[str, str] | None) -> str:
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        exp_id = client.create_experiment(experiment, artifact_location=_artifact_location(tracking_uri, experiment))
    else:
        exp_id = exp.experiment_id
    run = client.create_run(exp_id, run_name=run_name, tags={"sage_dist.kind": "evaluation", **(tags or {})})
    run_id = run.info.run_id
    try:
        param_items = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in params.items()]
        metric_items = [Metric(k, float(v), 0, 0) for k, v in metrics.items()]
        for i in range(0, len(param_items), BATCH):
            client.log_batch(run_id, params=param_items[i:i + BATCH])
        for i in range(0, len(metric_items), BATCH):
            client.log_batch(run_id, metrics=metric_items[i:i + BATCH])
        for path in artifacts:
            client.log_artifact(run_id, str(path))
        client.log_batch(run_id, tags=[RunTag("sage_dist.num_metrics", str(len(metric_items)))])
    except Exception:
        with contextlib.suppress(Exception):  # the store may be the thing that failed
            client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")
    return run_id
