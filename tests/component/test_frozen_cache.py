"""The study-level cache of frozen-model work (sage_dist/train/shared.py) is exact and keyed.

A run that reads another run's cache (another γt, so it asks for other entries in another order) ends with the
same losses, encoder and metrics, bit for bit, as a run that computes everything itself; a cache built for
another model or concept is detected by its key and rebuilt, never read.
"""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file

from sage_dist.models.sampler import DiffusionSampler, TrajectoryBank
from sage_dist.models.text import TextConditioner
from sage_dist.models.tiny import build_tiny_sd
from sage_dist.train import shared
from sage_dist.train.ray_worker import WorkerRun, run_worker
from sage_dist.train.validate import validate_inputs
from tests.conftest import tiny_config

BANK = {"erase.rollout_cache": True, "erase.rollout_bank_size": 2, "optim.num_steps": 6, "erase.warmup_steps": 2,
        "retain.top_k": 2}
"""Tiny SD with the trajectory bank: 6 steps of [concept; top-2 retain] rows drawn from 2 trajectories per prompt."""


@pytest.fixture(autouse=True)
def fresh_process_caches():
    shared.clear_process_caches()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a trial with cpus_per_worker < 2
    yield
    torch.set_num_threads(threads)
    shared.clear_process_caches()


def _run(tmp_path, name: str, cache_dir: str = "", **overrides) -> dict:
    """One erasure through the trial's worker body; returns its history, encoder and metrics."""
    cfg = tiny_config(**{**BANK, **overrides})
    out = tmp_path / name
    final = run_worker(cfg, WorkerRun(out_dir=str(out), log_images=False, log_encoder=False,
                                      frozen_cache_dir=cache_dir))
    metrics = {k: v for k, v in final.items() if not k.startswith(("time_", "frozen_cache_", "pipeline_"))}
    return {"history": json.loads((out / "record.json").read_text())["history"], "metrics": metrics,
            "encoder": load_file(out / "text_encoder" / "model.safetensors"), "use": final}


def _assert_identical(a: dict, b: dict) -> None:
    assert a["history"] == b["history"]
    assert a["metrics"] == b["metrics"] and a["metrics"]
    assert a["encoder"].keys() == b["encoder"].keys()
    assert all(torch.equal(a["encoder"][k], b["encoder"][k]) for k in a["encoder"])


FIRST = {"retain.retain_loss_weight": 0.4, "retain.top_k": 2}
SECOND = {"retain.retain_loss_weight": 5.0, "retain.top_k": 1}
"""Two trials of a search (γt and top-k searched): the second asks for other bank entries, in other company."""


def test_a_run_reading_another_runs_cache_is_identical_to_one_without(tmp_path):
    cache = str(tmp_path / "frozen_cache")
    first = _run(tmp_path, "first", cache, **FIRST)
    assert first["use"]["frozen_cache_levels_found"] == 0 and first["use"]["frozen_cache_bank_rows_computed"] > 0
    in_memory = _run(tmp_path, "in_memory", cache, **SECOND)  # the same process: the cache in memory
    shared.clear_process_caches()
    from_disk = _run(tmp_path, "from_disk", cache, **SECOND)  # as another process: the study folder's cache
    shared.clear_process_caches()
    alone = _run(tmp_path, "alone", "", **SECOND)
    for reader in (in_memory, from_disk):  # the second trial really read the first one's work ...
        assert reader["use"]["frozen_cache_levels_found"] > 0 and reader["use"]["frozen_cache_tau_o_found"] > 0
        assert reader["use"]["frozen_cache_bank_rows_computed"] < alone["use"]["frozen_cache_bank_rows_computed"]
        _assert_identical(reader, alone)  # ... and got exactly what it would have computed
    assert first["history"] != alone["history"]  # the comparison is between different trials
    assert in_memory["use"]["pipeline_reused"] == 1.0 and from_disk["use"]["pipeline_reused"] == 0.0


def test_bank_entries_do_not_depend_on_the_order_or_company_they_are_computed_in():
    pipe = build_tiny_sd(0)
    tc = TextConditioner(pipe)
    sampler = DiffusionSampler(pipe.unet, pipe.scheduler.config, (4, 8, 8), ddim_steps=6)
    prompts = ["a triangle", "a photo of chair", "a red circle", "a blue striped square"]
    with torch.no_grad():
        cond = tc.condition(tc.embed(prompts), trained=False)
    uncond = tc.uncond(1)
    together = TrajectoryBank(sampler, bank_size=1, guidance=3.0, seed=0)
    together.sample(prompts, cond, uncond, 0, torch.Generator().manual_seed(0))
    apart = TrajectoryBank(sampler, bank_size=1, guidance=3.0, seed=0)
    for j in (2, 0, 3, 1):  # one at a time, in another order, stopping half-way first
        row = cond.select(torch.tensor([j]))
        apart.sample([prompts[j]], row, uncond, 3, torch.Generator().manual_seed(0))
        apart.sample([prompts[j]], row, uncond, 0, torch.Generator().manual_seed(0))
    assert together.state.levels.keys() == apart.state.levels.keys()
    for entry, levels in together.state.levels.items():
        assert all(torch.equal(z, apart.state.levels[entry][i]) for i, z in levels.items()), entry
    for key in together.state.targets.keys() & apart.state.targets.keys():
        a, b = together.state.targets[key], apart.state.targets[key]
        assert a[0] == b[0] and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2]), key


