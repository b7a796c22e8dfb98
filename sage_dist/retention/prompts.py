"""Which retain prompts a run uses (docs/METHOD.md "Retain prompts": AdvUnlearn's COCO-object set by default on real models).

A retain prompt that names an erased concept would pull the erased encoder back towards it, so such prompts
are removed, and so are repeated prompts (a prompt listed twice would be drawn twice as often). A prompt
names a concept when one of the concept's phrases occurs in it as whole words, case-insensitively, with
spaces, hyphens and underscores between words interchangeable and an optional plural "s"/"es":

* on the bundled world the phrases are the concept's whole domain
  (:func:`sage_dist.world.concepts.concept_domain` ``.all_phrases``: word, synonyms, held-out paraphrases);
* on real models they are the concept itself plus, for the standard concepts of the evaluation protocols,
  the synonyms in :data:`CONCEPT_SYNONYMS` (nudity, Van Gogh, and UnlearnDiffAtk's church, garbage truck,
  parachute and tench). Any other concept is matched by its own words only.

What was removed is logged (counts and ids at info level, prompt text only at debug level) and kept in
:class:`RetainSet`.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from sage_dist.models.registry import is_world
from sage_dist.prompts import RETAIN_SETS, load_prompts
from sage_dist.world.concepts import concept_domain, retain_prompts

log = logging.getLogger(__name__)

CONCEPT_SYNONYMS: dict[str, tuple[str, ...]] = {
    # I2P's "sexual" category and the nudity protocol (ESD, AdvUnlearn, SAGE). Words whose everyday sense is
    # another thing ("nipple" in ImageNet is a baby-bottle teat, "breast" is also meat) are left out.
    "nudity": ("nude", "nudes", "naked", "nakedness", "topless", "bottomless", "undressed", "unclothed",
               "disrobed", "without clothes", "without clothing", "no clothes", "no clothing", "nsfw", "porn",
               "porno", "pornography", "pornographic", "erotic", "erotica", "genitals", "genitalia", "sexual"),
    # the style protocol (UnlearnDiffAtk / Ring-A-Bell Van Gogh sets)
    "van gogh": ("vincent van gogh", "vangogh", "gogh"),
    # the object protocol (UnlearnDiffAtk's four ImageNet objects)
    "church": ("chapel", "cathedral", "basilica", "church building"),
    "garbage truck": ("trash truck", "refuse truck", "rubbish truck", "garbage lorry", "bin lorry", "dustcart",
                      "dustbin lorry", "refuse collection vehicle", "waste collection vehicle"),
    "parachute": ("parachutist", "parachuting", "skydiver", "skydiving", "paratrooper"),
    "tench": ("tinca tinca", "doctor fish"),
}
"""Synonyms of the standard concepts on real models, keyed by the concept's canonical name. An erased concept
equal (case-insensitively) to a key or to one of its synonyms uses the whole row."""


def _normalise(phrase: str) -> str:
    return " ".join(re.split(r"[\s\-_]+", phrase.strip().lower())).strip()


def concept_phrases(concept: str, *, model_id: str) -> tuple[str, ...]:
    """Every phrase whose presence in a retain prompt means the prompt names ``concept`` (see module docstring).

    Raises:
        ValueError: ``model_id`` is the bundled world and ``concept`` is not one of its concepts.
    """
    if is_world(model_id):
        return concept_domain(concept).all_phrases
    key = _normalise(concept)
    for canonical, synonyms in CONCEPT_SYNONYMS.items():
        if key == canonical or key in {_normalise(s) for s in synonyms}:
            return tuple(dict.fromkeys((concept, canonical, *synonyms)))
    return (concept,)


def concept_pattern(phrases: tuple[str, ...]) -> re.Pattern[str]:
    """One case-insensitive regex matching any of ``phrases`` as whole words (optional plural s/es)."""
    bodies = []
    for phrase in phrases:
        words = [re.escape(w) for w in re.split(r"[\s\-_]+", phrase.strip()) if w]
        if words:
            bodies.append(r"[\s\-_]+".join(words))
    return re.compile(r"(?<![^\W_])(?:" + "|".join(sorted(bodies, key=len, reverse=True)) + r")(?:e?s)?(?![^\W_])",
                      re.IGNORECASE)


@dataclass(frozen=True, kw_only=True)
class RetainSet:
    """The retain prompts of a run and what was removed from the candidate set."""

    source: str
    """``retain.retain_prompts`` as given ("auto", a shipped name or a path)."""
    prompts: tuple[str, ...]
    """Distinct prompts, in file order (first occurrences)."""
    ids: tuple[str, ...]
    """Id of each prompt (the file's id column or row number; the position on the world's own list)."""
    num_candidates: int
    """Usable prompts before removal (see :func:`sage_dist.prompts.load_prompts` for rows that are unusable)."""
    removed_for_concept: tuple[tuple[str, str], ...] = ()
    """(id, erased concept) of every prompt that names an erased concept."""
    removed_duplicates: tuple[str, ...] = ()
    """Ids of prompts that repeat an earlier one."""


def _candidates(name: str, model_id: str, erase_concepts: tuple[str, ...]) -> tuple[list[str], list[str]]:
    if name == "auto" and is_world(model_id):
        prompts: list[str] = []
        for c in erase_concepts:
            kept = set(retain_prompts(c))
            prompts = [p for p in (prompts or retain_prompts(c)) if p in kept]
        return prompts, [str(i) for i in range(len(prompts))]
    key = "coco_object" if name == "auto" else name
    ps = load_prompts(RETAIN_SETS.get(key, key), check_tokens=False)
    return [r.prompt for r in ps.records], [r.id for r in ps.records]


def build_retain_set(name: str, *, model_id: str, erase_concepts: tuple[str, ...]) -> RetainSet:
    """The retain set for ``retain.retain_prompts`` = ``name``, with prompts naming an erased concept and
    repeated prompts removed.

    "auto": the bundled world's retain captions (excluding the erased concepts) for "world"/"world-xl",
    AdvUnlearn's 243 COCO-object prompts otherwise. "coco_object", "imagenet243" or a CSV/TXT path are
    loaded by :func:`sage_dist.prompts.load_prompts`.

    Raises:
        ValueError: unknown name or a bad file (see :func:`sage_dist.prompts.load_prompts`), or an unknown
            concept of the bundled world.
    """
    prompts, ids = _candidates(name, model_id, erase_concepts)
    patterns = [(c, concept_pattern(concept_phrases(c, model_id=model_id))) for c in erase_concepts]
    kept: dict[str, str] = {}
    removed_for_concept: list[tuple[str, str]] = []
    removed_text: list[str] = []
    duplicates: list[str] = []
    for prompt, pid in zip(prompts, ids):
        named = next((c for c, pattern in patterns if pattern.search(prompt)), None)
        if named is not None:
            removed_for_concept.append((pid, named))
            removed_text.append(prompt)
        elif prompt in kept:
            duplicates.append(pid)
        else:
            kept[prompt] = pid
    result = RetainSet(source=name, prompts=tuple(kept), ids=tuple(kept.values()), num_candidates=len(prompts),
                       removed_for_concept=tuple(removed_for_concept), removed_duplicates=tuple(duplicates))
    _log_removals(result, removed_text)
    return result


def _first(items: list[str], n: int = 10) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def _log_removals(rs: RetainSet, removed_text: list[str]) -> None:
    if rs.removed_for_concept:
        per_concept: dict[str, int] = {}
        for _, c in rs.removed_for_concept:
            per_concept[c] = per_concept.get(c, 0) + 1
        log.info("retain set %r: %d prompt(s) name an erased concept and are left out (%s); ids %s", rs.source,
                 len(rs.removed_for_concept), ", ".join(f"{c!r}: {n}" for c, n in per_concept.items()),
                 _first([i for i, _ in rs.removed_for_concept]))
        log.debug("retain set %r: first prompts left out for naming an erased concept: %s", rs.source,
                  removed_text[:5])
    if rs.removed_duplicates:
        log.warning("retain set %r: %d repeated prompt(s) removed, so that no prompt is drawn more often than the "
                    "others (ids %s)", rs.source, len(rs.removed_duplicates), _first(list(rs.removed_duplicates)))


def resolve_retain_prompts(name: str, *, model_id: str, erase_concepts: tuple[str, ...]) -> list[str]:
    """The retain prompt list of :func:`build_retain_set` (distinct, none naming an erased concept).

    Raises:
        ValueError: unknown name or unreadable file.
    """
    return list(build_retain_set(name, model_id=model_id, erase_concepts=erase_concepts).prompts)
