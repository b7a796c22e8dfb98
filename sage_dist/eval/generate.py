"""Image generation for evaluation: original vs erased text encoder, same seeds, resumable.

One PNG per prompt id under ``<out>/<set>/<original|erased>/<id>.png``; an existing file is never
regenerated, so an interrupted run resumes where it stopped. The pipeline's UNet, VAE and scheduler are
shared; only ``pipe.text_encoder`` is swapped. Initial latents come from a CPU ``torch.Generator`` seeded
with the record's seed, so images are the same on CPU and GPU up to kernel numerics.
"""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Sequence

import torch

from sage_dist.eval.prompts import PromptRecord

log = logging.getLogger(__name__)

SchedulerName = Literal["lms", "ddim", "pipeline"]


@dataclass(frozen=True, kw_only=True)
class GenerationConfig:
    """Sampling settings shared by the original and erased model."""

    num_inference_steps: int = 50
    """Denoising steps (UnlearnDiffAtk: 50 LMS; COCO FID protocol: 100 LMS)."""
    scheduler: SchedulerName = "lms"
    """"lms" (the protocols' LMSDiscreteScheduler), "ddim", or the pipeline's own."""
    height: int | None = None
    """Image height; None: the pipeline's default (512 for SD v1.4, 64 for tiny-sd)."""
    width: int | None = None
    batch_size: int = 1
    """Prompts per pipeline call (consecutive records with equal guidance are batched)."""

    def __post_init__(self):
        if self.num_inference_steps < 1 or self.batch_size < 1:
            raise ValueError("num_inference_steps and batch_size must be >= 1")
        if self.scheduler not in ("lms", "ddim", "pipeline"):
            raise ValueError(f"scheduler={self.scheduler!r}: use lms, ddim or pipeline")


def safe_name(record_id: str) -> str:
    """File-system-safe stem for a prompt id (other characters become ``_``)."""
    return re.sub(r"[^A-Za-z0-9._~-]", "_", record_id) or "_"


def image_path(folder: Path, record_id: str) -> Path:
    return folder / f"{safe_name(record_id)}.png"


def set_scheduler(pipe, name: SchedulerName) -> None:
    """Replace ``pipe.scheduler`` with LMS or DDIM built from its config (no change for "pipeline")."""
    if name == "pipeline":
        return
    from diffusers import DDIMScheduler, LMSDiscreteScheduler

    cls = LMSDiscreteScheduler if name == "lms" else DDIMScheduler
    pipe.scheduler = cls.from_config(pipe.scheduler.config)


@contextlib.contextmanager
def using_text_encoder(pipe, text_encoder) -> Iterator[None]:
    """Temporarily put ``text_encoder`` into ``pipe`` (restored afterwards, even on error)."""
    saved = pipe.text_encoder
    pipe.text_encoder = text_encoder
    try:
        yield
    finally:
        pipe.text_encoder = saved


def _batches(records: Sequence[PromptRecord], size: int) -> Iterator[list[PromptRecord]]:
    batch: list[PromptRecord] = []
    for r in records:
        if batch and (len(batch) == size or r.guidance != batch[0].guidance):
            yield batch
            batch = []
        batch.append(r)
    if batch:
        yield batch


def _generators(seeds: Sequence[int]) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


def generate_records(pipe, text_encoder, records: Sequence[PromptRecord], folder: Path, cfg: GenerationConfig, *,
                     desc: str = "generate", progress: bool = True) -> list[Path]:
    """Generate the missing images of ``records`` with ``text_encoder`` in ``pipe``; returns every path.

    Existing files are kept (resume). Progress shows with tqdm when ``progress``.
    """
    from tqdm.auto import tqdm

    folder.mkdir(parents=True, exist_ok=True)
    paths = [image_path(folder, r.id) for r in records]
    todo = [r for r, p in zip(records, paths) if not p.is_file()]
    if len(todo) < len(records):
        log.info("%s: %d of %d images already exist, skipped", desc, len(records) - len(todo), len(records))
    bar = tqdm(total=len(todo), desc=desc, disable=not progress or not todo)
    with using_text_encoder(pipe, text_encoder), torch.no_grad():
        for batch in _batches(todo, cfg.batch_size):
            images = pipe(prompt=[r.prompt for r in batch], guidance_scale=batch[0].guidance,
                          num_inference_steps=cfg.num_inference_steps, height=cfg.height, width=cfg.width,
                          generator=_generators([r.seed for r in batch])).images
            for r, im in zip(batch, images):
                im.save(image_path(folder, r.id))
            bar.update(len(batch))
    bar.close()
    return paths


def render_prompt_embeds(pipe, text_encoder, prompt_embeds: torch.Tensor, *, seed: int, guidance: float,
                         cfg: GenerationConfig):
    """One image from precomputed conditioning ``[1, 77, D]`` (attacks); the unconditional branch uses
    ``text_encoder`` (the erased one) on the empty prompt, as a user of the erased model would."""
    with using_text_encoder(pipe, text_encoder), torch.no_grad():
        return pipe(prompt_embeds=prompt_embeds.to(pipe.unet.device, pipe.unet.dtype), guidance_scale=guidance,
                    num_inference_steps=cfg.num_inference_steps, height=cfg.height, width=cfg.width,
                    generator=_generators([seed])).images[0]


def encode_image_latents(pipe, image) -> torch.Tensor:
    """``[1, 4, h, w]`` scaled VAE latents (posterior mean) of a PIL image, as UnlearnDiffAtk's ``img2latent``."""
    import numpy as np

    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    x = torch.from_numpy(arr).permute(2, 0, 1)[None].to(pipe.vae.device, pipe.vae.dtype)
    with torch.no_grad():
        latents = pipe.vae.encode(x).latent_dist.mean
    return latents * pipe.vae.config.scaling_factor


def save_grid(pairs: Sequence[tuple[Path, Path]], out: Path, *, max_pairs: int = 8, cell: int = 256) -> Path | None:
    """Two-row PNG: original images on top, erased below, same seeds, up to ``max_pairs`` columns."""
    from PIL import Image

    pairs = [(a, b) for a, b in pairs if a.is_file() and b.is_file()][:max_pairs]
    if not pairs:
        return None
    grid = Image.new("RGB", (cell * len(pairs), cell * 2), "white")
    for col, (a, b) in enumerate(pairs):
        for row, path in enumerate((a, b)):
            with Image.open(path) as im:
                grid.paste(im.convert("RGB").resize((cell, cell)), (col * cell, row * cell))
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    return out