def test_a_cache_built_for_another_concept_is_rebuilt_not_read(tmp_path, caplog):
    root = tmp_path / "frozen_cache"
    _run(tmp_path, "triangle", str(root))
    (triangle,) = list(root.iterdir())
    shared.clear_process_caches()
    cat = _run(tmp_path, "cat", str(root), **{"erase.erase_concept": ("cat",)})
    assert cat["use"]["frozen_cache_levels_found"] == 0  # its own key: nothing of triangle's is found
    cat_dir = next(p for p in root.iterdir() if p != triangle)
    # a triangle cache where the cat cache belongs (copied by hand, or a stale folder): detected and rebuilt
    shutil.rmtree(cat_dir)
    shutil.copytree(triangle, cat_dir)
    shared.clear_process_caches()
    with caplog.at_level(logging.WARNING, logger="sage_dist.train.shared"):
        again = _run(tmp_path, "cat_again", str(root), **{"erase.erase_concept": ("cat",)})
    assert "built for another key" in caplog.text and "concepts ['triangle'] (expected ['cat'])" in caplog.text
    assert again["use"]["frozen_cache_levels_found"] == 0 and again["use"]["frozen_cache_tau_o_found"] == 0
    _assert_identical(again, cat)
    assert json.loads((cat_dir / shared.KEY_FILE).read_text())["concepts"] == ["cat"]  # rebuilt for cat


def test_a_cache_built_for_another_model_is_detected_by_its_key(tmp_path, caplog):
    cfg = tiny_config(**BANK)
    sd, sd_other = build_tiny_sd(0), build_tiny_sd(1)
    retain = validate_inputs(cfg)
    fields = shared.cache_fields(cfg, sd, retain)
    other = shared.cache_fields(cfg, sd_other, retain)
    assert fields["weights"] != other["weights"] and shared.fields_digest(fields) != shared.fields_digest(other)
    root = tmp_path / "frozen_cache"
    cache = shared.open_frozen_cache(root, fields, device=torch.device("cpu"))
    tc = TextConditioner(sd)
    with torch.no_grad():
        cache.tau_o["a red circle"] = tc.condition(tc.embed(["a red circle"]), trained=False)
    assert cache.persist() == 1
    shutil.copytree(root / cache.digest, root / shared.fields_digest(other))
    shared.clear_process_caches()
    with caplog.at_level(logging.WARNING, logger="sage_dist.train.shared"):
        reopened = shared.open_frozen_cache(root, other, device=torch.device("cpu"))
    assert "built for another key" in caplog.text and "weights" in caplog.text
    assert reopened.counts() == {"tau_o": 0, "levels": 0, "targets": 0}
    assert shared.open_frozen_cache(root, fields, device=torch.device("cpu")).counts()["tau_o"] == 1


def test_shards_of_concurrent_writers_are_merged_and_a_truncated_shard_is_skipped(tmp_path, caplog):
    cfg = tiny_config(**BANK)
    pipe = build_tiny_sd(0)
    fields = shared.cache_fields(cfg, pipe, validate_inputs(cfg))
    root = tmp_path / "frozen_cache"
    tc = TextConditioner(pipe)
    writers = [shared.FrozenCache(fields, root, torch.device("cpu")) for _ in range(2)]  # two processes
    values = {}
    for writer, prompt in zip(writers, ("a red circle", "a photo of chair")):
        writer.refresh()
        with torch.no_grad():
            values[prompt] = writer.tau_o[prompt] = tc.condition(tc.embed([prompt]), trained=False)
        assert writer.persist() == 1 and writer.persist() == 0  # nothing new the second time
    reader = shared.open_frozen_cache(root, fields, device=torch.device("cpu"))
    assert sorted(reader.tau_o) == sorted(values)
    for prompt, cond in values.items():
        assert torch.equal(reader.tau_o[prompt].encoder_hidden_states, cond.encoder_hidden_states)
        assert all(torch.equal(a, b) for a, b in zip(reader.tau_o[prompt].features, cond.features))
    shard = sorted((root / reader.digest).glob("shard-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:100])  # a writer killed mid-way leaves no such file, a disk error might
    shared.clear_process_caches()
    with caplog.at_level(logging.WARNING, logger="sage_dist.train.shared"):
        partial = shared.open_frozen_cache(root, fields, device=torch.device("cpu"))
    assert "skipped" in caplog.text and partial.counts()["tau_o"] == 1


def test_an_unwritable_cache_folder_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    loaded = []
    monkeypatch.setattr(shared, "load_pipeline", lambda *a, **k: loaded.append(1))
    with pytest.raises(ValueError, match="frozen cache folder"):
        run_worker(tiny_config(**BANK), WorkerRun(log_images=False, log_encoder=False,
                                                  frozen_cache_dir=str(blocker)))
    assert not loaded


def test_the_pipeline_is_loaded_once_per_process():
    a, reused_a = shared.frozen_pipeline("tiny-sd", dtype=torch.float32, device="cpu")
    b, reused_b = shared.frozen_pipeline("tiny-sd", dtype=torch.float32, device="cpu")
    assert a is b and (reused_a, reused_b) == (False, True)
    c, reused_c = shared.frozen_pipeline("tiny-sd", dtype=torch.float64, device="cpu")
    assert c is not a and not reused_c and c.unet.dtype == torch.float64
