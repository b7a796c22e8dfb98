"""Every model id sage_dist understands, and where the bundled world's weights live (the only model-id logic).

``model_id`` values:

* ``"world"`` / ``"world-xl"``: the bundled world (SD-style and SDXL-style pipelines), shipped in the package;
* ``"tiny-sd"`` / ``"tiny-sdxl"``: random tiny models built from configs (tests, benchmarks);
* a local diffusers folder (``model_index.json`` plus ``text_encoder/``), e.g. a world trained with
  ``sage-dist world train``;
* a Hub id such as ``"CompVis/stable-diffusion-v1-4"`` (needs Hub access; GPU recommended).

Nothing here imports torch or diffusers: the checks run before anything expensive.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

WORLD_IDS: tuple[str, ...] = ("world", "world-xl")
"""The bundled world: its SD pipeline and its SDXL twin."""
TINY_IDS: tuple[str, ...] = ("tiny-sd", "tiny-sdxl")
"""Random tiny pipelines built in code (:mod:`sage_dist.models.tiny`)."""
BUILTIN_IDS: tuple[str, ...] = WORLD_IDS + TINY_IDS
ENCODER_ATTRS: tuple[str, ...] = ("text_encoder", "text_encoder_2")
"""Pipeline attribute of text encoder ``e`` (``model.train_encoders`` indices): 0 CLIP-L, 1 SDXL's bigG."""
WORLD_KINDS: dict[str, str] = {"world": "sd", "world-xl": "sdxl"}
"""Sub-folder of the shipped world weights for each world id."""


def is_world(model_id: str) -> bool:
    """True for the bundled world ("world", "world-xl")."""
    return model_id in WORLD_IDS


def encoder_attr(e: int) -> str:
    """``"text_encoder"`` for encoder 0, ``"text_encoder_2"`` for encoder 1.

    Raises:
        ValueError: another index.
    """
    if e not in (0, 1):
        raise ValueError(f"text encoder index {e}: use 0 (text_encoder) or 1 (text_encoder_2, SDXL)")
    return ENCODER_ATTRS[e]


def is_sdxl(pipe) -> bool:
    """True for a pipeline with a second text encoder (SDXL)."""
    return getattr(pipe, "text_encoder_2", None) is not None


# ---- the bundled world's files ---------------------------------------------------------------------------
def world_weights_dir() -> Path:
    """Folder of the shipped world weights (``sage_dist/world/weights`` inside the installed package)."""
    return Path(__file__).resolve().parents[1] / "world" / "weights"


def world_path(model_id: str = "world") -> Path:
    """Folder of the shipped world pipeline ``model_id`` ("world" -> ``weights/sd``, "world-xl" -> ``weights/sdxl``).

    Raises:
        ValueError: ``model_id`` is not a world id.
        FileNotFoundError: the weights are missing (train them with ``sage-dist world train`` and copy them
            in with ``sage-dist world ship --from OUT``).
    """
    if model_id not in WORLD_KINDS:
        raise ValueError(f"world model {model_id!r}: use one of {list(WORLD_KINDS)}")
    path = world_weights_dir() / WORLD_KINDS[model_id]
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(
            f"the world's {model_id} weights are missing at {path}: reinstall sage_dist, or train them with "
            f"`sage-dist world train --seed 0 --out runs/world` and `sage-dist world ship --from runs/world`")
    return path


# ---- where a model id points -----------------------------------------------------------------------------
def looks_like_local_path(model_id: str) -> bool:
    """True when ``model_id`` is meant as a folder (absolute, relative with ./ or ~, existing, or not of the
    ``owner/name`` form of a Hub id)."""
    return (model_id.startswith(("/", "./", "../", "~")) or os.path.exists(model_id)
            or model_id.count("/") != 1 and model_id not in BUILTIN_IDS)


MODEL_WEIGHT_NAMES: tuple[str, ...] = ("diffusion_pytorch_model", "model", "pytorch_model")
"""Stems of the weight files diffusers (first) and transformers save: ``<stem>[.<variant>].safetensors`` or
``.bin``, or a sharded ``<stem>[.<variant>].safetensors.index.json`` / ``.bin.index.json``."""
_WEIGHT_FILE = re.compile(r"^(?:%s)(?:\.[\w-]+)?\.(?:safetensors|bin)(?:\.index\.json)?$" % "|".join(MODEL_WEIGHT_NAMES))
_LFS_POINTER = b"version https://git-lfs"


def _component_problem(folder: Path, class_name: str) -> str | None:
    """What a component folder of a pipeline lacks for ``from_pretrained`` (None: it looks complete)."""
    files = {p.name: p for p in folder.iterdir() if p.is_file()}
    if class_name.endswith(("Tokenizer", "TokenizerFast")):
        needed = ("tokenizer_config.json", "vocab.json", "tokenizer.json", "spiece.model")
        return None if any(n in files for n in needed) else f"no tokenizer files (one of {list(needed)})"
    if "Scheduler" in class_name:
        return None if "scheduler_config.json" in files else "no scheduler_config.json"
    if class_name.endswith(("FeatureExtractor", "ImageProcessor", "Processor")):
        return None if "preprocessor_config.json" in files else "no preprocessor_config.json"
    if "config.json" not in files:
        return "no config.json"
    weights = [p for name, p in files.items() if _WEIGHT_FILE.match(name)]
    if not weights:
        return ("no weights file (diffusion_pytorch_model.safetensors / .bin for diffusers models, "
                "model.safetensors / pytorch_model.bin for transformers models)")
    for w in weights:
        size = w.stat().st_size
        if size == 0:
            return f"{w.name} is empty (0 bytes; an interrupted download or copy)"
        if size < 1024 and w.read_bytes().startswith(_LFS_POINTER):
            return f"{w.name} is a Git LFS pointer, not the weights (run `git lfs pull` in the model repository)"
    return None


