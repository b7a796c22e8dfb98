"""Load diffusers Stable Diffusion pipelines: the bundled world, tiny random models, Hub ids, local folders.

``model_id`` values:

* ``"world"`` / ``"world-xl"``: the bundled world (SD-style and SDXL-style), shipped in the package;
* ``"tiny-sd"`` / ``"tiny-sdxl"``: random tiny models built from configs (tests, benchmarks);
* a local diffusers folder (``model_index.json`` plus ``text_encoder/``);
* a Hub id such as ``"CompVis/stable-diffusion-v1-4"`` (needs Hub access; GPU recommended).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

BUILTIN_IDS = ("world", "world-xl", "tiny-sd", "tiny-sdxl")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def looks_like_local_path(model_id: str) -> bool:
    """True when ``model_id`` is meant as a folder (absolute, relative with ./ or ~, or existing)."""
    return (model_id.startswith(("/", "./", "../", "~")) or os.path.exists(model_id)
            or model_id.count("/") != 1 and model_id not in BUILTIN_IDS)


def check_model_source(model_id: str) -> None:
    """Cheap check, before anything is loaded, that ``model_id`` can be a text-to-image pipeline.

    Raises:
        ValueError: the folder does not exist, is not a diffusers pipeline folder, or has no text encoder;
            or the bundled world's weights are missing.
    """
    if model_id in ("tiny-sd", "tiny-sdxl"):
        return
    if model_id in ("world", "world-xl"):
        from sage_dist.world import world_path

        try:
            world_path("sdxl" if model_id == "world-xl" else "sd")
        except FileNotFoundError as err:
            raise ValueError(str(err)) from err
        return
    if looks_like_local_path(model_id):
        path = Path(model_id).expanduser()
        if not path.is_dir():
            raise ValueError(f"--model {model_id!r}: no such folder. Give a diffusers pipeline folder, a Hub id "
                             f"like CompVis/stable-diffusion-v1-4, or 'world' (the bundled model).")
        if not (path / "model_index.json").is_file():
            raise ValueError(f"--model {model_id!r}: {path} has no model_index.json; it is not a diffusers "
                             "pipeline folder (save one with pipe.save_pretrained(folder)).")
        if not (path / "text_encoder").is_dir():
            raise ValueError(f"--model {model_id!r}: {path} has no text_encoder/ folder; SAGE trains the text "
                             "encoder, so the pipeline must have one.")


def load_pipeline(model_id: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """The diffusers pipeline named by ``model_id`` (see module docstring), in eval mode, on ``device``.

    Returns:
        ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline`` with progress bars disabled.

    Raises:
        ValueError: see :func:`check_model_source`.
    """
    check_model_source(model_id)
    if model_id == "tiny-sd":
        from sage_dist.models.tiny import build_tiny_sd

        pipe = build_tiny_sd()
    elif model_id == "tiny-sdxl":
        from sage_dist.models.tiny import build_tiny_sdxl

        pipe = build_tiny_sdxl()
    else:
        from diffusers import DiffusionPipeline

        if model_id in ("world", "world-xl"):
            from sage_dist.world import world_path

            source = str(world_path("sdxl" if model_id == "world-xl" else "sd"))
        else:
            source = str(Path(model_id).expanduser()) if looks_like_local_path(model_id) else model_id
        kwargs = {"torch_dtype": dtype}
        if "xl" not in model_id.lower():
            kwargs.update(safety_checker=None, requires_safety_checker=False)
        pipe = DiffusionPipeline.from_pretrained(source, **kwargs)
    pipe = pipe.to(device)
    if pipe.unet.dtype != dtype:
        pipe = pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.eval()
            module.requires_grad_(False)
    return pipe


def frozen_dtype(name: str, device: torch.device) -> torch.dtype:
    """``model.frozen_dtype`` as a torch dtype: "auto" -> bfloat16 on CUDA, float32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def resolve_device(device: str) -> torch.device:
    """"auto" -> cuda when available else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("model.device=cuda but CUDA is not available; use model.device=cpu or auto.")
    return torch.device(device)


def load_erased_text_encoders(folder: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                              device: str | torch.device = "cpu") -> dict[str, torch.nn.Module]:
    """The erased encoder(s) saved by ``sage-dist erase``: ``{"text_encoder": ..., "text_encoder_2": ...}``.

    Each is loaded with ``CLIPTextModel.from_pretrained`` (``CLIPTextModelWithProjection`` for the second
    encoder) from safetensors.

    Raises:
        ValueError: the folder holds neither ``text_encoder/`` nor ``text_encoder_2/``.
    """
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    root = Path(folder).expanduser()
    if (root / "config.json").is_file():  # a single encoder folder: the first encoder
        candidates = {"text_encoder": root}
    else:
        candidates = {"text_encoder": root / "text_encoder", "text_encoder_2": root / "text_encoder_2"}
    out: dict[str, torch.nn.Module] = {}
    for name, sub in candidates.items():
        cls = CLIPTextModel if name == "text_encoder" else CLIPTextModelWithProjection
        if (sub / "config.json").is_file():
            out[name] = cls.from_pretrained(sub, torch_dtype=dtype).to(device).eval()
    if not out:
        raise ValueError(f"--text-encoder {folder}: no text_encoder/ or text_encoder_2/ with config.json found; "
                         "give the --out folder of `sage-dist erase`.")
    return out


def swap_text_encoders(pipe, encoders: dict[str, torch.nn.Module]) -> dict[str, torch.nn.Module]:
    """Put ``encoders`` into ``pipe`` (by attribute name); returns the modules they replaced."""
    previous = {}
    for name, module in encoders.items():
        previous[name] = getattr(pipe, name)
        setattr(pipe, name, module.to(device=previous[name].device, dtype=previous[name].dtype))
    return previous
