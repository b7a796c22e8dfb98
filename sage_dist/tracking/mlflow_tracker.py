"""MLflow tracking for erasure runs and studies (the only module that imports ``mlflow``).

One parent run per study, one nested child run per trial (tag ``mlflow.parentRunId``). Everything goes
through :class:`mlflow.MlflowClient` with explicit run ids (no global active run), so a Ray Train worker,
a Tune trial process and the study driver can all write to the same run safely.

Where runs go (:func:`resolve_tracking`):

* ``""`` (default): MLflow's own ``MLFLOW_TRACKING_URI`` environment variable when it is set (the cluster
  configs set it on every node to the head's MLflow server, so trials on GPU nodes log there and not into a
  node-local file); otherwise a local SQLite store ``sqlite:///$HOME/.sage_dist/mlflow/mlflow.db`` with
  artifacts under ``$HOME/.sage_dist/mlflow/artifacts`` (absolute paths: Tune trials change directory).
* ``http://host:port``: an MLflow tracking server (artifacts are proxied by the server).
* ``sqlite:////abs/path.db``: another SQLite file; artifacts go to ``<db folder>/artifacts``.

Open the UI on what was logged (printed by every study, see :func:`ui_instructions`)::

    mlflow ui --backend-store-uri sqlite:///$HOME/.sage_dist/mlflow/mlflow.db --host 127.0.0.1 --port 5000

Errors: :func:`check_tracking_reachable` raises ``ConnectionError`` at start when a server does not answer,
``ValueError`` for a malformed URI or an unwritable SQLite folder. :class:`BackgroundTracker` sends a run's
records from a thread and retries them, so a server that fails mid-run never stops the training.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from sage_dist.files import ensure_writable_folder

log = logging.getLogger(__name__)

MAX_PARAM_LENGTH = 6000
"""MLflow's limit on one parameter value (longer values are truncated with a warning)."""
BATCH = 100
"""Metrics/params per ``log_batch`` call (MLflow allows 1000 metrics, 100 params)."""

RunStatus = Literal["FINISHED", "FAILED", "KILLED"]


def default_home() -> Path:
    """``$HOME/.sage_dist/mlflow`` (override with the ``SAGE_DIST_MLFLOW_HOME`` environment variable)."""
    return Path(os.environ.get("SAGE_DIST_MLFLOW_HOME", Path.home() / ".sage_dist" / "mlflow")).expanduser().resolve()


@dataclass(frozen=True, kw_only=True)
class TrackingTarget:
    """A resolved MLflow destination."""

    tracking_uri: str
    """Absolute tracking URI (``sqlite:////abs/mlflow.db`` or ``http://host:port``)."""
    artifact_location: str | None
    """Artifact root for new experiments (``file:///abs/artifacts/<experiment>``); None for servers, which
    choose (and proxy) their own artifact store."""

    @property
    def is_local(self) -> bool:
        return self.tracking_uri.startswith("sqlite:")


def resolve_tracking(uri: str = "") -> TrackingTarget:
    """Turn ``tracking.tracking_uri`` into an absolute :class:`TrackingTarget` (see module docstring); ``""``
    means ``$MLFLOW_TRACKING_URI`` if set, else the local SQLite store.

    Raises:
        ValueError: an unsupported scheme, a relative SQLite path, or the file store ``./mlruns`` (MLflow 3.17
            refuses it unless ``MLFLOW_ALLOW_FILE_STORE=true``).
    """
    if uri == "" and os.environ.get("MLFLOW_TRACKING_URI", "").strip():
        try:
            return resolve_tracking(os.environ["MLFLOW_TRACKING_URI"].strip())
        except ValueError as err:
            raise ValueError(f"from the environment variable MLFLOW_TRACKING_URI: {err} (or unset the variable "
                             "to log to the local SQLite store)") from err
    if uri == "":
        home = default_home()
        return TrackingTarget(tracking_uri=f"sqlite:///{home / 'mlflow.db'}", artifact_location=(home / "artifacts").as_uri())
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        if not parsed.netloc:
            raise ValueError(f"--tracking-uri {uri!r}: no host; write http://HOST:PORT, e.g. http://127.0.0.1:5000")
        return TrackingTarget(tracking_uri=uri.rstrip("/"), artifact_location=None)
    if parsed.scheme == "sqlite":
        path = uri[len("sqlite:///"):]
        if not uri.startswith("sqlite:///") or not path.startswith("/"):
            raise ValueError(f"--tracking-uri {uri!r}: use an absolute SQLite path, sqlite:////abs/path/mlflow.db "
                             "(four slashes); Tune trials change directory, so relative paths break")
        db = Path(path)
        return TrackingTarget(tracking_uri=uri, artifact_location=(db.parent / "artifacts").as_uri())
    raise ValueError(f"--tracking-uri {uri!r}: use '' (local SQLite), sqlite:////abs/path.db or http://HOST:PORT "
                     "(an `mlflow server`); file stores (./mlruns) are refused by MLflow 3.17")


