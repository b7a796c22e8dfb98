"""Image generation for evaluation: the original and an edited model under the same seeds, and the one grid maker.

* :func:`generate_images`: a batch of prompts as a tensor (the bundled world's protocol; noise from ``seed``);
* :func:`generate_records`: one PNG per prompt record (real-model protocols), resumable: an existing file is
  never regenerated, so an interrupted run resumes where it stopped;
* :func:`render_prompt_embeds`: an image from precomputed conditioning (attacks);
* :func:`image_grid`: the one grid maker (rows and columns of images, with labels);
* :func:`side_by_side`: ``sage-dist generate``'s grid (one row per prompt: original, edited).

Initial latents come from a CPU ``torch.Generator``, so images are the same on CPU and GPU up to kernel numerics.
"""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Sequence

import torch

from sage_dist.models.registry import is_sdxl
from sage_dist.prompts import PromptRecord

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


@torch.no_grad()
def generate_images(pipe, prompts: Sequence[str], *, seed: int, guidance: float, num_inference_steps: int,
                    num_images_per_prompt: int = 1, batch_size: int = 128) -> torch.Tensor:
    """Images ``[len(prompts) * num_images_per_prompt, 3, H, W]`` float32 in [0, 1].

    Seeding: batch ``b`` of ``batch_size`` prompts uses ``torch.Generator().manual_seed(seed + b)``, so the same
    prompts and seed give the same initial noise for any model (an original and an edited model are compared on
    equal noise).
    """
    images = []
    for b, start in enumerate(range(0, len(prompts), batch_size)):
        chunk = list(prompts[start:start + batch_size])
        kwargs = {}
        if is_sdxl(pipe):
            kwargs["height"] = kwargs["width"] = pipe.unet.config.sample_size * pipe.vae_scale_factor
        out = pipe(chunk, num_inference_steps=num_inference_steps, guidance_scale=guidance,
                   num_images_per_prompt=num_images_per_prompt, output_type="pt",
                   generator=torch.Generator().manual_seed(seed + b), **kwargs)
        images.append(out.images.float().clamp(0, 1))
    return torch.cat(images)


def _to_pil(image):
    """A PIL RGB image from a PIL image, a file path, or a ``[3, H, W]`` / ``[H, W, 3]`` array in [0, 1]."""
    import numpy as np
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (str, Path)):
        with Image.open(image) as im:
            return im.convert("RGB")
    arr = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] == 3:
        arr = arr.transpose(1, 2, 0)
    return Image.fromarray((np.clip(arr, 0, 1) * 255).round().astype(np.uint8))


def image_grid(rows: Sequence[Sequence], *, row_labels: Sequence[str] = (), column_labels: Sequence[str] = (),
               cell: int = 128, title: str = ""):
    """The one grid maker: ``rows[i][j]`` is an image (PIL, path, or array in [0, 1]); returns a PIL image.

    Every image is resized to ``cell`` x ``cell`` (nearest neighbour, so 16-pixel world images stay sharp).
    ``row_labels`` go left of each row (e.g. "original", "erased"), ``column_labels`` under each column (e.g.
    the prompt and seed), ``title`` on top; long labels wrap.

    Raises:
        ValueError: no image, or rows of different lengths.
    """
    import textwrap

    from PIL import Image, ImageDraw, ImageFont

    if not rows or not rows[0]:
        raise ValueError("image_grid needs at least one image")
    if len({len(r) for r in rows}) != 1:
        raise ValueError(f"image_grid: rows have different lengths {[len(r) for r in rows]}")
    font = ImageFont.load_default()
    line = 12
    wrap = max(8, cell // 7)
    left = (max((len(t) for t in row_labels), default=0) * 7 + 8) if row_labels else 0
    wrapped = [textwrap.wrap(t, wrap)[:4] for t in column_labels]
    bottom = (max((len(w) for w in wrapped), default=0) * line + 6) if column_labels else 0
    top = line + 8 if title else 0
    n_rows, n_cols = len(rows), len(rows[0])
    grid = Image.new("RGB", (left + n_cols * cell, top + n_rows * cell + bottom), "white")
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((4, 4), title, fill="black", font=font)
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            grid.paste(_to_pil(image).resize((cell, cell), Image.NEAREST), (left + j * cell, top + i * cell))
        if i < len(row_labels):
            draw.text((4, top + i * cell + cell // 2 - 6), row_labels[i], fill="black", font=font)
    for j, lines in enumerate(wrapped):
        for k, text in enumerate(lines):
            draw.text((left + j * cell + 3, top + n_rows * cell + 3 + k * line), text, fill="black", font=font)
    return grid


def save_grid(pairs: Sequence[tuple[Path, Path]], out: Path, *, max_pairs: int = 8, labels: Sequence[str] = (),
              cell: int = 256) -> Path | None:
    """Original images on top, edited below (same seeds), up to ``max_pairs`` columns; None when no pair exists."""
    kept = [(k, a, b) for k, (a, b) in enumerate(pairs) if a.is_file() and b.is_file()][:max_pairs]
    if not kept:
        return None
    grid = image_grid([[a for _, a, _ in kept], [b for _, _, b in kept]], row_labels=("original", "erased"),
                      column_labels=[labels[k] for k, _, _ in kept] if labels else (), cell=cell)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    return out


@torch.no_grad()
def side_by_side(pipe, prompts: Sequence[str], *, edited=None, seed: int = 0, num_inference_steps: int,
                 guidance: float, cell: int = 128):
    """One row per prompt: the original pipeline's image, then ``edited``'s (a pipeline from
    :func:`sage_dist.models.load.edited_pipeline`) at the same seed; prompt ``j`` uses ``seed + j``. Returns the
    labelled PIL grid."""
    pipes = [pipe] + ([edited] if edited is not None else [])
    rows = []
    for j, prompt in enumerate(prompts):
        rows.append([generate_images(p, [prompt], seed=seed + j, guidance=guidance,
                                     num_inference_steps=num_inference_steps)[0] for p in pipes])
    labels = [f"{p} (seed {seed + j})" for j, p in enumerate(prompts)]
    # transpose: prompts as columns reads better for few prompts, rows for many
    columns = ["original", "erased"][:len(pipes)]
    return image_grid([list(r) for r in zip(*rows)], row_labels=columns, column_labels=labels, cell=cell)
