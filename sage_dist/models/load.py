"""Load diffusers pipelines and text encoders, and edit a pipeline without touching the caller's copy.

* :func:`load_pipeline`: any model id of :mod:`sage_dist.models.registry`, frozen, in eval mode;
* :func:`load_text_encoders`: the one loader of text encoders (an ``erase`` output folder, one encoder folder,
  a checkpoint folder, a state-dict file, or "original");
* :func:`load_unet_edit`: the edited UNet of an ``erase`` output (ESD-x writes ``unet/`` and no text encoder);
* :func:`edited_pipeline`: a shallow copy of a pipeline with its encoder(s) and/or UNet replaced.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path

import torch

from sage_dist.models.registry import (
    ENCODER_ATTRS,
    TINY_IDS,
    encoder_attr,
    is_sdxl,
    pretrained_source,
)
from sage_dist.models.tiny import build_tiny_sd, build_tiny_sdxl

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
STATE_DICT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


def load_pipeline(model_id: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """The diffusers pipeline named by ``model_id`` (see :mod:`sage_dist.models.registry`), frozen
    (``requires_grad`` off, eval mode), on ``device`` in ``dtype``, progress bars off.

    Returns:
        ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline``.
    Raises:
        ValueError: a bad model id or folder (:func:`sage_dist.models.registry.check_model_source`).
    """
    if model_id in TINY_IDS:

        pipe = build_tiny_sd() if model_id == "tiny-sd" else build_tiny_sdxl()
    else:
        from diffusers import DiffusionPipeline

        source = pretrained_source(model_id)
        kwargs = {"torch_dtype": dtype}
        if "xl" not in model_id.lower():
            kwargs.update(safety_checker=None, requires_safety_checker=False)
        pipe = DiffusionPipeline.from_pretrained(source, **kwargs)
    pipe = pipe.to(device)
    if pipe.unet.dtype != dtype:
        pipe = pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    for name in ("unet", "vae", *ENCODER_ATTRS):
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
    """"auto" -> cuda when available else cpu.

    Raises:
        ValueError: "cuda" asked for without CUDA.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device} but CUDA is not available; use cpu or auto.")
    return torch.device(device)


def original_encoders(pipe) -> dict[int, torch.nn.Module]:
    """The pipeline's own text encoders by index (0, and 1 for SDXL)."""
    return {e: getattr(pipe, attr) for e, attr in enumerate(ENCODER_ATTRS) if getattr(pipe, attr, None) is not None}


# ---- text encoders -----------------------------------------------------------------------------------------
def text_encoder_files(source: str | os.PathLike) -> dict[int, Path]:
    """Where :func:`load_text_encoders` will read each encoder from (checked without loading anything).

    ``source`` is a ``sage-dist erase`` output (``text_encoder/`` and/or ``text_encoder_2/``), one encoder's
    ``save_pretrained`` folder (encoder 0), a training checkpoint (``trainable.safetensors``), or a state-dict
    file for encoder 0 (``.safetensors``, ``.pt``, ``.pth``, ``.bin``).

    Raises:
        ValueError: nothing loadable at ``source`` (the message lists what was looked for).
    """
    root = Path(source).expanduser()
    if (root / "config.json").is_file():
        return {0: root}
    found = {e: root / attr for e, attr in enumerate(ENCODER_ATTRS) if (root / attr / "config.json").is_file()}
    if found:
        return found
    if (root / "trainable.safetensors").is_file():
        return {-1: root / "trainable.safetensors"}
    if root.is_file() and root.suffix in STATE_DICT_SUFFIXES:
        return {0: root}
    raise ValueError(f"--text-encoder {source}: expected the --out folder of `sage-dist erase` (text_encoder/ with "
                     "config.json), one encoder's save_pretrained folder, a checkpoint folder with "
                     "trainable.safetensors, a .safetensors/.pt state dict, or 'original'")


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(str(path), map_location="cpu", weights_only=True)