def check_tracking_reachable(target: TrackingTarget, *, timeout_s: float = 5.0, flag: str = "--tracking-uri",
                             without: str = "log to a local SQLite file") -> None:
    """Fail fast, before any trial starts, when runs could not be logged. ``flag`` names the option that
    set the URI and ``without`` what dropping it does, for the error message.

    Raises:
        ConnectionError: the server does not answer within ``timeout_s`` (names the URI and how to start one).
        ValueError: the SQLite folder cannot be created or written.
    """
    if target.is_local:
        folder = Path(target.tracking_uri[len("sqlite:///"):]).parent
        ensure_writable_folder(folder, f"tracking store {target.tracking_uri}: its folder",
                               fix="choose another --tracking-uri")
        return
    import requests

    url = f"{target.tracking_uri}/api/2.0/mlflow/experiments/search"
    try:
        response = requests.post(url, json={"max_results": 1}, timeout=timeout_s)
    except requests.RequestException as err:
        raise ConnectionError(
            f"MLflow server {target.tracking_uri} is not reachable ({type(err).__name__}); start one with "
            f"`mlflow server --host 127.0.0.1 --port 5000` or drop {flag} to {without}"
        ) from err
    if response.status_code != 200:
        raise ConnectionError(f"MLflow server {target.tracking_uri} answered HTTP {response.status_code} to {url}; "
                              "is it an MLflow tracking server?")


MODEL_TRAINING_VIEW = "workflowType=machine_learning"
"""The query that opens an MLflow 3 UI page in its model-training view: the UI's GenAI / model-training switch is a
per-browser setting (the experiment's ``mlflow.experimentKind`` tag is read only where the switch is off)."""


def ui_link(base_url: str, experiment_id: str, run_id: str = "") -> str:
    """The UI address of an experiment (or one of its runs) in the model-training view."""
    page = f"#/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "")
    return f"{base_url.rstrip('/')}/{page}?{MODEL_TRAINING_VIEW}"


def ui_instructions(target: TrackingTarget, experiment_name: str, experiment_id: str = "", run_id: str = "") -> str:
    """The command(s) that open the MLflow UI on ``target`` (printed by the studies); with ``experiment_id`` (and
    ``run_id``) the address of that page in the model-training view."""
    base = "http://127.0.0.1:5000" if target.is_local else target.tracking_uri
    where = ui_link(base, experiment_id, run_id) if experiment_id else f"{base} (experiment {experiment_name!r})"
    if target.is_local:
        return (f"MLflow UI: mlflow ui --backend-store-uri {target.tracking_uri} --host 127.0.0.1 --port 5000\n"
                f"           then open {where}")
    return f"MLflow UI: open {where}"


def git_sha(repo: str | Path | None = None) -> str:
    """The current commit (with ``-dirty`` when the tree has changes), or ``"unknown"`` outside git."""
    cwd = Path(repo) if repo is not None else Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True,
                               text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")


def _client(tracking_uri: str):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=tracking_uri)


def tracking_client(tracking_uri: str):
    """An ``mlflow.MlflowClient`` of ``tracking_uri`` (a resolved URI, :func:`resolve_tracking`)."""
    return _client(tracking_uri)


EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
"""Experiment tag that picks the view the MLflow UI opens an experiment in."""
EXPERIMENT_KIND = "custom_model_development"
"""The model-training view (runs, metrics, artifacts), not the GenAI overview of traces."""
DESCRIPTION_TAG = "mlflow.note.content"
"""Run tag the MLflow UI shows as the run's Markdown description on its overview page."""


def ensure_experiment(target: TrackingTarget, name: str) -> str:
    """The id of experiment ``name``, created (with an explicit artifact location) when missing. Every
    experiment sage_dist creates or uses and that has no kind yet is tagged :data:`EXPERIMENT_KIND`, so the UI
    opens it in the model-training view; a kind someone set is left as it is."""
    client = _client(target.tracking_uri)
    exp = client.get_experiment_by_name(name)
    if exp is None:
        location = None if target.artifact_location is None else f"{target.artifact_location}/{name}"
        try:
            return client.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except Exception:  # another study created it at the same moment
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if EXPERIMENT_KIND_TAG not in exp.tags:
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return exp.experiment_id


def _param_value(value: Any) -> str:
    text = ",".join(str(v) for v in value) if isinstance(value, (tuple, list)) else str(value)
    if len(text) > MAX_PARAM_LENGTH:
        log.warning("parameter value of %d characters truncated to %d", len(text), MAX_PARAM_LENGTH)
        text = text[:MAX_PARAM_LENGTH]
    return text


class NullTracker:
    """Do-nothing stand-in with :class:`MlflowTracker`'s interface (so callers need no ``if tracking:`` branches)."""

    run_id = ""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_params(self, params: dict) -> None:
        pass

    def set_tags(self, tags: dict[str, Any]) -> None:
        pass

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None:
        pass

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def log_image(self, image, artifact_file: str) -> None:
        pass

    def log_figure(self, figure, artifact_file: str) -> None:
        pass

    def set_description(self, markdown: str) -> None:
        pass

    def end(self, status: RunStatus = "FINISHED", reason: str = "") -> None:
        pass

    def close(self, timeout_s: float = 0.0) -> bool:
        return True


