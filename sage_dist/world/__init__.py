"""The bundled world: a tiny synthetic text-to-image world whose concept domains are known by construction.

* :mod:`sage_dist.world.concepts`: the concepts (shapes, colours, textures) and their domains.
* :mod:`sage_dist.world.scene`: procedural 16x16 images with exact labels and template captions.
* :mod:`sage_dist.world.model`, :mod:`sage_dist.world.train`: the tiny SD model and its SDXL twin.
* :mod:`sage_dist.world.detector`: the shape/colour/texture CNN.
* :mod:`sage_dist.world.quality`, :mod:`sage_dist.world.evaluate`: quality check and erasure metrics.

Shipped weights: ``weights/sd`` (``StableDiffusionPipeline``), ``weights/sdxl`` (``StableDiffusionXLPipeline``),
``weights/detector``; float16 storage, load with ``torch_dtype=torch.float32`` on the CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

WORLD_KINDS = ("sd", "sdxl")


def weights_dir() -> Path:
    """Folder of the shipped world weights (inside the installed package)."""
    return Path(__file__).resolve().parent / "weights"


def world_path(kind: str = "sd") -> Path:
    """Folder of the shipped world pipeline, for ``StableDiffusionPipeline.from_pretrained`` ("sd") or
    ``StableDiffusionXLPipeline.from_pretrained`` ("sdxl").

    Raises:
        ValueError: ``kind`` is not "sd" or "sdxl".
        FileNotFoundError: the weights are missing (train them with ``sage-dist world train`` and copy them
            in with ``sage-dist world ship --from OUT``).
    """
    if kind not in WORLD_KINDS:
        raise ValueError(f"world kind {kind!r}: use one of {WORLD_KINDS}")
    path = weights_dir() / kind
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(
            f"the world's {kind} weights are missing at {path}: reinstall sage_dist, or train them with "
            f"`sage-dist world train --seed 0 --out runs/world` and `sage-dist world ship --from runs/world`")
    return path


def world_config(kind: str = "sd") -> dict:
    """Sampling defaults of a world pipeline (``world_config.json``: guidance, num_inference_steps, resolution)."""
    return json.loads((world_path(kind) / "world_config.json").read_text())


def ship_weights(src: str | Path, *, guidance: float = 2.0, num_inference_steps: int = 20,
                 dst: str | Path | None = None) -> dict[str, float]:
    """Copy ``src/sd`` and ``src/sdxl`` (``world train`` outputs) into the package as float16 pipelines, with
    ``world_config.json``; returns their sizes in MB."""
    import torch
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    out = Path(dst) if dst is not None else weights_dir()
    sizes = {}
    for kind, cls in (("sd", StableDiffusionPipeline), ("sdxl", StableDiffusionXLPipeline)):
        if not (Path(src) / kind / "model_index.json").is_file():
            continue
        pipe = cls.from_pretrained(str(Path(src) / kind), torch_dtype=torch.float32)
        pipe.to(torch.float16).save_pretrained(str(out / kind), safe_serialization=True)
        config = {"guidance": guidance, "num_inference_steps": num_inference_steps, "resolution": 16,
                  "storage_dtype": "float16", "load_dtype": "float32"}
        (out / kind / "world_config.json").write_text(json.dumps(config, indent=1))
        sizes[f"{kind}_MB"] = sum(f.stat().st_size for f in (out / kind).rglob("*") if f.is_file()) / 2**20
    return sizes
