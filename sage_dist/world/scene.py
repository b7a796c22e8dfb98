"""The bundled world's procedural scenes: exact-label 16x16 images and their template captions.

Every image shows one centred object (jitter +-1 px) of a *shape*, a *colour* and a *texture* (the
textures play the role of artistic styles) on a light or dark *background*. Everything is a pure function
of a seed: :func:`sample_scenes` draws labels with a ``numpy.random.Generator``, :func:`render` paints them,
:func:`caption` words them from templates and attribute paraphrases (see :mod:`sage_dist.world.concepts`).

Design for learnability on a 2-core CPU : 16x16 pixels,
pixel-aligned coarse textures (2-px stripes, 2-px checks), narrow object sizes.

Held out from generator training (for the quality check): the 12 attribute combinations of
:data:`HELDOUT_COMBOS` and the caption template :data:`HELDOUT_TEMPLATE`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sage_dist.world.concepts import ATTRIBUTES, COLOURS, SHAPES, TEXTURES, phrases

RESOLUTION = 16
BACKGROUNDS: tuple[str, ...] = ("light", "dark")
COLOUR_RGB: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.75, 0.15),
    "blue": (0.15, 0.25, 0.95),
    "yellow": (0.95, 0.90, 0.10),
    "purple": (0.60, 0.15, 0.80),
    "orange": (1.00, 0.55, 0.05),
}
BACKGROUND_GREY: dict[str, float] = {"light": 0.85, "dark": 0.15}
PATTERN_SHADE = 0.45
"""Patterned textures alternate the colour with ``PATTERN_SHADE`` times the colour."""

BACKGROUND_PHRASES: dict[str, tuple[str, ...]] = {
    "light": ("on a white background", "on a light background"),
    "dark": ("on a black background", "on a dark background"),
}

TRAIN_TEMPLATES: tuple[str, ...] = (
    "a {colour} {texture} {shape}",
    "a {texture} {colour} {shape}",
    "a picture of a {colour} {shape}, {texture}",
    "{colour} {shape} with a {texture} pattern",
    "an image of a {texture} {shape} coloured {colour}",
    "a photo of a {colour} {shape} in {texture} style",
)
"""Caption templates seen in training; all three attributes named."""
PARTIAL_TEMPLATES: tuple[str, ...] = (
    "a {shape}",
    "{shape}",
    "a {colour} {shape}",
    "a {texture} {shape}",
    "a picture of a {shape}",
)
"""Templates naming fewer attributes (the others are then random), used with probability ``P_PARTIAL``."""
HELDOUT_TEMPLATE = "a drawing of a {shape} that is {colour} and {texture}"
"""Never used in generator training: the quality check's unseen template."""
P_PARTIAL = 0.2
P_BACKGROUND_PHRASE = 0.3


def _heldout_combos() -> tuple[tuple[str, str, str], ...]:
    combos = []
    for i, shape in enumerate(SHAPES):
        for j in range(2):
            colour = COLOURS[(i + 3 * j) % len(COLOURS)]
            texture = TEXTURES[(i + j) % len(TEXTURES)]
            combos.append((shape, colour, texture))
    return tuple(combos)


HELDOUT_COMBOS: tuple[tuple[str, str, str], ...] = _heldout_combos()
"""12 (shape, colour, texture) combinations never drawn in generator training (2 per shape)."""


@dataclass(frozen=True, kw_only=True)
class Scene:
    """Exact labels of one image."""

    shape: str
    colour: str
    texture: str
    background: str
    size: float
    """Object radius in pixels."""
    dx: int
    dy: int
    """Offset of the centre from the image centre, pixels (in {-1, 0, 1})."""


