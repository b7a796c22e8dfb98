"""Input checks of an erasure run that need files but no model: run before anything expensive starts."""

from __future__ import annotations

import logging
import warnings

from sage_dist.config import StudyConfig
from sage_dist.models.registry import check_model_source, is_world
from sage_dist.models.tokenizer import build_clip_tokenizer
from sage_dist.retention.prompts import resolve_retain_prompts
from sage_dist.world.concepts import CONCEPTS as WORLD_CONCEPTS

log = logging.getLogger(__name__)
MAX_TOKENS = 77


def check_concepts(cfg: StudyConfig) -> None:
    """Each concept must tokenize to real tokens; on the bundled world it must be one of the world's concepts.

    Raises:
        ValueError: naming the concept and what is allowed.
    """
    tok = build_clip_tokenizer()
    for concept in cfg.erase.erase_concept:
        ids = tok(concept, add_special_tokens=False).input_ids
        if not ids:
            raise ValueError(f"erase.erase_concept {concept!r} has no tokens; give a word or phrase.")
        if len(ids) > MAX_TOKENS - 2 - 8:
            raise ValueError(f"erase.erase_concept {concept!r} is {len(ids)} tokens long; a concept must leave "
                             "room for a template inside CLIP's 77 tokens (at most 67).")
    if is_world(cfg.model.model_id):
        allowed = WORLD_CONCEPTS
        unknown = [c for c in cfg.erase.erase_concept if c not in allowed]
        if unknown:
            raise ValueError(f"erase.erase_concept {unknown}: unknown concept of the bundled world; "
                             f"allowed: {sorted(allowed)}")


def warn_long_prompts(prompts: list[str], what: str) -> int:
    """Warn once if any prompt exceeds 77 CLIP tokens (it will be truncated); returns how many do."""
    tok = build_clip_tokenizer()
    long = [p for p in prompts if len(tok(p).input_ids) > MAX_TOKENS]
    if long:
        warnings.warn(f"{len(long)} {what} exceed {MAX_TOKENS} CLIP tokens and will be truncated "
                      f"(first: {long[0][:60]!r}...)", stacklevel=2)
    return len(long)


def validate_inputs(cfg: StudyConfig) -> list[str]:
    """All pre-flight checks of an erasure run; returns the retain prompts it will use.

    Raises:
        ValueError: unknown or empty concept, missing model folder or text encoder, retain set smaller
            than ``retain.retain_batch_size``, a concept that is also a retain prompt's subject only.
    """
    check_concepts(cfg)
    check_model_source(cfg.model.model_id)
    if cfg.erase.method == "esd":
        return []
    prompts = resolve_retain_prompts(cfg.retain.retain_prompts, model_id=cfg.model.model_id,
                                     erase_concepts=cfg.erase.erase_concept)
    if len(prompts) < cfg.retain.retain_batch_size:
        raise ValueError(f"retain set {cfg.retain.retain_prompts!r} has {len(prompts)} usable prompts (after "
                         f"removing those naming an erased concept), fewer than retain.retain_batch_size="
                         f"{cfg.retain.retain_batch_size}; lower retain_batch_size or use a larger set.")
    warn_long_prompts(prompts, "retain prompts")
    return prompts