def _check_width(loaded: torch.nn.Module, like: torch.nn.Module, source) -> None:
    got, want = loaded.config.hidden_size, like.config.hidden_size
    if got != want:
        raise ValueError(f"--text-encoder {source}: hidden size {got} does not match the model's text encoder "
                         f"({want}); it was trained on another base model")


def load_text_encoders(source: str | os.PathLike, like: dict[int, torch.nn.Module], *,
                       dtype: torch.dtype | None = None) -> dict[int, torch.nn.Module]:
    """Text encoders by index from ``source`` (see :func:`text_encoder_files`), or copies of ``like`` for
    ``"original"``; each in eval mode, frozen, on ``like``'s device, in ``dtype`` (default: ``like``'s).

    Args:
        like: the pipeline's own encoders (:func:`original_encoders`): architecture, device and width check.
    Raises:
        ValueError: nothing loadable; an encoder index the pipeline lacks; a width or key mismatch (an encoder
            of another base model).
    """
    if str(source) == "original":
        out = {e: copy.deepcopy(m) for e, m in like.items()}
    else:
        out = {}
        for e, path in text_encoder_files(source).items():
            if e == -1:  # a training checkpoint: every trained encoder under "encoders.<e>."
                state = _load_state_dict(path)
                indices = sorted({int(k.split(".")[1]) for k in state if k.startswith("encoders.")})
                for i in indices:
                    prefix = f"encoders.{i}."
                    out[i] = _encoder_from_state(like, i, {k[len(prefix):]: v for k, v in state.items()
                                                           if k.startswith(prefix)}, source)
                continue
            if e not in like:
                raise ValueError(f"--text-encoder {source}: holds {encoder_attr(e)} but the model has no such "
                                 "encoder (an SDXL encoder for an SD pipeline?)")
            if path.is_dir():
                model = type(like[e]).from_pretrained(str(path), torch_dtype=like[e].dtype)
                _check_width(model, like[e], source)
            else:
                model = _encoder_from_state(like, e, _load_state_dict(path), source)
            out[e] = model
    for e, model in out.items():
        model.to(device=like[e].device, dtype=dtype or like[e].dtype).eval().requires_grad_(False)
    return out


def _encoder_from_state(like: dict[int, torch.nn.Module], e: int, state: dict[str, torch.Tensor], source):
    if e not in like:
        raise ValueError(f"--text-encoder {source}: holds encoder {e} but the model has no such encoder")
    model = copy.deepcopy(like[e])
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatch
        raise ValueError(f"--text-encoder {source}: its weights do not fit the model's text encoder ({err}); it "
                         "was trained on another base model") from err
    if unexpected or len(missing) == len(list(model.state_dict())):
        raise ValueError(f"--text-encoder {source}: state dict does not match the pipeline's text encoder "
                         f"(missing {len(missing)}, unexpected {len(unexpected)} keys)")
    if missing:
        log.warning("--text-encoder %s: %d keys missing, kept from the original encoder", source, len(missing))
    return model


# ---- edited UNets (ESD-x) ------------------------------------------------------------------------------------
UNET_CLASS_NAMES = ("UNet2DConditionModel",)
"""``_class_name`` of a UNet ``save_pretrained`` folder's ``config.json``."""


def _config_class(config: Path) -> str | None:
    import json

    try:
        return json.loads(config.read_text()).get("_class_name")
    except (OSError, ValueError) as err:
        raise ValueError(f"{config}: unreadable config.json ({err}); re-save the model with save_pretrained") from err


def unet_edit_dir(source: str | os.PathLike) -> Path | None:
    """The edited UNet's folder inside ``source``, checked without loading anything.

    ``source`` is a ``sage-dist erase`` output holding ``unet/`` (ESD-x: ``unet/`` and no ``text_encoder/``) or
    a UNet's own ``save_pretrained`` folder (``config.json`` with ``_class_name`` UNet2DConditionModel).
    Returns None for "original", for text-encoder-only outputs and for state-dict files.

    Raises:
        ValueError: ``unet/`` exists but has no readable ``config.json`` (a partial copy).
    """
    if str(source) == "original":
        return None
    root = Path(source).expanduser()
    if (root / "config.json").is_file() and _config_class(root / "config.json") in UNET_CLASS_NAMES:
        return root
    if (root / "unet").is_dir():
        if not (root / "unet" / "config.json").is_file():
            raise ValueError(f"--text-encoder {source}: {root / 'unet'} has no config.json (a partial copy of an "
                             "ESD-x output?); copy the whole folder written by `sage-dist erase --method esd-x`")
        _config_class(root / "unet" / "config.json")
        return root / "unet"
    return None