class MlflowTracker:
    """Write to one existing MLflow run by id (parent or child); rank 0 only.

    Create runs with :meth:`start` (new) or :meth:`find_or_start` (resume-safe: reuses the run carrying the
    same ``sage_dist.key`` tag, so a retried or resumed trial keeps one child run).
    """

    def __init__(self, tracking_uri: str, run_id: str):
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self._client = _client(tracking_uri)

    # ---- creating runs ------------------------------------------------------------------------------
    @classmethod
    def start(cls, target: TrackingTarget, experiment_id: str, *, run_name: str, tags: dict[str, Any],
              parent_run_id: str | None = None) -> "MlflowTracker":
        """A new run (nested under ``parent_run_id`` when given)."""
        all_tags = {k: str(v) for k, v in tags.items()}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = _client(target.tracking_uri).create_run(experiment_id, run_name=run_name, tags=all_tags)
        return cls(target.tracking_uri, run.info.run_id)

    @classmethod
    def find_or_start(cls, target: TrackingTarget, experiment_id: str, *, key: str, run_name: str,
                      tags: dict[str, Any], parent_run_id: str | None = None) -> "MlflowTracker":
        """The run tagged ``sage_dist.key = key`` (set back to RUNNING; an earlier failure's ``failure_reason`` and
        ``interrupted`` tags move to ``previous_failure_reason``), or a new one."""
        client = _client(target.tracking_uri)
        found = client.search_runs([experiment_id], filter_string=f"tags.`sage_dist.key` = '{key}'", max_results=1)
        if found:
            tracker = cls(target.tracking_uri, found[0].info.run_id)
            client.update_run(tracker.run_id, status="RUNNING")
            old_tags = found[0].data.tags
            stale = [t for t in ("failure_reason", "interrupted") if t in old_tags]
            previous = {"previous_failure_reason": old_tags[stale[0]]} if stale else {}
            for t in stale:
                client.delete_tag(tracker.run_id, t)
            tracker.set_tags({**tags, **previous,
                              "sage_dist.attempts": int(old_tags.get("sage_dist.attempts", "1")) + 1})
            return tracker
        return cls.start(target, experiment_id, run_name=run_name, tags={**tags, "sage_dist.key": key},
                         parent_run_id=parent_run_id)

    # ---- logging ------------------------------------------------------------------------------------
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Numeric entries of ``metrics`` at ``step`` (non-numbers are skipped; NaN is logged as NaN)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, int(step)) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)]
        for i in range(0, len(items), BATCH):
            self._client.log_batch(self.run_id, metrics=items[i:i + BATCH], synchronous=True)

    def log_params(self, params: dict) -> None:
        """Parameters (tuples joined with commas; values longer than MLflow's limit truncated)."""
        from mlflow.entities import Param

        existing = self._client.get_run(self.run_id).data.params
        items = [Param(k, _param_value(v)) for k, v in params.items() if k not in existing]
        for i in range(0, len(items), BATCH):
            self._client.log_batch(self.run_id, params=items[i:i + BATCH], synchronous=True)

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in tags.items()]
        if items:
            self._client.log_batch(self.run_id, tags=items, synchronous=True)

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None:
        self._client.log_artifacts(self.run_id, str(local_dir), artifact_path)

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        """One file as an artifact (under ``artifact_path`` when given)."""
        self._client.log_artifact(self.run_id, str(local_path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._client.log_text(self.run_id, text, artifact_file)

    def log_image(self, image, artifact_file: str) -> None:
        """A PIL image or ``[H, W, 3]`` uint8 array as ``artifact_file`` (e.g. ``"grid.png"``)."""
        self._client.log_image(self.run_id, image, artifact_file=artifact_file)

    def log_figure(self, figure, artifact_file: str) -> None:
        """A matplotlib figure as ``artifact_file`` (``.png``: the UI shows it inline)."""
        self._client.log_figure(self.run_id, figure, artifact_file)

    def set_description(self, markdown: str) -> None:
        """The run's description (Markdown, shown on the run's overview page; :data:`DESCRIPTION_TAG`)."""
        self.set_tags({DESCRIPTION_TAG: markdown})

    def end(self, status: RunStatus = "FINISHED", reason: str = "") -> None:
        """Close the run; a failure ``reason`` goes to the ``failure_reason`` tag (shown in the UI)."""
        if reason:
            self.set_tags({"failure_reason": reason})
        self._client.set_terminated(self.run_id, status=status)

    def close(self, timeout_s: float = 0.0) -> bool:
        """Nothing is pending (every call above is synchronous); returns True."""
        return True


def limit_http_retries(max_retries: int = 2) -> None:
    """Cap MLflow's own retries of one HTTP request (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, default 7: about four
    minutes per request against a server that is down) unless the environment sets them, and silence urllib3's
    warning per retry. For processes whose MLflow calls go through :class:`BackgroundTracker`, which retries on
    its own without limit and reports failures itself; both settings are process-wide."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(max_retries))
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)


def _short_error(err: BaseException, limit: int = 300) -> str:
    """``Type: message``, its middle elided when long (MLflow's messages end with the root cause)."""
    text = f"{type(err).__name__}: {err}"
    return text if len(text) <= limit else f"{text[:limit // 2]} ... {text[-limit // 2:]}"


class BackgroundTracker:
    """A tracker's calls sent from a background thread, in order, each retried until it succeeds: a tracking
    server that is slow, restarts or goes down never slows or stops the caller (the training loop).

    Every method of :class:`MlflowTracker` queues its call and returns at once. A failing call is retried with
    a backoff of 1, 2, 4 ... 60 s; the first failure is logged as a warning and the recovery as another. At most
    ``max_pending`` calls wait: beyond that the oldest ``log_metrics`` calls are dropped (counted in the
    warning of :meth:`close`), never params, tags, artifacts or the end of the run.

    Example::

        tracker = BackgroundTracker(MlflowTracker.start(target, experiment_id, run_name="erase", tags={}))
        tracker.log_metrics({"loss": 0.1}, step=0)      # returns at once
        tracker.end("FINISHED")
        tracker.close(timeout_s=30)                      # waits for the queue, gives up on a dead server
    """

    RETRY_MAX_S = 60.0
    """Longest wait between two attempts of a failing call, seconds."""

    def __init__(self, tracker, *, max_pending: int = 100_000):
        self._tracker = tracker
        self.run_id = tracker.run_id
        self.max_pending = max_pending
        self._queue: collections.deque[tuple[str, tuple]] = collections.deque()
        self._cond = threading.Condition()
        self._closing = False
        self._abandoned = False
        self._failing_since: float | None = None
        self._last_error = ""
        self._dropped = 0
        self._thread = threading.Thread(target=self._send_loop, name="sage-dist-tracking", daemon=True)
        self._thread.start()

    @property
    def target(self) -> str:
        return getattr(self._tracker, "tracking_uri", type(self._tracker).__name__)

    # ---- the tracker interface (queued) ---------------------------------------------------------------
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._put("log_metrics", dict(metrics), step)

    def log_params(self, params: dict) -> None:
        self._put("log_params", dict(params))

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._put("set_tags", dict(tags))

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None:
        self._put("log_artifacts", local_dir, artifact_path)

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        self._put("log_artifact", local_path, artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._put("log_text", text, artifact_file)

    def log_image(self, image, artifact_file: str) -> None:
        self._put("log_image", image, artifact_file)

    def end(self, status: RunStatus = "FINISHED", reason: str = "") -> None:
        self._put("end", status, reason)

    @property
    def pending(self) -> int:
        """Calls not sent yet."""
        with self._cond:
            return len(self._queue)

    def close(self, timeout_s: float = 30.0) -> bool:
        """Wait until every queued call is sent and stop the thread; returns True when all were sent.

        Waits as long as the server answers (large artifacts take their time); once calls fail, waits at most
        ``timeout_s`` seconds more, then gives up: returns False after a warning that names the server, the
        last error and what was not logged. Calls queued after ``close`` are not sent.
        """
        t_close = time.monotonic()
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            while self._queue:
                failing = self._failing_since
                if failing is not None and time.monotonic() - max(failing, t_close) >= timeout_s:
                    kinds = collections.Counter(name for name, _ in self._queue)
                    self._abandoned = True
                    self._cond.notify_all()
                    log.warning("MLflow %s did not answer for %g s (%s): %s not logged; the run's outputs and "
                                "record.json are complete without it", self.target, timeout_s, self._last_error,
                                self._describe(kinds))
                    return False
                self._cond.wait(timeout=0.2)
        self._thread.join(timeout=5.0)
        if self._dropped:
            log.warning("MLflow %s: %d early log_metrics calls were dropped while the server was down "
                        "(record.json holds every step)", self.target, self._dropped)
        return not self._dropped

    # ---- the sending thread ----------------------------------------------------------------------------
    def _put(self, name: str, *args) -> None:
        with self._cond:
            if self._closing:
                log.warning("MLflow %s: %s after close() is not sent", self.target, name)
                return
            if len(self._queue) >= self.max_pending:
                for i, (queued, _) in enumerate(self._queue):
                    if queued == "log_metrics":
                        del self._queue[i]
                        self._dropped += 1
                        break
            self._queue.append((name, args))
            self._cond.notify_all()

    def _send_loop(self) -> None:
        backoff = 1.0
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if self._abandoned or not self._queue:
                    return
                name, args = self._queue[0]
            try:
                getattr(self._tracker, name)(*args)
            except Exception as err:  # any failure of the server or the network: keep the call, retry later
                with self._cond:
                    self._last_error = _short_error(err)
                    if self._failing_since is None:
                        self._failing_since = time.monotonic()
                        log.warning("MLflow %s: %s failed (%s); training goes on, %d pending records are kept and "
                                    "retried", self.target, name, self._last_error, len(self._queue))
                    failed_at = time.monotonic()
                    while not self._abandoned:  # new calls must not cut the backoff short; close() shortens it
                        wait = (min(backoff, 2.0) if self._closing else backoff) - (time.monotonic() - failed_at)
                        if wait <= 0:
                            break
                        self._cond.wait(timeout=wait)
                    backoff = min(2 * backoff, self.RETRY_MAX_S)
                continue
            with self._cond:
                self._queue.popleft()
                if self._failing_since is not None:
                    log.warning("MLflow %s answers again after %.0f s; sending %d pending records", self.target,
                                time.monotonic() - self._failing_since, len(self._queue))
                self._failing_since = None
                backoff = 1.0
                self._cond.notify_all()

    @staticmethod
    def _describe(kinds: collections.Counter) -> str:
        return ", ".join(f"{n} {name} call{'s' if n > 1 else ''}" for name, n in kinds.items())


def finite_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric, finite entries of ``metrics`` as floats."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
            out[k] = float(v)
    return out


def search_runs(tracking_uri: str, experiment_name: str, filter_string: str = "") -> list:
    """MLflow runs of ``experiment_name`` matching ``filter_string`` (tests, reports)."""
    client = _client(tracking_uri)
    exp = client.get_experiment_by_name(experiment_name)
    if exp is None:
        return []
    return list(client.search_runs([exp.experiment_id], filter_string=filter_string, max_results=1000))


def metric_history(tracking_uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """``[(step, value), ...]`` of one metric of one run."""
    return [(m.step, m.value) for m in _client(tracking_uri).get_metric_history(run_id, key)]


def list_artifacts(tracking_uri: str, run_id: str, path: str | None = None) -> list[str]:
    return [f.path for f in _client(tracking_uri).list_artifacts(run_id, path)]


def child_runs(tracking_uri: str, parent_run_id: str, status: str = "") -> list:
    """The nested runs of ``parent_run_id`` (optionally only those with ``status``, e.g. "RUNNING")."""
    client = _client(tracking_uri)
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    flt = f"tags.`mlflow.parentRunId` = '{parent_run_id}'" + (f" and attributes.status = '{status}'" if status else "")
    return list(client.search_runs([experiment_id], filter_string=flt, max_results=1000))


def run_artifact_uri(run_id: str, artifact_path: str) -> str:
    """``runs:/<run id>/<artifact path>``: where a registered model version's files are."""
    return f"runs:/{run_id}/{artifact_path}"


@dataclass(frozen=True, kw_only=True)
class ModelVersionSpec:
    """One version to register: its files, the run that made them, tags and a description."""

    source: str
    """``runs:/<run id>/<path>`` (:func:`run_artifact_uri`) or a ``file://`` folder."""
    run_id: str = ""
    """The run whose artifact it is (lineage in the UI); "" for none."""
    key: str
    """Identifies the version within the model (e.g. the trial id; a version with the same key is not
    registered twice)."""
    tags: dict[str, Any]
    description: str = ""


def register_versions(tracking_uri: str, name: str, versions: list[ModelVersionSpec], *,
                      tags: dict[str, Any] | None = None, description: str = "") -> dict[str, str]:
    """Register ``versions`` under the registered model ``name`` in the MLflow Model Registry (created with
    ``tags`` and ``description`` when missing). A version whose ``key`` (tag ``sage_dist.key``) is already
    registered is not registered again (a resumed study). Returns ``{key: version number}`` of all versions."""
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, tags={k: str(v) for k, v in (tags or {}).items()},
                                       description=description)
    existing = {v.tags.get("sage_dist.key", ""): v.version for v in client.search_model_versions(f"name='{name}'")}
    out = {k: str(v) for k, v in existing.items() if k}
    for spec in versions:
        if spec.key in out:
            continue
        version = client.create_model_version(
            name, spec.source, run_id=spec.run_id or None, description=spec.description,
            tags={**{k: str(v)[:MAX_PARAM_LENGTH] for k, v in spec.tags.items()}, "sage_dist.key": spec.key})
        out[spec.key] = str(version.version)
    return out


def model_versions(tracking_uri: str, name: str) -> list:
    """The versions of registered model ``name`` (tests, reports)."""
    return list(_client(tracking_uri).search_model_versions(f"name='{name}'"))
