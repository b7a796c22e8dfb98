"""A template library mined from COCO captions, for the template-bias study (reports/open_questions.md).

The project's default library (``sage_dist/attack/data/templates.txt``) was written by hand, like the paper's
GPT-written one. This module mines a library from a *different source*: COCO captions, each with its subject
noun phrase replaced by ``a {}``. A caption is dropped when any of its words is a word of the bundled world's
concept domains (every concept word, synonym and held-out paraphrase word), so the attack can only reach the
concept through the ``{}`` slot, never through the template.

Regenerate the shipped file (deterministic)::

    python -m sage_dist.attack.mining --captions sage_dist/data/prompts/coco/coco_30k_val.csv \
        --out sage_dist/attack/data/coco_mined_templates.txt

No parser is available offline, so the noun phrase is found by a rule: the caption's opening words up to the
first boundary word (a preposition, verb or conjunction from :data:`BOUNDARY_WORDS`), at most four words.
"""

from __future__ import annotations

import argparse
import csv
import random
import re
from pathlib import Path

from sage_dist.world.concepts import CONCEPTS, phrases

MINED_LIBRARY = Path(__file__).resolve().parent / "data" / "coco_mined_templates.txt"
"""The shipped mined library (one ``{}`` per line, ``#`` header lines)."""

BOUNDARY_WORDS = frozenset(
    "is are was were be being sits sit sitting stands standing stand with on in at of near next by under over "
    "above behind beside that which who while holding holds riding rides walking walks laying lying "
    "flying looking looks has have having for from to into onto down up along across through during inside "
    "outside around between against filled parked covered made eating eats playing plays waiting".split())
"""Words that end a caption's subject noun phrase."""
ARTICLES = frozenset("a an the one two three four several some many".split())
WORD_RE = re.compile(r"[a-z]+")


def banned_words() -> frozenset[str]:
    """Every word of every world concept's domain (word, synonyms, held-out paraphrases), lower case, plus
    generic words of the domains ("shape", "figure", "coloured", "hued", ...)."""
    words = set()
    for concept in CONCEPTS:
        for phrase in phrases(concept):
            words.update(WORD_RE.findall(phrase.lower()))
    return frozenset(words)


def contains_banned(text: str, banned: frozenset[str]) -> bool:
    """True when a word of ``text`` is banned or starts with a banned word of >= 4 letters ("stripes",
    "squares", "crossing"; conservative: false positives only drop captions)."""
    for word in WORD_RE.findall(text.lower()):
        if word in banned or any(len(b) >= 4 and word.startswith(b) for b in banned):
            return True
    return False


def caption_to_template(caption: str) -> str | None:
    """``"Two people with skis are skiing."`` -> ``"a {} with skis are skiing"``; None when no subject
    phrase is found (the caption does not start with an article, or the phrase is longer than 4 words)."""
    words = caption.strip().rstrip(".").split()
    if len(words) < 3 or words[0].lower() not in ARTICLES:
        return None
    for end in range(1, min(len(words), 5)):
        if words[end].lower().strip(",") in BOUNDARY_WORDS:
            rest = " ".join(words[end:]).lower()
            if "{" in rest or "}" in rest:
                return None
            return f"a {{}} {rest}"
    return None


def mine_templates(captions: list[str], *, num: int = 125, max_words: int = 10, seed: int = 0) -> list[str]:
    """``num`` distinct templates (one ``{}`` each, at most ``max_words`` words, no banned word), drawn
    deterministically with ``seed`` from the usable captions.

    Raises:
        ValueError: fewer than ``num`` captions are usable.
    """
    banned = banned_words()
    usable = []
    for caption in captions:
        template = caption_to_template(caption)
        if template is None or len(template.split()) > max_words or contains_banned(template, banned):
            continue
        if template not in usable:
            usable.append(template)
    if len(usable) < num:
        raise ValueError(f"only {len(usable)} usable captions for {num} templates; give more captions or lower num")
    return sorted(random.Random(seed).sample(usable, num))


def read_captions(csv_path: str | Path) -> list[str]:
    """The ``prompt`` column of a prompt CSV (the shared COCO file's layout)."""
    with open(csv_path, newline="") as f:
        return [row["prompt"] for row in csv.DictReader(f)]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--captions", required=True, help="CSV with a 'prompt' column (COCO captions)")
    p.add_argument("--out", default=str(MINED_LIBRARY))
    p.add_argument("--num", type=int, default=125)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    templates = mine_templates(read_captions(args.captions), num=args.num, seed=args.seed)
    header = ("# Inside-out attack templates mined from COCO-30k validation captions (CC BY 4.0, COCO Consortium)\n"
              "# for the template-bias study (spec 5.2): subject noun phrase replaced by 'a {}', captions with a\n"
              "# word of the bundled world's concept domains dropped. Regenerate: python -m sage_dist.attack.mining\n")
    Path(args.out).write_text(header + "\n".join(templates) + "\n")
    print(f"wrote {len(templates)} templates to {args.out}")


if __name__ == "__main__":
    main()