def has_text_encoder_files(source: str | os.PathLike) -> bool:
    """Whether :func:`text_encoder_files` finds an encoder at ``source`` (False instead of its ValueError); a
    UNet's own folder counts as none."""
    if str(source) == "original":
        return False
    root = Path(source).expanduser()
    if unet_edit_dir(source) == root:
        return False
    try:
        text_encoder_files(source)
    except ValueError:
        return False
    return True


def load_unet_edit(source: str | os.PathLike, *, like: torch.nn.Module) -> torch.nn.Module | None:
    """The edited UNet of ``source`` (see :func:`unet_edit_dir`) as ``type(like)``, frozen, in eval mode, on
    ``like``'s device and dtype; None when ``source`` holds no UNet (the pipeline's own UNet is then used).

    Args:
        like: the pipeline's UNet (architecture, device, dtype, and the config the edit must match).
    Raises:
        ValueError: its config differs from ``like``'s (an edit of another base model), or it cannot be read.
    """
    path = unet_edit_dir(source)
    if path is None:
        return None
    try:
        model = type(like).from_pretrained(str(path), torch_dtype=like.dtype)
    except (OSError, ValueError, RuntimeError) as err:
        raise ValueError(f"--text-encoder {source}: cannot load the edited UNet in {path} ({err})") from err
    mine = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    theirs = {k: v for k, v in dict(like.config).items() if not k.startswith("_")}
    differ = sorted(k for k in set(mine) | set(theirs) if _plain(mine.get(k)) != _plain(theirs.get(k)))
    if differ:
        raise ValueError(f"--text-encoder {source}: the UNet in {path} does not match the model's UNet (config "
                         f"differs in {differ[:6]}); it was edited from another base model")
    return model.to(device=like.device, dtype=like.dtype).eval().requires_grad_(False)


def _plain(value):
    """Config values compared as JSON would store them (tuples and lists alike)."""
    return list(value) if isinstance(value, (tuple, list)) else value


# ---- editing a pipeline --------------------------------------------------------------------------------------
def edited_pipeline(pipe, text_encoders: dict[int, torch.nn.Module] | torch.nn.Module | None = None, *,
                    unet: torch.nn.Module | None = None):
    """A shallow copy of ``pipe`` with its text encoder(s) and/or UNet replaced; ``pipe`` itself is unchanged.

    Args:
        text_encoders: ``{0: te1, 1: te2}`` (either key optional), or one module for encoder 0; None keeps them.
        unet: an edited UNet (e.g. ESD-x's cross-attention edit); None keeps the original.
    A module whose dtype differs from the pipeline's is converted as a copy (the caller's module, e.g. a
    trained fp32 encoder, is never cast in place).

    Raises:
        ValueError: encoder index 1 given for a pipeline with one text encoder.
    """
    edited = copy.copy(pipe)
    encoders = text_encoders if isinstance(text_encoders, dict) else ({} if text_encoders is None else {0: text_encoders})
    for e, module in encoders.items():
        if e == 1 and not is_sdxl(pipe):
            raise ValueError("encoder index 1 given but the pipeline has a single text encoder")
        attr = encoder_attr(e)
        setattr(edited, attr, _as_dtype(module, getattr(pipe, attr).dtype))
    if unet is not None:
        edited.unet = _as_dtype(unet, pipe.unet.dtype)
    return edited


def _as_dtype(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    current = next(module.parameters()).dtype
    return module if current == dtype else copy.deepcopy(module).to(dtype=dtype)
