"""Image generation for evaluation: the original and an edited model under the same seeds, and the one grid maker.

* :func:`generate_images`: a batch of prompts as a tensor (the bundled world's protocol; noise from ``seed``);
* :func:`generate_records`: one PNG per prompt record (real-model protocols) in an :class:`ImageStore`, keyed
  by what produced it (:func:`image_key`), so a rerun reuses exactly the images whose inputs are all equal;
* :func:`render_prompt_embeds`: an image from precomputed conditioning (attacks);
* :func:`image_grid`: the one grid maker (rows and columns of images, with labels);
* :func:`side_by_side`: ``sage-dist generate``'s grid (one row per prompt: original, edited).

Keys. An image's pixels depend on the UNet, the VAE, the text encoder and the tokenizer (their weights), the
prompt record (prompt, seed, guidance) and the sampling settings (steps, scheduler and its config, size,
dtype, device type, batch size, torch and diffusers versions). :func:`model_key` hashes the weights as the
pipeline holds them (sha256 of every state-dict tensor's name, dtype, shape and bytes, once per module and
run: ~1 s per GB), so the key follows the content, whatever the source (Hub id, folder, tiny random model);
:func:`image_key` is the sha256 of all of it. Anything different gives another key and a new image;
everything equal finds the stored one. The original model's images have the same key in every run, so runs of
different erased encoders share them through one store.

Initial latents come from a CPU ``torch.Generator``, so images are the same on CPU and GPU up to kernel numerics.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import torch

from sage_dist.models.registry import is_sdxl
from sage_dist.prompts import PromptRecord

log = logging.getLogger(__name__)

SchedulerName = Literal["lms", "ddim", "pipeline"]
KEY_SCHEMA = 1
"""Version of the key layout; bumped when what goes into a key changes (old stores are then not reused)."""


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


def set_scheduler(pipe, name: SchedulerName) -> None:
    """Replace ``pipe.scheduler`` with LMS or DDIM built from its config (no change for "pipeline")."""
    if name == "pipeline":
        return
    from diffusers import DDIMScheduler, LMSDiscreteScheduler

    cls = LMSDiscreteScheduler if name == "lms" else DDIMScheduler
    pipe.scheduler = cls.from_config(pipe.scheduler.config)


# ---- what produced an image ------------------------------------------------------------------------------
def _sha256_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


_FINGERPRINTS: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple[int, ...], str]]" = weakref.WeakKeyDictionary()
"""Module -> (signature of its tensors, sha256): a module is rehashed when a tensor was replaced or changed."""


def fingerprint_module(module: torch.nn.Module) -> str:
    """sha256 hex of a module's weights as it holds them: every state-dict entry's name, dtype, shape and bytes.

    Two modules with equal weights (in the same dtype) have equal fingerprints whatever they were loaded from.
    Cost: one pass over the weights (copied to the CPU one tensor at a time), ~1 s per GB on one core. The
    value is cached per module object and recomputed when any tensor was replaced (``.to``, new storage) or
    changed in place through autograd-visible ops (torch's version counters: optimiser steps,
    ``load_state_dict``, ``copy_``); edits through ``.data`` are invisible to it: pass a fresh module then.
    """
    state = module.state_dict()
    versions = tuple((t.data_ptr(), t._version, t.dtype, t.device, tuple(t.shape)) for t in state.values())
    hit = _FINGERPRINTS.get(module)
    if hit is not None and hit[0] == versions:
        return hit[1]
    digest = hashlib.sha256()
    for name, tensor in state.items():
        t = tensor.detach()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().data)
    value = digest.hexdigest()
    _FINGERPRINTS[module] = (versions, value)
    return value


_TOKENIZER_FINGERPRINTS: "weakref.WeakKeyDictionary[Any, tuple[tuple[int, int], str]]" = weakref.WeakKeyDictionary()


def fingerprint_tokenizer(tokenizer) -> str:
    """sha256 hex of a tokenizer's vocabulary, merges, normalisation and length limit (fast or slow tokenizers);
    the truncation and padding state that each call sets is left out. Cached per tokenizer object (~0.6 s for
    CLIP's 49k vocabulary) until its length or limit changes (``add_tokens``)."""
    signature = (len(tokenizer), tokenizer.model_max_length)
    hit = _TOKENIZER_FINGERPRINTS.get(tokenizer)
    if hit is not None and hit[0] == signature:
        return hit[1]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        body = json.dumps({k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")},
                          sort_keys=True)
    else:
        ranks = getattr(tokenizer, "bpe_ranks", {})
        body = json.dumps([sorted(tokenizer.get_vocab().items()),
                           [list(pair) for pair, _ in sorted(ranks.items(), key=lambda kv: kv[1])]])
    value = hashlib.sha256(f"{type(tokenizer).__name__}|{tokenizer.model_max_length}|{body}".encode()).hexdigest()
    _TOKENIZER_FINGERPRINTS[tokenizer] = (signature, value)
    return value


@dataclass(frozen=True, kw_only=True)
class ModelKey:
    """Content hashes (sha256 hex) of the parts of a pipeline that shape its images."""

    unet: str
    vae: str
    text_encoder: str
    tokenizer: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    def differences(self, other: "ModelKey") -> list[str]:
        """Names of the parts whose hashes differ."""
        return [k for k in ("unet", "vae", "text_encoder", "tokenizer") if getattr(self, k) != getattr(other, k)]


def model_key(pipe) -> ModelKey:
    """The :class:`ModelKey` of an SD 1.x/2.x pipeline as it is now (its UNet, VAE, text encoder, tokenizer)."""
    return ModelKey(unet=fingerprint_module(pipe.unet), vae=fingerprint_module(pipe.vae),
                    text_encoder=fingerprint_module(pipe.text_encoder), tokenizer=fingerprint_tokenizer(pipe.tokenizer))


def sampling_settings(pipe, cfg: GenerationConfig) -> dict[str, Any]:
    """Everything besides weights and the prompt record that shapes an image: steps, the scheduler in use (class
    and config hash: call :func:`set_scheduler` first), the resolved size, dtype, device type, batch size and
    the torch / diffusers versions."""
    import diffusers

    default = pipe.unet.config.sample_size * pipe.vae_scale_factor
    return {"num_inference_steps": cfg.num_inference_steps, "scheduler": cfg.scheduler,
            "scheduler_class": type(pipe.scheduler).__name__,
            "scheduler_config": _sha256_json({k: v for k, v in dict(pipe.scheduler.config).items()
                                              if not k.startswith("_")}),
            "height": cfg.height or default, "width": cfg.width or default, "dtype": str(pipe.unet.dtype),
            "device": pipe.unet.device.type, "batch_size": cfg.batch_size, "torch": torch.__version__,
            "diffusers": diffusers.__version__}


def record_settings(record: PromptRecord) -> dict[str, Any]:
    """The parts of a prompt record that shape its image (its id and category do not)."""
    return {"prompt": record.prompt, "seed": int(record.seed), "guidance": float(record.guidance)}


def image_key_inputs(model: ModelKey, record: PromptRecord, sampling: dict[str, Any]) -> dict[str, Any]:
    """What :func:`image_key` hashes (also written beside each stored image, so a store can be audited)."""
    return {"schema": KEY_SCHEMA, "model": model.to_dict(), "record": record_settings(record), "sampling": sampling}


def image_key(model: ModelKey, record: PromptRecord, sampling: dict[str, Any]) -> str:
    """sha256 hex naming the image that ``model`` draws for ``record`` under ``sampling``."""
    return _sha256_json(image_key_inputs(model, record, sampling))


def save_image_atomic(image, path: Path) -> Path:
    """Write a PIL image as PNG through a temporary file and a rename: a killed run never leaves a truncated
    file under a final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    image.save(partial, format="PNG")
    os.replace(partial, path)
    return path


class ImageStore:
    """A content-addressed folder of generated images: ``<root>/<key[:2]>/<key>.png`` with ``<key>.json``
    (the key's inputs) beside it. Safe to share between runs, protocols and encoders: a key names one image.

    Args:
        root: the store's folder (created on first write).
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.png"

    def has(self, key: str) -> bool:
        return self.path(key).is_file()

    def put(self, key: str, image, inputs: dict[str, Any]) -> Path:
        """Store ``image`` under ``key`` (inputs first, then the PNG atomically: the PNG marks it complete)."""
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_suffix(".json").write_text(json.dumps({"key": key, **inputs}, indent=1, default=str))
        return save_image_atomic(image, path)


@dataclass(frozen=True)
class StoredImage:
    """One generated image of a prompt record: its key and file in the store."""

    record_id: str
    key: str
    path: Path


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


def generate_records(pipe, records: Sequence[PromptRecord], store: ImageStore, cfg: GenerationConfig, *,
                     model: ModelKey | None = None, desc: str = "generate", progress: bool = True
                     ) -> list[StoredImage]:
    """One image per record drawn by ``pipe`` (its own text encoder and UNet), generated only when the store
    has no image of the same key (:func:`image_key`); returns every record's :class:`StoredImage` in order.

    Args:
        pipe: the pipeline as it should draw (e.g. :func:`sage_dist.models.load.edited_pipeline` for the erased
            model), its scheduler already set (:func:`set_scheduler`).
        model: ``model_key(pipe)`` when the caller has it (computed otherwise).
    Progress shows with tqdm when ``progress``.
    """
    from tqdm.auto import tqdm

    model = model or model_key(pipe)
    sampling = sampling_settings(pipe, cfg)
    keys = [image_key(model, r, sampling) for r in records]
    todo = [(r, k) for r, k in zip(records, keys) if not store.has(k)]
    if len(todo) < len(records):
        log.info("%s: %d of %d images found in %s (same model, prompt and sampling), reused", desc,
                 len(records) - len(todo), len(records), store.root)
    bar = tqdm(total=len(todo), desc=desc, disable=not progress or not todo)
    by_id = {id(r): k for r, k in todo}
    with torch.no_grad():
        for batch in _batches([r for r, _ in todo], cfg.batch_size):
            images = pipe(prompt=[r.prompt for r in batch], guidance_scale=batch[0].guidance,
                          num_inference_steps=cfg.num_inference_steps, height=cfg.height, width=cfg.width,
                          generator=_generators([r.seed for r in batch])).images
            for r, im in zip(batch, images):
                store.put(by_id[id(r)], im, image_key_inputs(model, r, sampling))
            bar.update(len(batch))
    bar.close()
    return [StoredImage(r.id, k, store.path(k)) for r, k in zip(records, keys)]


def render_prompt_embeds(pipe, prompt_embeds: torch.Tensor, *, seed: int, guidance: float, cfg: GenerationConfig):
    """One image from precomputed conditioning ``[1, 77, D]`` (attacks) drawn by ``pipe`` (the erased model);
    the unconditional branch uses ``pipe``'s own text encoder on the empty prompt, as a user of the erased
    model would."""
    with torch.no_grad():
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
