"""The world's detector: a small CNN that reads shape, colour and texture off a 16x16 image.

Trained on freshly rendered procedural images with exact labels (all combinations, both backgrounds, light
pixel noise and blur so that imperfect generated images are still read), shipped as
``sage_dist/world/weights/detector/{model.safetensors,config.json}``. Its 128-d penultimate features are the
world's FID feature space (:mod:`sage_dist.eval.world`).

Train: ``sage-dist world detector --out sage_dist/world/weights/detector`` (~2 min on 2 cores).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sage_dist.models.registry import world_weights_dir
from sage_dist.world import scene as world_scene
from sage_dist.world.concepts import ATTRIBUTES

logger = logging.getLogger(__name__)
HEADS: tuple[str, ...] = ("shape", "colour", "texture")
FEATURE_DIM = 128


class WorldDetector(nn.Module):
    """Images [B, 3, 16, 16] in [0, 1] -> logits per head ({"shape": [B, 6], "colour": [B, 6], "texture": [B, 3]})."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(2 * width * 16, FEATURE_DIM), nn.ReLU(),
        )
        self.heads = nn.ModuleDict({h: nn.Linear(FEATURE_DIM, len(ATTRIBUTES[h])) for h in HEADS})
        self.width = width

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features [B, 128] of images [B, 3, 16, 16] in [0, 1]."""
        if images.ndim != 4 or images.shape[1:] != (3, world_scene.RESOLUTION, world_scene.RESOLUTION):
            raise ValueError(f"detector expects [B, 3, 16, 16] images in [0, 1], got {tuple(images.shape)}")
        return self.body(images * 2.0 - 1.0)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.features(images)
        return {h: head(feats) for h, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, list[str]]:
        """Predicted attribute names per head for images [B, 3, 16, 16] in [0, 1]."""
        logits = self.eval()(images.float())
        return {h: [ATTRIBUTES[h][i] for i in logits[h].argmax(-1).tolist()] for h in HEADS}


def _labels(scenes) -> dict[str, torch.Tensor]:
    return {h: torch.tensor([ATTRIBUTES[h].index(getattr(s, h)) for s in scenes]) for h in HEADS}


def _render_varied(scenes, rng: np.random.Generator) -> torch.Tensor:
    """Render scenes with the texture's phase shifted at random (0-3 px in x and y) and a random pattern shade
    (0.3-0.6), so that the detector reads textures the way a generator may draw them; [N, 3, 16, 16]."""
    out = np.empty((len(scenes), 3, world_scene.RESOLUTION, world_scene.RESOLUTION), dtype=np.float32)
    for i, s in enumerate(scenes):
        img = np.full((world_scene.RESOLUTION, world_scene.RESOLUTION, 3), world_scene.BACKGROUND_GREY[s.background],
                      dtype=np.float32)
        rgb = np.asarray(world_scene.COLOUR_RGB[s.colour], dtype=np.float32)
        obj = world_scene.shape_mask(s.shape, s.size, s.dx, s.dy)
        full = np.roll(world_scene.texture_mask(s.texture), (int(rng.integers(4)), int(rng.integers(4))), axis=(0, 1))
        img[obj & full] = rgb
        img[obj & ~full] = float(rng.uniform(0.3, 0.6)) * rgb
        out[i] = img.transpose(2, 0, 1)
    return torch.from_numpy(out)


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Pixel noise (sigma up to 0.08) and, for half the batch, a light 3x3 blur; stays in [0, 1]."""
    b = x.shape[0]
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    mix = (torch.rand(b, 1, 1, 1, generator=gen) < 0.5).float() * torch.rand(b, 1, 1, 1, generator=gen) * 0.6
    x = (1 - mix) * x + mix * blurred
    sigma = torch.rand(b, 1, 1, 1, generator=gen) * 0.08
    return (x + sigma * torch.randn(x.shape, generator=gen)).clamp(0, 1)


def fixed_eval_set(seed: int = 12345, num: int = 1080) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A deterministic held-out set: images [N, 3, 16, 16] in [0, 1] and labels per head (all combinations)."""
    rng = np.random.default_rng(seed)
    scenes = world_scene.sample_scenes(num, rng, exclude_heldout=False)
    return torch.from_numpy(world_scene.render_batch(scenes)), _labels(scenes)


@torch.no_grad()
def accuracy(detector: WorldDetector, images: torch.Tensor, labels: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per-head accuracy and "all" (all three heads right)."""
    logits = detector.eval()(images)
    right = {h: logits[h].argmax(-1) == labels[h] for h in HEADS}
    out = {h: float(right[h].float().mean()) for h in HEADS}
    out["all"] = float((right["shape"] & right["colour"] & right["texture"]).float().mean())
    return out


def train_detector(out_dir: str | Path, *, seed: int = 0, steps: int = 1500, batch_size: int = 128,
                   lr: float = 2e-3) -> dict[str, float]:
    """Train, save ``model.safetensors`` + ``config.json`` into ``out_dir``; returns held-out accuracy."""
    from safetensors.torch import save_file

    torch.set_flush_denormal(True)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    det = WorldDetector()
    opt = torch.optim.Adam(det.parameters(), lr=lr)
    t0 = time.time()
    for step in range(steps):
        scenes = world_scene.sample_scenes(batch_size, rng, exclude_heldout=False)
        clean = torch.from_numpy(world_scene.render_batch(scenes)) if step % 2 == 0 else _render_varied(scenes, rng)
        x = _augment(clean, gen)
        labels = _labels(scenes)
        for g in opt.param_groups:
            g["lr"] = lr * 0.5 * (1 + np.cos(np.pi * step / steps))
        logits = det.train()(x)
        loss = sum(F.cross_entropy(logits[h], labels[h]) for h in HEADS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 250 == 0:
            logger.info("detector step %d loss %.4f", step, float(loss))
    images, labels = fixed_eval_set()
    acc = accuracy(det, images, labels)
    acc_noisy = accuracy(det, _augment(images, torch.Generator().manual_seed(1)), labels)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in det.state_dict().items()}, str(out / "model.safetensors"))
    report = {"width": det.width, "seed": seed, "steps": steps, "batch_size": batch_size,
              "train_seconds": round(time.time() - t0, 1),
              **{f"heldout_acc_{k}": v for k, v in acc.items()},
              **{f"heldout_noisy_acc_{k}": v for k, v in acc_noisy.items()}}
    (out / "config.json").write_text(json.dumps(report, indent=1))
    return report


def load_detector(path: str | Path | None = None) -> WorldDetector:
    """Load the shipped detector (``path`` None) or one from a folder; eval mode, float32, CPU.

    Raises:
        FileNotFoundError: no ``model.safetensors`` there (train one with ``sage-dist world detector``).
    """
    from safetensors.torch import load_file

    folder = Path(path) if path is not None else world_weights_dir() / "detector"
    if not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"no detector at {folder}: train one with `sage-dist world detector --out {folder}`")
    config = json.loads((folder / "config.json").read_text())
    det = WorldDetector(width=int(config["width"]))
    det.load_state_dict(load_file(str(folder / "model.safetensors")))
    return det.eval()
