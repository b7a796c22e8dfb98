"""Two-step ``world train`` smoke run (tiny budget, tmp dir), resumable."""

import json

import pytest
import torch

from sage_dist.cli.main import main


def test_world_train_smoke_and_resume(tmp_path, capsys):
    out = tmp_path / "world"
    argv = ["world", "train", "--seed", "0", "--out", str(out), "--minutes", "0", "--steps", "2", "--twin-minutes",
            "0", "--twin-steps", "2", "--vae-steps", "2", "--num-images", "128", "--batch-size", "8"]
    assert main(argv) == 0
    assert json.loads((out / "ckpt" / "sd_progress.json").read_text())["step"] == 2
    assert main(argv) == 2
    assert "--resume" in capsys.readouterr().err
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


def test_world_train_zero_snr_v_smoke(tmp_path):
    """--noise-schedule cosine_zero_snr_v trains with the v target, and the exported pipelines carry a zero-terminal-
    SNR, v-prediction, trailing-spacing scheduler, so sampling starts at t = 999 from pure noise."""
    from diffusers import StableDiffusionPipeline

    from sage_dist.world.train import _min_snr_weight

    out = tmp_path / "world"
    argv = ["world", "train", "--seed", "0", "--out", str(out), "--minutes", "0", "--steps", "2", "--twin-minutes",
            "0", "--twin-steps", "1", "--vae-steps", "2", "--num-images", "64", "--batch-size", "8",
            "--noise-schedule", "cosine_zero_snr_v"]
    assert main(argv) == 0
    sd = StableDiffusionPipeline.from_pretrained(str(out / "sd"), torch_dtype=torch.float32)
    cfg = sd.scheduler.config
    assert cfg.prediction_type == "v_prediction" and cfg.rescale_betas_zero_snr and cfg.timestep_spacing == "trailing"
    sd.scheduler.set_timesteps(20)
    assert int(sd.scheduler.timesteps[0]) == 999
    with pytest.raises(ValueError, match="noise schedule"):
        from sage_dist.world.model import build_scheduler
        build_scheduler("ddim", "linear")
    # v-loss Min-SNR weights: clamp(snr, 1, gamma) / (snr + 1); snr 0 keeps weight 1, snr 9 -> 5 / 10
    alphas = torch.tensor([0.0, 0.5, 0.9])
    w = _min_snr_weight(alphas, torch.tensor([0, 1, 2]), 5.0, v_prediction=True)
    assert torch.allclose(w, torch.tensor([1.0, 0.5, 0.5]), atol=1e-6)


def test_world_fine_tune_from_shipped_style_folders(tmp_path, capsys):
    """--init-from / --twin-init-from start both phases from existing pipelines (the zero-SNR-v fine-tune of the
    shipped world); a folder without the needed parts fails before any work."""
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file

    base = tmp_path / "base"
    small = ["--minutes", "0", "--steps", "1", "--twin-minutes", "0", "--twin-steps", "1", "--vae-steps", "1",
             "--num-images", "64", "--batch-size", "8"]
    assert main(["world", "train", "--seed", "5", "--out", str(base), *small]) == 0  # another seed than the fine-tune
    assert main(["world", "train", "--out", str(tmp_path / "bad"), "--twin-init-from", str(base / "sd"), *small]) == 2
    assert "lacks" in capsys.readouterr().err
    out = tmp_path / "ft"
    assert main(["world", "train", "--seed", "0", "--out", str(out), *small, "--lr", "1e-12", "--freeze-text-encoder",
                 "--init-from", str(base / "sd"), "--twin-init-from", str(base / "sdxl"),
                 "--noise-schedule", "cosine_zero_snr_v"]) == 0
    start = load_file(str(base / "sdxl" / "unet" / "diffusion_pytorch_model.safetensors"))
    tuned = load_file(str(out / "sdxl" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.allclose(tuned[k].float(), v.float(), atol=1e-6) for k, v in start.items())
    start = load_file(str(base / "sdxl" / "text_encoder_2" / "model.safetensors"))
    tuned = load_file(str(out / "sdxl" / "text_encoder_2" / "model.safetensors"))
    assert all(torch.allclose(tuned[k].float(), v.float(), atol=1e-6) for k, v in start.items())
    xl = StableDiffusionXLPipeline.from_pretrained(str(out / "sdxl"), torch_dtype=torch.float32)
    assert xl.scheduler.config.prediction_type == "v_prediction"
