"""A search study shares its frozen-model work across trials, exactly (tiny-sd under local Ray, 2 CPUs).

Two one-worker trials with different searched values run one after the other: the second runs in the first
one's process (Tune reuses the actor, the pipeline stays loaded) and reads the trajectory bank and τ_o features
the first left in the study's frozen cache; its losses, encoder and metrics equal, bit for bit, those of the
same trial config run alone in a fresh state without any shared cache.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.ray

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import tiny_study  # noqa: E402


def test_second_trial_reads_the_first_ones_frozen_work_and_equals_a_run_without_it(tmp_path, local_ray):
    from safetensors.torch import load_file

    from sage_dist.config import StudyConfig
    from sage_dist.tracking.mlflow_tracker import child_runs
    from sage_dist.train import shared
    from sage_dist.train.ray_worker import WorkerRun, train_fn_per_worker, worker_config
    from sage_dist.tune.search import run_search

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = tiny_study.config(uri).replace_flat({"erase.rollout_cache": True, "erase.rollout_bank_size": 2,
                                               "optim.num_steps": 6})
    out = run_search(cfg, tiny_study.search_space,
                     tiny_study.options(str(tmp_path / "studies"), 2, 1, log_images=False))
    assert [r.status for r in out.rows] == ["ok", "ok"], out.table
    assert out.rows[0].params != out.rows[1].params  # two different points of the search space
    first, second = sorted(child_runs(out.tracking_uri, out.parent_run_id), key=lambda r: r.info.start_time)
    for run in (first, second):
        assert run.data.tags["trial_runner"] == "in_process"
    assert first.data.metrics["pipeline_reused"] == 0.0 and first.data.metrics["frozen_cache_levels_found"] == 0
    m = second.data.metrics
    assert m["pipeline_reused"] == 1.0 and m["time_load_s"] < 0.5  # the same process, the pipeline kept
    assert m["frozen_cache_levels_found"] > 0 and m["frozen_cache_tau_o_found"] > 0  # the first trial's work

    trial_dir = out.study_dir / "encoders" / second.data.tags["trial_id"]
    record = json.loads((trial_dir / "record.json").read_text())
    cfg2 = StudyConfig.from_flat_dict({k: tuple(v) if isinstance(v, list) else v for k, v in record["config"].items()})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the trial (cpus_per_worker < 2)
    shared.clear_process_caches()
    try:
        reference = train_fn_per_worker(worker_config(cfg2, WorkerRun(out_dir=str(tmp_path / "alone"),
                                                                      log_images=False, log_encoder=False)))
    finally:
        torch.set_num_threads(threads)
        shared.clear_process_caches()
    assert reference["frozen_cache_levels_found"] == 0 and reference["pipeline_reused"] == 0.0
    assert record["history"] == json.loads((tmp_path / "alone" / "record.json").read_text())["history"]
    trained = load_file(trial_dir / "text_encoder" / "model.safetensors")
    alone = load_file(tmp_path / "alone" / "text_encoder" / "model.safetensors")
    assert trained.keys() == alone.keys() and all(torch.equal(trained[k], alone[k]) for k in alone)
    for key in ("text_erasure", "text_retention_drift", "text_score"):
        assert m[key] == reference[key], key
    assert m["frozen_cache_bank_rows_computed"] < reference["frozen_cache_bank_rows_computed"]
