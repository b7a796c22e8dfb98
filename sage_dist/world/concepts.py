"""Concepts of the bundled world and their domains.

Every attribute value (6 shapes, 6 colours, 3 textures that play artistic styles) is an erasable concept
with a *domain*: its ``word``, ``synonyms`` (which erasure may use) and ``heldout_paraphrases`` (the
generator was trained on them; erasure must never see them; evaluation uses them as the concept-domain and
red-team set).

>>> from sage_dist.world.concepts import CONCEPTS, concept_domain, retain_prompts
>>> concept_domain("triangle").heldout_paraphrases
('three-sided shape', 'three-cornered figure')
>>> len(retain_prompts("triangle")) >= 64
True
"""

from __future__ import annotations

from dataclasses import dataclass

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


def retain_prompts(exclude_concept: str) -> list[str]:
    """Prompts about unrelated concepts: every combination that does not contain ``exclude_concept``.

    Each uses the word (no paraphrase) in the template "a {colour} {texture} {shape}", so the list is
    deterministic; 5 x 6 x 3 = 90 prompts for a shape, 6 x 5 x 3 for a colour, 6 x 6 x 2 for a texture.

    Raises:
        ValueError: unknown concept.
    """
    _attribute_of(exclude_concept)
    return [f"a {c} {t} {s}" for s in SHAPES for c in COLOURS for t in TEXTURES if exclude_concept not in (s, c, t)]
