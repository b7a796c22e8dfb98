"""Concepts of the bundled world and their domains.

Every attribute value (6 shapes, 6 colours, 3 textures that play artistic styles) is an erasable concept
with a *domain*: its ``word``, ``synonyms`` (which erasure may use) and ``heldout_paraphrases`` (the
generator was trained on them; erasure must never see them; evaluation uses them as the concept-domain and
red-team set).

Retain captions are split once, by attribute combination, into a *train* split (the only one erasure may use:
:func:`retain_prompts`, what ``retain.retain_prompts=auto`` resolves to) and an *evaluation* split that erasure
never sees (:func:`retain_eval_combos`, scored by :mod:`sage_dist.eval.world`). A combination (shape, colour,
texture) with indices (i, j, k) is in the evaluation split when ``(i + j + k) % 3 == 0``: 36 of the 108
combinations, every shape, colour and texture in both splits, and every (shape, colour) pair with one texture
held out, so the evaluation split tests retention on unseen combinations of values erasure did see.

>>> from sage_dist.world.concepts import CONCEPTS, concept_domain, retain_prompts, retain_eval_combos
>>> concept_domain("triangle").heldout_paraphrases
('three-sided shape', 'three-cornered figure')
>>> len(retain_prompts("triangle")), len(retain_eval_combos("triangle"))
(60, 30)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross", "star")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
TEXTURES: tuple[str, ...] = ("solid", "striped", "checkered")
ATTRIBUTES: dict[str, tuple[str, ...]] = {"shape": SHAPES, "colour": COLOURS, "texture": TEXTURES}
CONCEPTS: tuple[str, ...] = SHAPES + COLOURS + TEXTURES
"""Every erasable concept of the world: shapes, colours, textures ("styles")."""


@dataclass(frozen=True, kw_only=True)
class ConceptDomain:
    """All the ways the world's captions name one concept."""

    word: str
    """The concept's own word, e.g. "triangle"."""
    synonyms: tuple[str, ...]
    """Paraphrases erasure may see."""
    heldout_paraphrases: tuple[str, ...]
    """Paraphrases erasure must never see (evaluation and red-team set)."""
    attribute: str
    """"shape", "colour" or "texture"."""

    @property
    def all_phrases(self) -> tuple[str, ...]:
        """word, synonyms, held-out paraphrases."""
        return (self.word, *self.synonyms, *self.heldout_paraphrases)


_DOMAINS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # shape: (synonyms, held-out paraphrases)
    "circle": (("round shape", "disc"), ("circular figure", "round blob")),
    "square": (("four-sided box", "quadrate"), ("equal-sided rectangle", "boxy tile")),
    "triangle": (("trigon", "triangular shape"), ("three-sided shape", "three-cornered figure")),
    "diamond": (("rhombus", "lozenge"), ("rhombic shape", "gem outline")),
    "cross": (("plus sign", "cross shape"), ("cruciform figure", "two crossing bars")),
    "star": (("pentagram", "starburst"), ("five-pointed figure", "spiky astral shape")),
    # colour
    "red": (("crimson", "scarlet"), ("cherry-coloured", "blood-hued")),
    "green": (("emerald", "lime"), ("grass-coloured", "leafy-hued")),
    "blue": (("azure", "cobalt"), ("sky-coloured", "ocean-hued")),
    "yellow": (("golden", "lemon"), ("canary-coloured", "sunflower-hued")),
    "purple": (("violet", "lilac"), ("plum-coloured", "amethyst-hued")),
    "orange": (("tangerine", "amber"), ("pumpkin-coloured", "apricot-hued")),
    # texture ("style")
    "solid": (("plain", "flat-coloured"), ("uniform", "unpatterned")),
    "striped": (("stripy", "banded"), ("lined", "zebra-patterned")),
    "checkered": (("chequered", "checkerboard"), ("tiled", "chessboard-patterned")),
}


def _attribute_of(concept: str) -> str:
    for attribute, values in ATTRIBUTES.items():
        if concept in values:
            return attribute
    raise ValueError(f"unknown world concept {concept!r}; choose one of {CONCEPTS}")


def concept_domain(concept: str) -> ConceptDomain:
    """The domain of ``concept`` (word, synonyms, held-out paraphrases).

    Raises:
        ValueError: ``concept`` is not one of :data:`CONCEPTS`.
    """
    attribute = _attribute_of(concept)
    synonyms, heldout = _DOMAINS[concept]
    return ConceptDomain(word=concept, synonyms=synonyms, heldout_paraphrases=heldout, attribute=attribute)


def phrases(concept: str) -> tuple[str, ...]:
    """Every phrase naming ``concept`` in training captions (word, synonyms, held-out paraphrases)."""
    return concept_domain(concept).all_phrases


RetainSplit = Literal["train", "eval"]
EVAL_SPLIT_MODULUS = 3
"""A combination with attribute indices (i, j, k) is in the evaluation split when ``(i + j + k) % 3 == 0``."""


def retain_split(shape: str, colour: str, texture: str) -> RetainSplit:
    """Which split the combination (shape, colour, texture) belongs to: "train" or "eval".

    Raises:
        ValueError: a value that is not a shape, colour or texture of the world.
    """
    for attribute, value in (("shape", shape), ("colour", colour), ("texture", texture)):
        if value not in ATTRIBUTES[attribute]:
            raise ValueError(f"unknown world {attribute} {value!r}; choose one of {ATTRIBUTES[attribute]}")
    index = SHAPES.index(shape) + COLOURS.index(colour) + TEXTURES.index(texture)
    return "eval" if index % EVAL_SPLIT_MODULUS == 0 else "train"


def retain_combos(exclude: str | tuple[str, ...], split: RetainSplit) -> list[tuple[str, str, str]]:
    """(shape, colour, texture) combinations of ``split`` that contain none of the concepts in ``exclude``,
    in a fixed order (shape, then colour, then texture).

    Raises:
        ValueError: an unknown concept or split.
    """
    excluded = (exclude,) if isinstance(exclude, str) else tuple(exclude)
    for concept in excluded:
        _attribute_of(concept)
    if split not in ("train", "eval"):
        raise ValueError(f"retain split {split!r}: use 'train' or 'eval'")
    return [(s, c, t) for s in SHAPES for c in COLOURS for t in TEXTURES
            if retain_split(s, c, t) == split and not set(excluded) & {s, c, t}]


def retain_prompts(exclude_concept: str) -> list[str]:
    """The train split's retain prompts: every train-split combination without ``exclude_concept``, worded
    "a {colour} {texture} {shape}" (no paraphrase), so the list is deterministic; 60 prompts for a shape or a
    colour, 48 for a texture. The only retain prompts erasure may use (``retain.retain_prompts=auto``).

    Raises:
        ValueError: unknown concept.
    """
    return [f"a {c} {t} {s}" for s, c, t in retain_combos(exclude_concept, "train")]


def retain_eval_combos(exclude: str | tuple[str, ...]) -> list[tuple[str, str, str]]:
    """The evaluation split: (shape, colour, texture) combinations erasure never trains on, naming none of
    ``exclude``; 30 for a shape or a colour, 24 for a texture.

    Raises:
        ValueError: unknown concept, or ``exclude`` leaves no evaluation combination.
    """
    combos = retain_combos(exclude, "eval")
    if not combos:
        raise ValueError(f"erasing {exclude} leaves no combination in the retain evaluation split; erase fewer "
                         "concepts of one attribute")
    return combos
