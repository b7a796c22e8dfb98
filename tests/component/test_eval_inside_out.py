"""SAGE's inside-out attack as the evaluation's ASR attack (b)."""

import torch

from sage_dist.eval.attacks import build_eval_attack
from sage_dist.models.tiny import build_tiny_sd
from sage_dist.prompts import PromptRecord


def test_eval_attack_returns_erased_conditioning_for_each_record():
    pipe = build_tiny_sd(0)
    erased = build_tiny_sd(1).text_encoder  # stands in for an erased encoder (different weights)
    attack = build_eval_attack(pipe, pipe.text_encoder, erased, concept="nudity", attack_steps=3)
    record = PromptRecord(id="7", prompt="a quiet beach at sunset", seed=1, guidance=7.5, category="", extra={})
    adv = attack(record)
    assert adv.prompt_embeds.shape == (1, 77, 32)
    assert adv.text == "a quiet beach at sunset, {}"
    assert torch.isfinite(adv.prompt_embeds).all()
    assert all(p.grad is None for p in erased.parameters())