def _polygon_mask(x: np.ndarray, y: np.ndarray, vx: np.ndarray, vy: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test; ``x, y`` [H, W] pixel-centre coordinates, vertices [N]."""
    inside = np.zeros(x.shape, dtype=bool)
    n = len(vx)
    for i in range(n):
        x1, y1, x2, y2 = vx[i], vy[i], vx[(i + 1) % n], vy[(i + 1) % n]
        crosses = (y1 > y) != (y2 > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = x1 + (y - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (x < x_at)
    return inside


def shape_mask(shape: str, size: float, dx: int = 0, dy: int = 0, resolution: int = RESOLUTION) -> np.ndarray:
    """Boolean [H, W] mask of ``shape`` with radius ``size`` centred at the image centre + (dx, dy).

    Raises:
        ValueError: unknown shape.
    """
    c = (resolution - 1) / 2.0
    yy, xx = np.mgrid[0:resolution, 0:resolution].astype(np.float64)
    x, y, r = xx - c - dx, yy - c - dy, float(size)
    if shape == "circle":
        return x**2 + y**2 <= r**2
    if shape == "square":
        return (np.abs(x) <= 0.8 * r) & (np.abs(y) <= 0.8 * r)
    if shape == "triangle":
        return _polygon_mask(x, y, np.array([0.0, -r - 0.5, r + 0.5]), np.array([-r - 0.5, 0.8 * r + 0.5, 0.8 * r + 0.5]))
    if shape == "diamond":
        return np.abs(x) + np.abs(y) <= r + 0.5
    if shape == "cross":
        arm = 0.3 * r + 0.3
        return ((np.abs(x) <= arm) & (np.abs(y) <= r)) | ((np.abs(y) <= arm) & (np.abs(x) <= r))
    if shape == "star":
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, 1.15 * r + 0.5, 0.5 * r)
        return _polygon_mask(x, y, radii * np.cos(angles), radii * np.sin(angles))
    raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")


def texture_mask(texture: str, resolution: int = RESOLUTION) -> np.ndarray:
    """Boolean [H, W]: True where a patterned texture shows the full colour (pixel-aligned, 2-px period)."""
    yy, xx = np.mgrid[0:resolution, 0:resolution]
    if texture == "solid":
        return np.ones((resolution, resolution), dtype=bool)
    if texture == "striped":
        return (yy // 2) % 2 == 0
    if texture == "checkered":
        return ((xx // 2) + (yy // 2)) % 2 == 0
    raise ValueError(f"unknown texture {texture!r}; choose one of {TEXTURES}")


def render(scene: Scene, resolution: int = RESOLUTION) -> np.ndarray:
    """Paint one scene. Returns float32 [H, W, 3] in [0, 1]."""
    img = np.full((resolution, resolution, 3), BACKGROUND_GREY[scene.background], dtype=np.float32)
    rgb = np.asarray(COLOUR_RGB[scene.colour], dtype=np.float32)
    obj = shape_mask(scene.shape, scene.size, scene.dx, scene.dy, resolution)
    full = texture_mask(scene.texture, resolution)
    img[obj & full] = rgb
    img[obj & ~full] = PATTERN_SHADE * rgb
    return img


def sample_scenes(num: int, rng: np.random.Generator, *, exclude_heldout: bool = True,
                  combos: tuple[tuple[str, str, str], ...] | None = None) -> list[Scene]:
    """Draw ``num`` scenes; with ``exclude_heldout`` the combinations in :data:`HELDOUT_COMBOS` are never drawn.

    ``combos`` restricts (shape, colour, texture) to a given list (drawn uniformly).
    """
    heldout = set(HELDOUT_COMBOS) if exclude_heldout else set()
    scenes = []
    while len(scenes) < num:
        if combos is not None:
            shape, colour, texture = combos[int(rng.integers(len(combos)))]
        else:
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            colour = COLOURS[int(rng.integers(len(COLOURS)))]
            texture = TEXTURES[int(rng.integers(len(TEXTURES)))]
            if (shape, colour, texture) in heldout:
                continue
        scenes.append(Scene(
            shape=shape, colour=colour, texture=texture,
            background=BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))],
            size=float(rng.uniform(5.0, 6.5)), dx=int(rng.integers(-1, 2)), dy=int(rng.integers(-1, 2)),
        ))
    return scenes


def render_batch(scenes: list[Scene]) -> np.ndarray:
    """Paint scenes; returns float32 [N, 3, H, W] in [0, 1]."""
    return np.stack([render(s) for s in scenes]).transpose(0, 3, 1, 2).copy()


def caption(scene: Scene, rng: np.random.Generator, *, template: str | None = None, partial: bool = True) -> str:
    """A random training caption of ``scene``: a template filled with random paraphrases of each attribute.

    Paraphrases are drawn from the word, synonyms and held-out paraphrases (the generator is trained on
    all of them; only erasure never sees the held-out ones). ``template`` fixes the template.
    """
    if template is None:
        if partial and rng.random() < P_PARTIAL:
            template = PARTIAL_TEMPLATES[int(rng.integers(len(PARTIAL_TEMPLATES)))]
        else:
            template = TRAIN_TEMPLATES[int(rng.integers(len(TRAIN_TEMPLATES)))]
    values = {"shape": scene.shape, "colour": scene.colour, "texture": scene.texture}
    words = {}
    for attribute, value in values.items():
        options = phrases(value)
        words[attribute] = options[int(rng.integers(len(options)))]
    text = template.format(**words)
    if rng.random() < P_BACKGROUND_PHRASE:
        options = BACKGROUND_PHRASES[scene.background]
        text = f"{text} {options[int(rng.integers(len(options)))]}"
    return text


def make_prompt(shape: str, colour: str, texture: str, template: str = TRAIN_TEMPLATES[0]) -> str:
    """Fill ``template`` with given phrases (any paraphrase strings)."""
    return template.format(shape=shape, colour=colour, texture=texture)


def attribute_index(attribute: str, value: str) -> int:
    """Index of ``value`` in ``ATTRIBUTES[attribute]`` (the detector's class id)."""
    return ATTRIBUTES[attribute].index(value)
