"""Load world pipelines and sample them in batches (shared by :mod:`quality` and :mod:`evaluate`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

WORLD_ALIASES = {"world": "sd", "sd": "sd", "world-xl": "sdxl", "sdxl": "sdxl"}
DEFAULT_GUIDANCE = 2.0
DEFAULT_STEPS = 20


def resolve_model(model: str | Path | None) -> Path:
    """"world"/"sd"/None -> shipped SD folder, "world-xl"/"sdxl" -> shipped SDXL twin, else a folder."""
    from sage_dist.world import world_path

    if model is None:
        return world_path("sd")
    if str(model) in WORLD_ALIASES:
        return world_path(WORLD_ALIASES[str(model)])
    path = Path(model)
    if not (path / "model_index.json").is_file():
        raise ValueError(f"{model!r} is neither 'world', 'world-xl' nor a diffusers pipeline folder")
    return path


def sampling_defaults(folder: Path) -> tuple[float, int]:
    """(guidance, num_inference_steps) from ``world_config.json`` next to the weights, else the defaults."""
    config = folder / "world_config.json"
    if config.is_file():
        data = json.loads(config.read_text())
        return float(data["guidance"]), int(data["num_inference_steps"])
    return DEFAULT_GUIDANCE, DEFAULT_STEPS


def load_world_pipeline(model: str | Path | None = "world"):
    """A float32 CPU diffusers pipeline (SD or SDXL, by its ``model_index.json``), progress bar off."""
    from diffusers import DiffusionPipeline

    folder = resolve_model(model)
    pipe = DiffusionPipeline.from_pretrained(str(folder), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe._world_folder = folder  # noqa: SLF001 - remembered for sampling defaults
    return pipe


def is_xl(pipe) -> bool:
    return hasattr(pipe, "text_encoder_2") and pipe.text_encoder_2 is not None


@torch.no_grad()
def generate(pipe, prompts: list[str], *, seed: int, guidance: float, num_inference_steps: int,
             num_images_per_prompt: int = 1, batch_size: int = 128) -> torch.Tensor:
    """Images [len(prompts) * num_images_per_prompt, 3, 16, 16] in [0, 1], float32.

    Seeding: batch ``b`` uses ``torch.Generator().manual_seed(seed + b)``, so the same prompts and seed give the
    same initial noise for any model (the original and the erased model are compared on equal noise).
    """
    images = []
    for b, start in enumerate(range(0, len(prompts), batch_size)):
        chunk = prompts[start:start + batch_size]
        kwargs = {}
        if is_xl(pipe):
            kwargs["height"] = kwargs["width"] = pipe.unet.config.sample_size
        out = pipe(chunk, num_inference_steps=num_inference_steps, guidance_scale=guidance,
                   num_images_per_prompt=num_images_per_prompt, output_type="pt",
                   generator=torch.Generator().manual_seed(seed + b), **kwargs)
        images.append(out.images.float().clamp(0, 1))
    return torch.cat(images)
