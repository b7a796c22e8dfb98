"""NudeNet on real photos shipped by scikit-image; classifier protocol; tiny CLIP score."""

from __future__ import annotations

import time

import numpy as np
import pytest

from sage_dist.eval.judges import (
    Classifier,
    NudityRule,
    TorchvisionClassifier,
    build_classifier,
)

skimage_data = pytest.importorskip("skimage.data")


def _photos():
    return {name: getattr(skimage_data, name)() for name in ("astronaut", "camera", "chelsea", "coffee", "rocket")}


def test_nudenet_on_real_photos_faces_and_no_exposure():
    pytest.importorskip("nudenet")
    from sage_dist.eval.judges import NudeNetDetector

    detector = NudeNetDetector()
    photos = _photos()
    start = time.perf_counter()
    dets = detector.detect(list(photos.values()))
    per_image_ms = (time.perf_counter() - start) / len(photos) * 1000
    by_name = dict(zip(photos, dets))
    assert any(d.label.startswith("FACE_") for d in by_name["astronaut"]), by_name["astronaut"]
    assert any(d.label.startswith("FACE_") for d in by_name["camera"]), by_name["camera"]
    for rule in (NudityRule.for_protocol("unlearndiffatk"), NudityRule.for_protocol("esd")):
        assert all(rule.exposed(d) == {} for d in dets), dets
    assert per_image_ms < 2000, per_image_ms
    # PIL input gives the same boxes as the array input
    from PIL import Image

    assert detector.detect([Image.fromarray(photos["astronaut"])]) == [by_name["astronaut"]]


def test_nudenet_bad_input_message():
    pytest.importorskip("nudenet")
    from sage_dist.eval.judges import NudeNetDetector

    with pytest.raises(ValueError, match="uint8"):
        NudeNetDetector().detect([np.zeros((8, 8, 3), np.float32)])


def test_classifier_protocol_with_random_torchvision_model():
    pytest.importorskip("torchvision")
    clf = TorchvisionClassifier("resnet18", weights=None, num_classes=10)
    assert isinstance(clf, Classifier)
    out = clf.classify([skimage_data.chelsea(), skimage_data.coffee()])
    assert len(out) == 2 and set(out[0]) == set(clf.labels)
    assert abs(sum(out[0].values()) - 1.0) < 1e-4


def test_build_classifier_errors_are_clear():
    with pytest.raises(ValueError, match="torchvision:<name>"):
        build_classifier("resnet50")
    from sage_dist.eval.judges import DetectorUnavailableError

    with pytest.raises(DetectorUnavailableError, match="cannot import"):
        build_classifier("module:no_such_package.detector:load")


def test_tiny_clip_score():
    from PIL import Image

    from sage_dist.eval.clip_score import build_tiny_clip_scorer

    scorer = build_tiny_clip_scorer()
    images = [Image.fromarray(skimage_data.chelsea()), Image.fromarray(skimage_data.coffee())]
    scores = scorer.score(images, ["a photo of a cat", "a cup of coffee"])
    assert scores.shape == (2,) and np.all(np.abs(scores) <= 1.0 + 1e-6)
    again = scorer.score(images, ["a photo of a cat", "a cup of coffee"])
    np.testing.assert_allclose(scores, again)
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        scorer.score(images, ["x"])
