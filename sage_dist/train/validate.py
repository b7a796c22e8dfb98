"""Input checks of an erasure run that need files but no model: run before anything expensive starts."""

from __future__ import annotations

import logging
import warnings

from sage_dist.attack.templates import load_templates
from sage_dist.config import StudyConfig
from sage_dist.models.registry import check_model_source, is_world
from sage_dist.models.tokenizer import build_clip_tokenizer
from sage_dist.retention.prompts import build_retain_set
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


def warn_long_prompts(prompts: list[str], what: str, ids: list[str] | None = None) -> int:
    """Warn once if any prompt exceeds 77 CLIP tokens (it will be truncated); returns how many do.

    The warning gives the count and the first id (``ids``, default the position in ``prompts``), never the
    prompt text (the project logs ids only; diffusers' per-prompt message is filtered out, see
    :func:`sage_dist.prompts.install_truncation_filter`).
    """
    tok = build_clip_tokenizer()
    ids = ids if ids is not None else [str(i) for i in range(len(prompts))]
    long = [i for p, i in zip(prompts, ids) if len(tok(p).input_ids) > MAX_TOKENS]
    if long:
        warnings.warn(f"{len(long)} {what} exceed {MAX_TOKENS} CLIP tokens and will be truncated "
                      f"(first: id {long[0]})", stacklevel=2)
    return len(long)


def validate_inputs(cfg: StudyConfig) -> list[str]:
    """All pre-flight checks of an erasure run; returns the retain prompts it will use.

    Reads files only (tokenizer, prompt files, model folder listing, template library); no model is loaded.

    Raises:
        ValueError: unknown or empty concept, missing or partial model folder, a bad attack template
            library, a bad retain prompt file (:func:`sage_dist.prompts.load_prompts`), a retain set with
            fewer distinct prompts (after removing those naming an erased concept) than
            ``retain.retain_batch_size``.
    """
    check_concepts(cfg)
    check_model_source(cfg.model.model_id)
    load_templates(cfg.attack.template_library)
    if cfg.erase.method == "esd":  # ESD-x trains without retention but its evaluation reads the retain set
        return []
    retain = build_retain_set(cfg.retain.retain_prompts, model_id=cfg.model.model_id,
                              erase_concepts=cfg.erase.erase_concept)
    if len(retain.prompts) < cfg.retain.retain_batch_size:
        raise ValueError(
            f"retain set {cfg.retain.retain_prompts!r} has {len(retain.prompts)} usable distinct prompts (of "
            f"{retain.num_candidates}: {len(retain.removed_for_concept)} name an erased concept, "
            f"{len(retain.removed_duplicates)} repeat another), fewer than retain.retain_batch_size="
            f"{cfg.retain.retain_batch_size}; lower retain_batch_size or use a larger set.")
    warn_long_prompts(list(retain.prompts), "retain prompts", list(retain.ids))
    return list(retain.prompts)
