"""The Ray cluster a study runs on: connecting, its capacity, shared storage, and trial concurrency.

Every Ray call of the study drivers that is about the cluster itself lives here (the search studies of
:mod:`sage_dist.tune.search` and the grid studies of :mod:`sage_dist.tune.grid_runner` share it):

* :func:`connect_ray` joins a running cluster (``RAY_ADDRESS`` or a local ``ray start``/``ray up`` cluster) so
  several studies can share it, else starts a local instance listening on loopback only; every Ray process of
  the job gets :data:`JOB_ENV` through the job's ``runtime_env`` (the calling process's environment is left
  as it is);
* :func:`cluster_capacity` reads the CPUs/GPUs the cluster has or its autoscaler can add;
* :func:`sage_dist.files.ensure_writable_folder` finds an output folder that cannot be written before anything starts;
* :func:`require_shared_storage` refuses a node-local study folder on a cluster that spans (or may grow to)
  several nodes, whose Train workers must all reach the checkpoints;
* :func:`trial_concurrency` is how many trials fit at once.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path

from sage_dist.config import StudyConfig

log = logging.getLogger(__name__)

JOB_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false", "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
           "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_METRICS_ENABLED": "0", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
           "DIFFUSERS_VERBOSITY": "error", "TRANSFORMERS_VERBOSITY": "error"}
"""Environment of every Ray process of a study (the job's ``runtime_env``): no OpenMP spin-waiting (it slows
shared CPUs 3-7x); no per-trial preemption-watcher actor and Train metrics (each costs process start-up on
small machines); no download progress bars or library chatter in the trial logs."""

NETWORK_FILESYSTEMS = ("nfs", "nfs4", "efs", "cifs", "smb3", "lustre", "gpfs", "ceph", "glusterfs", "beegfs",
                       "fuse.s3fs", "fuse.juicefs", "fuse.gcsfuse", "fuse.mountpoint-s3")
"""Filesystem types (``/proc/mounts``) every node of a cluster can share."""

PLANNED_RESOURCES = ("CPU", "GPU")
"""Resources trial concurrency is planned on (memory figures differ between Ray's config and its measurement)."""

STARTUP_ATTEMPTS = 3
"""Tries of a local Ray start: Ray waits a fixed 30 s for its raylet, too short on an overloaded machine."""


def connect_ray(address: str, *, num_cpus: int | None = None, env: dict[str, str] | None = None) -> str:
    """Join a cluster or start a local Ray instance; returns a one-line description of where the job runs.

    Args:
        address: "" or "auto" joins a running cluster if there is one, else starts a local instance;
            "local" always starts one (``num_cpus``, default all cores); else ``host:port`` of a cluster.
        env: environment variables of every Ray process of the job (default :data:`JOB_ENV`).
    Raises:
        ConnectionError: a cluster is running but joining it failed (names the usual cause, token auth).
    """
    import ray

    if ray.is_initialized():
        return "already initialised"
    runtime_env = {"env_vars": dict(JOB_ENV if env is None else env)}
    if address in ("", "auto"):
        try:
            ray.init(address="auto", runtime_env=runtime_env, logging_level=logging.WARNING)
            return f"joined running cluster {ray.get_runtime_context().gcs_address}"
        except ConnectionError:
            address = "local"
        except Exception as err:
            raise ConnectionError(f"a Ray cluster is running but joining it failed ({err}); if it uses token "
                                  "authentication export RAY_AUTH_MODE=token, or pass --ray-address local") from err
    if address == "local":
        for attempt in range(STARTUP_ATTEMPTS):
            try:
                ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
                         runtime_env=runtime_env, logging_level=logging.WARNING, _node_ip_address="127.0.0.1")
                break
            except Exception as err:
                if "timed out during startup" not in str(err) or attempt == STARTUP_ATTEMPTS - 1:
                    raise
                log.warning("Ray start-up timed out (machine busy); retrying")
                ray.shutdown()
        return f"started local Ray ({ray.cluster_resources().get('CPU', 0):g} CPUs)"
    ray.init(address=address, runtime_env=runtime_env, logging_level=logging.WARNING)
    return f"joined cluster {address}"


