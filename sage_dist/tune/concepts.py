"""Which concepts a study erases, on the bundled world or on a real model (the artist prompt sets).

On the world the concepts are fixed, mixed across attributes so that retain prompts remain after erasing all
of them (8 concepts leave 2 shapes x 3 colours x 2 textures = 12 combinations, 8 of them in the retain train
split). On a real model (SD v1.4,
SDXL) the concepts are the first artists of the shipped artist prompt set (ESD/AdvUnlearn's
``big_artist_prompts.csv``, then ``short_niche_art_prompts.csv``), the spec's "artistic style" concepts.
"""

from __future__ import annotations

import csv
from importlib import resources

from sage_dist.models.registry import is_world

WORLD_MULTI = ("triangle", "red", "star", "blue", "circle", "checkered", "square", "green")
"""World concepts of the multi-concept study, in the order they are added (1, 2, 4, 8)."""
WORLD_STYLES = ("striped", "checkered")
"""World textures, the world's "artistic styles" (frozen-UNet study)."""
WORLD_SINGLE = "triangle"
"""The template-bias and dual-encoder studies' concept on the world."""


ARTIST_SETS = ("big_artist_prompts.csv", "short_niche_art_prompts.csv")


def artist_concepts(num: int) -> tuple[str, ...]:
    """The first ``num`` distinct artists (column ``artist``) of the shipped artist sets, famous ones first.

    Raises:
        ValueError: the sets name fewer than ``num`` artists.
    """
    artists: list[str] = []
    for prompt_set in ARTIST_SETS:
        path = resources.files("sage_dist") / "data" / "prompts" / "artists" / prompt_set
        with path.open(newline="") as f:
            artists += [row["artist"].strip() for row in csv.DictReader(f) if row["artist"].strip()]
    artists = list(dict.fromkeys(artists))
    if len(artists) < num:
        raise ValueError(f"the artist sets name {len(artists)} artists, fewer than {num}")
    return tuple(artists[:num])


def multi_concepts(model: str, num: int) -> tuple[str, ...]:
    """The first ``num`` concepts of the multi-concept study for ``model``."""
    return WORLD_MULTI[:num] if is_world(model) else artist_concepts(num)


def style_concepts(model: str) -> tuple[str, ...]:
    """Two "style" concepts: world textures, or two artists."""
    return WORLD_STYLES if is_world(model) else artist_concepts(2)


def single_concept(model: str) -> str:
    return WORLD_SINGLE if is_world(model) else artist_concepts(1)[0]
