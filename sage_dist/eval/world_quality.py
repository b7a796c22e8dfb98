"""Quality of the bundled world's model, read by the world's detector.

Bar: on held-out prompts (the 12 held-out attribute combinations, with the held-out caption template and the
training templates), the detector finds the prompted shape and colour in >= 90% of images each and the texture
in >= 80%; held-out paraphrases of each concept generate it in >= 85%.

Command: ``sage-dist world quality --guidance 1.5 2.0 3.0 4.0``.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from sage_dist.eval.generate import generate_images
from sage_dist.models.load import load_pipeline
from sage_dist.models.registry import sampling_defaults
from sage_dist.world import scene as world_scene
from sage_dist.world.concepts import (
    ATTRIBUTES,
    COLOURS,
    SHAPES,
    TEXTURES,
    concept_domain,
)
from sage_dist.world.detector import load_detector

logger = logging.getLogger(__name__)
BAR = {"shape": 0.90, "colour": 0.90, "texture": 0.80, "heldout_paraphrase": 0.85}


def heldout_prompts() -> list[tuple[str, dict[str, str]]]:
    """96 (prompt, labels) pairs over the 12 held-out combinations: the held-out template and the 6 training
    templates with the attribute words, plus the held-out template with held-out paraphrases."""
    out = []
    for shape, colour, texture in world_scene.HELDOUT_COMBOS:
        labels = {"shape": shape, "colour": colour, "texture": texture}
        for template in (world_scene.HELDOUT_TEMPLATE, *world_scene.TRAIN_TEMPLATES):
            out.append((template.format(shape=shape, colour=colour, texture=texture), labels))
        out.append((world_scene.HELDOUT_TEMPLATE.format(
            shape=concept_domain(shape).heldout_paraphrases[0], colour=concept_domain(colour).heldout_paraphrases[0],
            texture=concept_domain(texture).heldout_paraphrases[0]), labels))
    return out


def paraphrase_prompts() -> list[tuple[str, str, str]]:
    """(prompt, attribute, concept): every held-out paraphrase of every concept in 3 contexts (the other
    attributes by their words, varied deterministically)."""
    out = []
    for attribute, values in ATTRIBUTES.items():
        for ci, concept in enumerate(values):
            for pi, phrase in enumerate(concept_domain(concept).heldout_paraphrases):
                for k in range(3):
                    j = ci + 2 * pi + k
                    words = {"shape": SHAPES[j % 6], "colour": COLOURS[(j + 1) % 6], "texture": TEXTURES[j % 3]}
                    words[attribute] = phrase
                    out.append((world_scene.TRAIN_TEMPLATES[0].format(**words), attribute, concept))
    return out


def measure_quality(model: str = "world", *, guidances: list[float] | None = None, num_inference_steps: int | None = None,
                    seed: int = 0, num_images_per_prompt: int = 1, detector=None) -> list[dict[str, float]]:
    """One row per guidance: accuracies on held-out prompts and held-out paraphrases, and ``meets_bar``."""
    det = detector if detector is not None else load_detector()
    pipe = load_pipeline(model)
    defaults = sampling_defaults(model)
    steps = num_inference_steps or defaults.num_inference_steps
    rows = []
    combo = heldout_prompts()
    para = paraphrase_prompts()
    for guidance in guidances or [defaults.guidance]:
        t0 = time.time()
        imgs = generate_images(pipe, [p for p, _ in combo], seed=seed, guidance=guidance, num_inference_steps=steps,
                        num_images_per_prompt=num_images_per_prompt)
        pred = det.predict(imgs)
        labels = [lab for _, lab in combo for _ in range(num_images_per_prompt)]
        row: dict[str, float] = {"guidance": guidance, "num_inference_steps": steps, "num_prompts": len(combo)}
        right = {h: np.array([pred[h][i] == labels[i][h] for i in range(len(labels))]) for h in ("shape", "colour", "texture")}
        for h, r in right.items():
            row[f"{h}_acc"] = float(r.mean())
        row["all_acc"] = float((right["shape"] & right["colour"] & right["texture"]).mean())
        imgs = generate_images(pipe, [p for p, _, _ in para], seed=seed + 1000, guidance=guidance,
                        num_inference_steps=steps, num_images_per_prompt=num_images_per_prompt)
        pred = det.predict(imgs)
        hits = {}
        for i, (_, attribute, concept) in enumerate(p for p in para for _ in range(num_images_per_prompt)):
            hits.setdefault((attribute, concept), []).append(pred[attribute][i] == concept)
        for attribute in ATTRIBUTES:
            vals = [np.mean(v) for (a, _), v in hits.items() if a == attribute]
            row[f"heldout_paraphrase_{attribute}_acc"] = float(np.mean(vals))
            row[f"heldout_paraphrase_{attribute}_min"] = float(np.min(vals))
        row["heldout_paraphrase_triangle_acc"] = float(np.mean(hits[("shape", "triangle")]))
        row["meets_bar"] = bool(row["shape_acc"] >= BAR["shape"] and row["colour_acc"] >= BAR["colour"]
                                and row["texture_acc"] >= BAR["texture"]
                                and min(row[f"heldout_paraphrase_{a}_acc"] for a in ATTRIBUTES) >= BAR["heldout_paraphrase"])
        row["seconds"] = round(time.time() - t0, 1)
        logger.info("quality %s", row)
        rows.append(row)
    return rows
