"""Shipped world weights: they load as standard diffusers pipelines, reproduce a golden image, and the
shipped detector reads a fixed procedural set."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sage_dist.models.registry import sampling_defaults, world_path

GOLDEN = Path(__file__).resolve().parents[1] / "assets" / "world" / "golden_sd.json"


def _golden_image(pipe, spec):
    out = pipe(spec["prompt"], num_inference_steps=spec["num_inference_steps"], guidance_scale=spec["guidance"],
               generator=torch.Generator().manual_seed(spec["seed"]), output_type="np")
    return out.images[0]


def test_world_path_errors():
    with pytest.raises(ValueError, match="world"):
        world_path("sd3")
    assert (world_path("world") / "model_index.json").is_file()
    defaults = sampling_defaults("world")
    assert defaults.num_inference_steps == 20 and defaults.guidance == 3.0
    assert sampling_defaults(world_path("world-xl")) == defaults and sampling_defaults("tiny-sd").num_inference_steps == 10


def test_shipped_sd_reproduces_golden_image():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(world_path("world")), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.config.addition_embed_type == "text" and pipe.vae_scale_factor == 1
    sched = pipe.scheduler.config  # zero terminal SNR, v-prediction: textures are not read off the noise
    assert sched.prediction_type == "v_prediction" and sched.rescale_betas_zero_snr and sched.timestep_spacing == "trailing"
    spec = json.loads(GOLDEN.read_text())
    image = _golden_image(pipe, spec)
    assert image.shape == (16, 16, 3)
    np.testing.assert_allclose(image, np.asarray(spec["image"], dtype=np.float32), atol=5e-3)


def test_shipped_sdxl_twin_runs_and_shares_encoder_1():
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    xl = StableDiffusionXLPipeline.from_pretrained(str(world_path("world-xl")), torch_dtype=torch.float32)
    xl.set_progress_bar_config(disable=True)
    sd = StableDiffusionPipeline.from_pretrained(str(world_path("world")), torch_dtype=torch.float32)
    for (name, a), (_, b) in zip(xl.text_encoder.state_dict().items(), sd.text_encoder.state_dict().items()):
        assert torch.equal(a, b), name
    assert xl.unet.config.addition_embed_type == "text_time"
    image = xl("a red solid triangle", num_inference_steps=4, guidance_scale=3.0, height=16, width=16,
               generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert image.shape == (16, 16, 3) and np.isfinite(image).all()


def test_shipped_detector_accuracy_on_fixed_set():
    from sage_dist.world.detector import accuracy, fixed_eval_set, load_detector

    images, labels = fixed_eval_set(num=540)
    acc = accuracy(load_detector(), images, labels)
    assert acc["shape"] >= 0.99 and acc["colour"] >= 0.99 and acc["texture"] >= 0.99, acc
