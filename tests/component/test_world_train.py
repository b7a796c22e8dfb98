"""Two-step ``world train`` smoke run (tiny budget, tmp dir), resumable (issue 3 item 2)."""

import json

import pytest
import torch

from sage_dist.world.commands import main


def test_world_train_smoke_and_resume(tmp_path):
    out = tmp_path / "world"
    argv = ["world", "train", "--seed", "0", "--out", str(out), "--minutes", "0", "--steps", "2", "--twin-minutes",
            "0", "--twin-steps", "2", "--vae-steps", "2", "--num-images", "128", "--batch-size", "8"]
    assert main(argv) == 0
    assert json.loads((out / "ckpt" / "sd_progress.json").read_text())["step"] == 2
    with pytest.raises(FileExistsError, match="--resume"):
        main(argv)
    resume = list(argv)
    resume[resume.index("--steps") + 1] = "3"
    assert main([*resume, "--resume"]) == 0
    assert json.loads((out / "ckpt" / "sd_progress.json").read_text())["step"] == 3

    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    sd = StableDiffusionPipeline.from_pretrained(str(out / "sd"), torch_dtype=torch.float32)
    xl = StableDiffusionXLPipeline.from_pretrained(str(out / "sdxl"), torch_dtype=torch.float32)
    for (name, a), (_, b) in zip(xl.text_encoder.state_dict().items(), sd.text_encoder.state_dict().items()):
        assert torch.equal(a, b), name  # the twin's encoder 1 is the SD encoder, frozen
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt"))  # safetensors only
