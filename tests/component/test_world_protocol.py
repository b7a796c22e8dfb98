"""``sage-dist evaluate --protocol world`` as a library call: metrics.json with intervals and prompt sets, an ESD-x
output evaluated through its UNet, the paired comparison, and bad edit folders refused before any image."""

import copy
import json

import pytest
import torch

from sage_dist.eval import world as ev
from sage_dist.eval.world_protocol import (
    load_world_edit,
    run_world_comparison,
    run_world_protocol,
)
from sage_dist.models.load import load_pipeline
from tests.component.world_helpers import scrambled_text_encoder

STEPS = 6


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("world")


@pytest.fixture(autouse=True)
def image_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SAGE_DIST_CACHE", str(tmp_path_factory.getbasetemp() / "world_protocol_cache"))


@pytest.fixture(scope="module")
def esd_x_output(pipe, tmp_path_factory):
    """An erase output that holds only unet/ (as ESD-x writes it): a UNet blind to the text (cross-attention K/V
    zeroed), so it cannot draw the prompted shape."""
    out = tmp_path_factory.mktemp("esd_x")
    blind = copy.deepcopy(pipe.unet)
    with torch.no_grad():
        for name, param in blind.named_parameters():
            if ".attn2.to_k." in name or ".attn2.to_v." in name:
                param.zero_()
    blind.save_pretrained(out / "unet", safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def scrambled_output(pipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("scrambled")
    encoder = scrambled_text_encoder(pipe)
    encoder.save_pretrained(out / "text_encoder")
    return out


def test_esd_x_output_is_evaluated_through_its_unet(pipe, esd_x_output, tmp_path):
    encoders, unet = load_world_edit(pipe, esd_x_output)
    assert encoders is None and unet is not None
    metrics = run_world_protocol(model="world", text_encoder=str(esd_x_output), concept="triangle", out=tmp_path,
                                 fidelity="quick", red_team=False, num_inference_steps=STEPS)
    assert metrics["config"]["unet_edit"] and metrics["RER_domain"] > 0.5  # dropping the UNet would give RER 0
    saved = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("RER_domain", "retention_acc", "KID", "neighbour_acc_diamond"):
        assert len(saved[f"{key}_ci95"]) == 2 and saved[f"{key}_n"] > 0
    assert saved["prompt_sets"]["heldout"]["prompts"] and saved["prompt_sets"]["retain_eval"]["seeds"]
    table = (tmp_path / "metrics.md").read_text()
    assert "| RER_domain |" in table and "±" in table


def test_comparison_of_two_edits_on_identical_noise(pipe, scrambled_output, tmp_path):
    result = run_world_comparison("world", str(scrambled_output), "original", "triangle", tmp_path, fidelity="quick",
                                  num_inference_steps=STEPS)
    assert result["delta_RER_domain_ci95"][0] > 0.3  # the scrambled encoder erases far more than the original
    saved = json.loads((tmp_path / "comparison.json").read_text())
    assert saved["config"]["a"] == str(scrambled_output) and "delta_KID_ci95" in saved
    assert "±" in (tmp_path / "comparison.md").read_text()


def test_bad_edits_fail_before_any_image(pipe, tmp_path, monkeypatch):
    from transformers import CLIPTextConfig, CLIPTextModel

    def no_images(*args, **kwargs):
        raise AssertionError("an image was generated before the input was checked")

    monkeypatch.setattr(ev, "render", no_images)
    monkeypatch.setattr(ev, "original_images", no_images)
    config = CLIPTextConfig(**{**pipe.text_encoder.config.to_dict(), "hidden_size": 32, "intermediate_size": 64})
    CLIPTextModel(config).save_pretrained(tmp_path / "other" / "text_encoder")
    with pytest.raises(ValueError, match="hidden size 32 does not match"):
        run_world_protocol(model="world", text_encoder=str(tmp_path / "other"), concept="triangle", out=tmp_path / "o")
    with pytest.raises(ValueError, match="hidden size 32 does not match"):
        run_world_comparison("world", "original", str(tmp_path / "other"), "triangle", tmp_path / "c")
    with pytest.raises(ValueError, match="one of"):
        run_world_protocol(model="world", text_encoder="original", concept="hexagon", out=tmp_path / "o")
    with pytest.raises(ValueError, match="unet/"):
        run_world_protocol(model="world", text_encoder=str(tmp_path / "missing"), concept="triangle", out=tmp_path / "o")
    unet_config = {**dict(pipe.unet.config), "cross_attention_dim": 32}
    (tmp_path / "other_unet" / "unet").mkdir(parents=True)
    (tmp_path / "other_unet" / "unet" / "config.json").write_text(json.dumps(unet_config, default=list))
    with pytest.raises(ValueError, match="cross_attention_dim=32"):
        run_world_protocol(model="world", text_encoder=str(tmp_path / "other_unet"), concept="triangle",
                           out=tmp_path / "o")
