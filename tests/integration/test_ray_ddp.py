"""Two Ray Train workers run one erasure under DDP (gloo); rank 0 saves the trained encoder."""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_two_worker_ddp_run_trains_and_saves(tmp_path):
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from sage_dist.train.ray_worker import WorkerRun, train_fn_per_worker, worker_config
    from tests.conftest import tiny_config

    cfg = tiny_config(**{"optim.num_steps": 3, "erase.warmup_steps": 1, "scaling.num_workers": 2,
                         "scaling.cpus_per_worker": 0.5})
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING",
             _node_ip_address="127.0.0.1", runtime_env={"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}})
    try:
        trainer = TorchTrainer(
            train_fn_per_worker,
            train_loop_config=worker_config(cfg, WorkerRun(out_dir=str(tmp_path / "out"), log_images=False,
                                                           log_encoder=False)),
            scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 0.5}),
            run_config=RunConfig(storage_path=str(tmp_path / "ray"), name="ddp"),
        )
        result = trainer.fit()
    finally:
        ray.shutdown()
    assert result.error is None
    from transformers import CLIPTextModel

    from sage_dist.models.tiny import build_tiny_sd

    trained = CLIPTextModel.from_pretrained(tmp_path / "out" / "text_encoder").state_dict()
    original = build_tiny_sd(0).text_encoder.state_dict()
    assert any(not torch.equal(trained[k], original[k]) for k in original)
    assert os.path.isfile(tmp_path / "out" / "record.json")
