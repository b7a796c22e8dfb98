"""Multi-node safety checks of the study driver: shared storage and the MLflow URI from the
environment that cluster.yaml sets on every node."""

import pytest

from sage_dist.tracking import resolve_tracking
from sage_dist.tune.cluster import filesystem_type, require_shared_storage

MOUNTS = """\
/dev/vda1 / ext4 rw,relatime 0 0
proc /proc proc rw 0 0
fs-1234.efs.us-west-2.amazonaws.com:/ /mnt/sage_dist nfs4 rw,vers=4.1 0 0
/dev/vdb /mnt/sage_dist/scratch xfs rw 0 0
/dev/vdc /data\\040disk ext4 rw 0 0
"""


def test_filesystem_type_takes_the_longest_mount_point():
    assert filesystem_type("/mnt/sage_dist/runs/study-1", MOUNTS) == "nfs4"
    assert filesystem_type("/mnt/sage_dist/scratch/x", MOUNTS) == "xfs"
    assert filesystem_type("/mnt/sage_dist_other", MOUNTS) == "ext4"  # a prefix that is not a parent folder
    assert filesystem_type("/data disk/runs", MOUNTS) == "ext4"
    assert filesystem_type("/root/runs", MOUNTS) == "ext4"


def test_require_shared_storage(monkeypatch):
    monkeypatch.delenv("SAGE_DIST_STORAGE_SHARED", raising=False)
    require_shared_storage("/root/runs", multi_node=False, mounts=MOUNTS)  # one node: anything goes
    require_shared_storage("/mnt/sage_dist/runs", multi_node=True, mounts=MOUNTS)
    with pytest.raises(ValueError, match="node-local filesystem \\(ext4\\).*--storage on a shared mount"):
        require_shared_storage("/root/runs", multi_node=True, mounts=MOUNTS)
    monkeypatch.setenv("SAGE_DIST_STORAGE_SHARED", "1")
    require_shared_storage("/root/runs", multi_node=True, mounts=MOUNTS)


def test_tracking_uri_defaults_to_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SAGE_DIST_MLFLOW_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking("").tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://10.0.0.5:5000/")
    assert resolve_tracking("").tracking_uri == "http://10.0.0.5:5000"
    assert resolve_tracking("sqlite:////abs/x.db").tracking_uri == "sqlite:////abs/x.db"  # explicit wins
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "./mlruns")
    with pytest.raises(ValueError, match="environment variable MLFLOW_TRACKING_URI.*file stores"):
        resolve_tracking("")


def test_trial_concurrency_plans_on_what_the_autoscaler_can_add():
    from sage_dist.config import StudyConfig
    from sage_dist.tune.cluster import trial_concurrency

    cfg = StudyConfig().replace_flat({"scaling.use_gpu": True, "scaling.num_workers": 1, "scaling.cpus_per_worker": 1.0})
    head_only = {"CPU": 6.0, "GPU": 0.0}  # cluster.yaml's head before any GPU node starts
    with pytest.raises(ValueError, match="0 GPUs"):
        trial_concurrency(cfg, head_only, driver_cpus=0.5, num_samples=12)
    assert trial_concurrency(cfg, head_only, driver_cpus=0.5, num_samples=12, can_grow=True) == 1
    # with the autoscaler's maximum (16 GPUs, 6 + 8 x 4 + 2 x 48 CPUs) as cluster_capacity reports it
    full = {"CPU": 134.0, "GPU": 16.0}
    assert trial_concurrency(cfg, full, driver_cpus=0.5, num_samples=12) == 12  # capped by num_samples
    assert trial_concurrency(cfg, full, driver_cpus=0.5, num_samples=40) == 16
    assert trial_concurrency(cfg, full, driver_cpus=0.5, num_samples=40, max_concurrent=3) == 3