def cluster_capacity() -> tuple[dict[str, float], bool, bool]:
    """What the connected Ray cluster has now or can autoscale to, and whether it spans (or may span) nodes.

    Returns:
        ``(resources, multi_node, can_grow)``: CPU and GPU, each the larger of ``ray.cluster_resources()`` and the
        autoscaler's maximum (Ray's cluster config, the figure Ray Train itself checks; absent on a plain local
        instance; an unbounded node group leaves the current figure); ``multi_node`` is True when more than one
        node is alive or the autoscaler can add CPUs or GPUs (``can_grow``).
    """
    import ray

    now = {k: float(ray.cluster_resources().get(k, 0.0)) for k in PLANNED_RESOURCES}
    alive = sum(1 for node in ray.nodes() if node.get("Alive"))
    try:
        from ray._private import state as ray_state

        most = ray_state.state.get_max_resources_from_cluster_config() or {}
    except Exception as err:  # private API (Ray Train uses it); without it, plan on what the cluster has now
        log.debug("no autoscaler capacity (%s)", err)
        most = {}
    capacity, can_grow = dict(now), False
    for k in PLANNED_RESOURCES:
        limit = float(most.get(k, 0))
        if limit > now[k]:
            can_grow = True
            if limit < sys.maxsize:
                capacity[k] = limit
    return capacity, alive > 1 or can_grow, can_grow


def filesystem_type(path: str | Path, mounts: str | None = None) -> str:
    """The type (``/proc/mounts`` third field, e.g. "ext4", "nfs4") of the filesystem holding ``path``;
    "" when it cannot be told (no ``/proc/mounts``)."""
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return ""
    target = str(Path(path).expanduser().resolve())
    best, kind = "", ""
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fields[2]
    return kind


def require_shared_storage(path: str | Path, multi_node: bool, mounts: str | None = None) -> None:
    """Fail before any trial starts when a multi-node cluster would checkpoint to a node-local folder (Ray Train
    and Tune need storage every node reaches: NFS/EFS or cloud storage; Ray raises mid-run otherwise).

    Raises:
        ValueError: ``multi_node`` and ``path`` is on a local filesystem (override: ``SAGE_DIST_STORAGE_SHARED=1``
            for a shared filesystem whose type is not in :data:`NETWORK_FILESYSTEMS`).
    """
    if not multi_node or os.environ.get("SAGE_DIST_STORAGE_SHARED") == "1":
        return
    kind = filesystem_type(path, mounts)
    if kind and kind not in NETWORK_FILESYSTEMS:
        raise ValueError(
            f"study storage {path} is on a node-local filesystem ({kind}) but the Ray cluster spans or may grow to "
            "several nodes, whose Train workers must write checkpoints to the same place: pass --storage on a "
            "shared mount (cluster.yaml mounts EFS at /mnt/sage_dist and sets SAGE_DIST_STORAGE there), or set "
            "SAGE_DIST_STORAGE_SHARED=1 if this filesystem is shared after all")


def trial_concurrency(cfg: StudyConfig, resources: dict[str, float], *, driver_cpus: float, num_samples: int,
                      max_concurrent: int = 0, can_grow: bool = False) -> int:
    """Trials that fit at once: CPUs / (``driver_cpus`` + workers x CPUs per worker), and GPUs / workers when
    used, at most ``max_concurrent`` (0: no cap) and ``num_samples``; ``resources`` from
    :func:`cluster_capacity`. With ``can_grow`` (an autoscaler with unbounded node groups) a trial that does not
    fit yet runs alone while nodes are added.

    Raises:
        ValueError: one trial needs more than the whole cluster has and the cluster cannot grow.
    """
    s = cfg.scaling
    per_trial_cpu = driver_cpus + s.num_workers * s.cpus_per_worker
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    n = math.floor(cpus / per_trial_cpu + 1e-9)
    if s.use_gpu:
        n = min(n, math.floor(gpus / s.num_workers + 1e-9))
    if n < 1 and can_grow:
        log.warning("one trial needs %g CPUs%s, more than the cluster has now; running 1 trial at a time while the "
                    "autoscaler adds nodes", per_trial_cpu, f" and {s.num_workers} GPUs" if s.use_gpu else "")
        n = 1
    if n < 1:
        raise ValueError(f"one trial needs {per_trial_cpu:g} CPUs{f' and {s.num_workers} GPUs' if s.use_gpu else ''} "
                         f"but the cluster has {cpus:g} CPUs and {gpus:g} GPUs; lower scaling.num_workers or "
                         "scaling.cpus_per_worker")
    if max_concurrent:
        n = min(n, max_concurrent)
    return max(1, min(n, num_samples))