def check_model_source(model_id: str) -> None:
    """Cheap check, before anything is loaded, that ``model_id`` can be a text-to-image pipeline.

    A local folder must hold a readable ``model_index.json``, a ``text_encoder/`` folder, and for every
    component that ``model_index.json`` names a folder with what ``from_pretrained`` reads: ``config.json``
    and a weights file for models (see :data:`MODEL_WEIGHT_NAMES`; not empty, not a Git LFS pointer),
    ``scheduler_config.json`` for schedulers, tokenizer files for tokenizers, ``preprocessor_config.json``
    for feature extractors. Only file names and sizes are read.

    Raises:
        ValueError: naming the folder and the fix: the folder does not exist, is not a diffusers pipeline
            folder, has no text encoder, a component folder named in ``model_index.json`` is missing or
            incomplete; or the bundled world's weights are missing.
    """
    if model_id in TINY_IDS:
        return
    if is_world(model_id):
        try:
            world_path(model_id)
        except FileNotFoundError as err:
            raise ValueError(str(err)) from err
        return
    if not looks_like_local_path(model_id):
        return  # a Hub id: checked by the Hub when it is loaded
    path = Path(model_id).expanduser()
    if not path.is_dir():
        raise ValueError(f"--model {model_id!r}: no such folder. Give a diffusers pipeline folder, a Hub id "
                         f"like CompVis/stable-diffusion-v1-4, or 'world' (the bundled model).")
    index = path / "model_index.json"
    if not index.is_file():
        raise ValueError(f"--model {model_id!r}: {path} has no model_index.json; it is not a diffusers "
                         "pipeline folder (save one with pipe.save_pretrained(folder)).")
    if not (path / "text_encoder").is_dir():
        raise ValueError(f"--model {model_id!r}: {path} has no text_encoder/ folder; SAGE trains the text "
                         "encoder, so the pipeline must have one.")
    try:
        components = json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"--model {model_id!r}: {index} is not valid JSON ({err}); re-save the pipeline with "
                         "pipe.save_pretrained(folder).") from err
    if not isinstance(components, dict):
        raise ValueError(f"--model {model_id!r}: {index} is not a JSON object of components; re-save the pipeline "
                         "with pipe.save_pretrained(folder).")
    named = {name: value for name, value in components.items()
             if not name.startswith("_") and isinstance(value, list) and len(value) == 2 and value[0] is not None}
    missing = [name for name in named if not (path / name).is_dir()]
    if missing:
        raise ValueError(f"--model {model_id!r}: {path} is a partial pipeline folder: model_index.json names "
                         f"{missing} but those folders are missing; copy the whole pipeline or re-save it with "
                         "pipe.save_pretrained(folder).")
    incomplete = []
    for name, (_library, class_name) in named.items():
        problem = _component_problem(path / name, str(class_name))
        if problem is not None:
            incomplete.append(f"{name}/ ({class_name}): {problem}")
    if incomplete:
        raise ValueError(f"--model {model_id!r}: {path} is a partial pipeline folder: " + "; ".join(incomplete)
                         + ". Copy the missing files from the original pipeline or re-save it with "
                         "pipe.save_pretrained(folder).")


def pretrained_source(model_id: str) -> str:
    """What ``DiffusionPipeline.from_pretrained`` reads for a world id, a folder or a Hub id.

    Raises:
        ValueError: a tiny id (built in code, not loaded) or a bad source (:func:`check_model_source`).
    """
    if model_id in TINY_IDS:
        raise ValueError(f"{model_id!r} is built in code (sage_dist.models.tiny), not loaded from files")
    check_model_source(model_id)
    if is_world(model_id):
        return str(world_path(model_id))
    return str(Path(model_id).expanduser()) if looks_like_local_path(model_id) else model_id


# ---- sampling defaults -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class SamplingDefaults:
    """How a model is sampled when the user does not say: denoising steps and classifier-free guidance."""

    num_inference_steps: int
    guidance: float


SD_SAMPLING = SamplingDefaults(num_inference_steps=50, guidance=7.5)
"""Stable Diffusion's usual sampling (Hub ids, local folders without a ``world_config.json``)."""
TINY_SAMPLING = SamplingDefaults(num_inference_steps=10, guidance=7.5)
"""Random tiny models: few steps, the images carry no meaning."""


def sampling_defaults(model: str | os.PathLike | object) -> SamplingDefaults:
    """Sampling defaults of a model id, a pipeline folder or a loaded pipeline.

    A world folder (the shipped weights or a ``sage-dist world train`` output) carries its own in
    ``world_config.json`` (guidance 3, 20 steps for the shipped world); tiny models use :data:`TINY_SAMPLING`;
    everything else :data:`SD_SAMPLING`. A loaded pipeline is looked up by the folder it was loaded from
    (``pipe.name_or_path``).
    """
    if not isinstance(model, (str, os.PathLike)):
        model = getattr(model, "name_or_path", None) or ""
    name = str(model)
    if name in TINY_IDS:
        return TINY_SAMPLING
    folder = world_path(name) if is_world(name) else Path(name).expanduser() if name else None
    config = folder / "world_config.json" if folder is not None else None
    if config is not None and config.is_file():
        data = json.loads(config.read_text())
        return SamplingDefaults(num_inference_steps=int(data["num_inference_steps"]), guidance=float(data["guidance"]))
    return SD_SAMPLING
