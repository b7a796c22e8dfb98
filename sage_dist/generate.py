"""Side-by-side generation: the same prompts and seeds through the original and an erased text encoder."""

from __future__ import annotations

from pathlib import Path

import torch


def generation_defaults(model_id: str) -> tuple[int, float]:
    """``(num_inference_steps, guidance)`` for a model: the world's shipped sampling settings, or SD's
    usual 50 steps at guidance 7.5; tiny random models use 10 steps."""
    if model_id in ("world", "world-xl"):
        from sage_dist.world import world_config

        conf = world_config("sdxl" if model_id == "world-xl" else "sd")
        return int(conf["num_inference_steps"]), float(conf["guidance"])
    if model_id in ("tiny-sd", "tiny-sdxl"):
        return 10, 7.5
    return 50, 7.5


@torch.no_grad()
def generate_images(pipe, prompts: list[str], *, seed: int, num_inference_steps: int, guidance: float):
    """One PIL image per prompt; prompt j is generated with ``torch.Generator().manual_seed(seed + j)``."""
    images = []
    for j, prompt in enumerate(prompts):
        generator = torch.Generator(device="cpu").manual_seed(seed + j)
        images.append(pipe(prompt, num_inference_steps=num_inference_steps, guidance_scale=guidance,
                           generator=generator).images[0])
    return images


def generate_side_by_side(model_id: str, prompts: list[str], *, text_encoder: str | Path | None, seed: int = 0,
                          num_inference_steps: int | None = None, guidance: float | None = None,
                          device: str = "auto", out: str | Path) -> Path:
    """Write a grid PNG: one row per prompt, columns original (and erased, when ``text_encoder`` is given).

    Raises:
        ValueError: bad model or encoder folder (before generating).
    """
    from diffusers.utils import make_image_grid

    from sage_dist.models.load import load_erased_text_encoders, load_pipeline, resolve_device, swap_text_encoders

    steps, scale = generation_defaults(model_id)
    steps = num_inference_steps or steps
    scale = guidance if guidance is not None else scale
    dev = resolve_device(device)
    erased = load_erased_text_encoders(text_encoder, device=dev) if text_encoder is not None else None
    pipe = load_pipeline(model_id, device=dev)
    columns = [generate_images(pipe, prompts, seed=seed, num_inference_steps=steps, guidance=scale)]
    if erased is not None:
        swap_text_encoders(pipe, erased)
        columns.append(generate_images(pipe, prompts, seed=seed, num_inference_steps=steps, guidance=scale))
    rows = [c[j] for j in range(len(prompts)) for c in columns]
    grid = make_image_grid(rows, rows=len(prompts), cols=len(columns))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    return out
