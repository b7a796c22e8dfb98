"""Which retain prompts a run uses (docs/METHOD.md "Retain prompts": AdvUnlearn's COCO-object set by default on real models)."""

from __future__ import annotations

from sage_dist.models.registry import is_world
from sage_dist.prompts import load_retain_prompts
from sage_dist.world.concepts import retain_prompts


def resolve_retain_prompts(name: str, *, model_id: str, erase_concepts: tuple[str, ...]) -> list[str]:
    """The retain prompt list for ``retain.retain_prompts`` = ``name``.

    "auto": the bundled world's retain captions (excluding the erased concepts) for "world"/"world-xl",
    AdvUnlearn's 243 COCO-object prompts otherwise. "coco_object", "imagenet243" or a CSV/TXT path are
    loaded by :func:`sage_dist.prompts.load_retain_prompts`. Prompts that mention an erased concept
    are removed.

    Raises:
        ValueError: unknown name or unreadable file.
    """
    if name == "auto" and is_world(model_id):
        prompts = []
        for c in erase_concepts:
            kept = set(retain_prompts(c))
            prompts = [p for p in (prompts or retain_prompts(c)) if p in kept]
        return prompts
    prompts = load_retain_prompts("coco_object" if name == "auto" else name)
    lowered = [c.lower() for c in erase_concepts]
    return [p for p in prompts if not any(c in p.lower() for c in lowered)]
