"""CLI: presets, named flags and dotted overrides compose in that order."""

import argparse
import json

import pytest

from sage_dist.cli.erase import build_config
from sage_dist.cli.main import build_parser, main


def _args(**kw):
    base = {"model": None, "concept": None, "method": None, "steps": None, "seed": None, "preset": "auto"}
    base.update(kw)
    return argparse.Namespace(**base)


def test_world_preset_is_applied_by_default_and_overridable():
    cfg = build_config(_args(), [])
    assert cfg.model.model_id == "world" and cfg.erase.ddim_steps == 20 and cfg.optim.num_steps == 150
    cfg = build_config(_args(steps=60), ["--erase.warmup_steps=10", "--erase.ddim_steps=30"])
    assert cfg.optim.num_steps == 60 and cfg.erase.warmup_steps == 10 and cfg.erase.ddim_steps == 30
    assert build_config(_args(preset="none"), []).erase.ddim_steps == 50


def test_real_models_keep_the_spec_defaults():
    cfg = build_config(_args(model="CompVis/stable-diffusion-v1-4", concept=["nudity"]), [])
    assert cfg.optim.num_steps == 1000 and cfg.erase.ddim_steps == 50 and cfg.erase.erase_concept == ("nudity",)


def test_print_config_and_bad_override_messages(capsys):
    assert main(["erase", "--model", "tiny-sd", "--out", "unused", "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["model.model_id"] == "tiny-sd"
    assert main(["erase", "--out", "unused", "--retain.top_k=99"]) == 2
    assert "retain.top_k=99 is larger than retain.retain_batch_size=32" in capsys.readouterr().err


def test_generate_rejects_unknown_flags():
    with pytest.raises(SystemExit):
        main(["generate", "--out", "x.png", "--erase.lr=1"])
    assert main(["generate", "--out", "x.png"]) == 2  # no prompt: a clear error, not a traceback
    assert "generate" in build_parser().format_help()


def test_erase_then_generate_end_to_end(tmp_path, capsys):
    out = tmp_path / "cat"
    assert main(["erase", "--model", "tiny-sd", "--concept", "cat", "--out", str(out), "--steps", "3",
                 "--erase.warmup_steps=1", "--erase.ddim_steps=4", "--attack.attack_steps=2",
                 "--retain.retain_batch_size=4", "--retain.top_k=2"]) == 0
    assert (out / "text_encoder" / "model.safetensors").is_file() and (out / "record.json").is_file()
    grid = tmp_path / "grid.png"
    assert main(["generate", "--model", "tiny-sd", "--text-encoder", str(out), "--prompt", "a cat", "--prompt",
                 "a dog", "--steps", "2", "--out", str(grid)]) == 0
    from PIL import Image

    width, height = Image.open(grid).size  # 2 prompts as columns, rows original and erased, labelled
    assert width > 2 * 128 and height > 2 * 128


def test_resume_command_replaces_any_resume_flag():
    from pathlib import Path

    from sage_dist.cli.erase import resume_command

    ckpt = Path("runs/my run/checkpoints/step_000040")
    for argv in (["erase", "--out", "runs/my run"], ["erase", "--out", "runs/my run", "--resume"],
                 ["erase", "--resume-from", "old", "--out", "runs/my run"],
                 ["erase", "--resume-from=old", "--out", "runs/my run"]):
        assert resume_command(argv, ckpt) == \
            "sage-dist erase --out 'runs/my run' --resume-from 'runs/my run/checkpoints/step_000040'"


def test_checkpoint_policy_is_automatic_unless_checkpoint_every_is_given():
    from sage_dist.cli.erase import AUTO_CHECKPOINT_INTERVAL_S, checkpoint_policy

    assert AUTO_CHECKPOINT_INTERVAL_S == 600.0
    assert checkpoint_policy(_args(), []) == AUTO_CHECKPOINT_INTERVAL_S
    assert checkpoint_policy(_args(model="tiny-sd"), ["--optim.lr=1e-4"]) == AUTO_CHECKPOINT_INTERVAL_S
    assert checkpoint_policy(_args(), ["--scaling.checkpoint_every=0"]) is None
    assert checkpoint_policy(_args(), ["--scaling.checkpoint_every", "50"]) is None


def test_erase_help_documents_out_checkpoints_interrupts_and_tracking(capsys):
    with pytest.raises(SystemExit):
        main(["erase", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for rule in ("--overwrite", "--resume", "10 minutes after the start or the previous checkpoint",
                 "--scaling.checkpoint_every=N: every N steps instead", "Only the latest checkpoint is kept",
                 "128 + the signal number", "--tracking.tracking_uri=http://HOST:PORT"):
        assert rule in text, rule
    with pytest.raises(SystemExit):
        main(["erase", "--out", "x", "--resume", "--resume-from", "y"])  # one or the other
