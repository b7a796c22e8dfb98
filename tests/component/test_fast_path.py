"""Issue 8: every saving of the fast path is exact for the same seeds, or a documented approximation."""

from __future__ import annotations

import torch

from sage_dist.attack.inside_out import _objective
from sage_dist.attack.prompt import build_attack_prompt
from sage_dist.config import AttackConfig
from sage_dist.models.text import TextConditioner
from sage_dist.models.tiny import build_tiny_sd
from sage_dist.train.rollout import DiffusionSampler, TrajectoryBank
from tests.component.test_engine import _eraser
from tests.conftest import tiny_config


def test_trajectory_bank_level_i_equals_a_fresh_rollout_to_i():
    pipe = build_tiny_sd(0)
    tc = TextConditioner(pipe)
    sampler = DiffusionSampler(pipe.unet, pipe.scheduler.config, (4, 8, 8), ddim_steps=10)
    with torch.no_grad():
        cond = tc.condition(tc.embed(["a triangle"]), trained=False)
    uncond = tc.uncond(1)
    bank = TrajectoryBank(sampler, bank_size=1, guidance=3.0, seed=0)
    for i in (0, 4, 9):
        z_bank = bank.latents(["k"], cond, uncond, i, torch.Generator().manual_seed(0))
        z_fresh = sampler.rollout(cond, uncond, i, guidance=3.0, noise=bank._noise("k", 0))
        assert torch.allclose(z_bank, z_fresh, atol=1e-5), i
    assert bank.num_built == 1


def test_attack_features_up_to_eot_give_the_same_loss_and_gradient():
    pipe = build_tiny_sd(0)
    tc = TextConditioner(pipe)
    prompt = build_attack_prompt(tc, "triangle", template="a photo of {} in the city")
    with torch.no_grad():
        concept = tc.condition(tc.embed(["triangle"]), trained=False).features
    cfg = AttackConfig()
    leaf = prompt.tokens[0].requires_grad_(True)
    fast, _, _ = _objective(tc, prompt, concept, None, cfg)
    (g_fast,) = torch.autograd.grad(fast, leaf)
    # straightforward: all 77 positions through both encoders
    batch = prompt.assemble(tc)
    full_o = tc.condition(batch, trained=False)
    full_n = tc.condition(batch, trained=True, through_wrapper=False)
    from sage_dist.losses import attack_loss, h1_concept_similarity, h2_not_erased

    h1 = h1_concept_similarity(full_o.features[0], concept[0])
    h2 = h2_not_erased(full_n.features[0], full_o.features[0], seq_trained_BLD=full_n.final[0],
                       seq_original_BLD=full_o.final[0], eot_index_B=batch.eot_index)
    slow = attack_loss(h1, h2)
    (g_slow,) = torch.autograd.grad(slow, leaf)
    assert torch.allclose(fast, slow, atol=1e-6)
    assert torch.allclose(g_fast, g_slow, atol=1e-6)


def test_cached_frozen_conditionings_equal_fresh_ones_and_step_grads_match():
    cfg = tiny_config(**{"erase.warmup_steps": 0})
    eraser = _eraser(cfg)
    prompts = ["a photo of chair", "a photo of banana"]
    cached = eraser.retain_original(prompts)
    again = eraser.retain_original(prompts)  # served from the cache
    with torch.no_grad():
        fresh = eraser.conditioner.condition(eraser.conditioner.embed(prompts), trained=False)
    for a, b in ((cached, fresh), (again, fresh)):
        assert torch.allclose(a.encoder_hidden_states, b.encoder_hidden_states, atol=1e-6)
        assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(a.features, b.features))


def test_rollout_cache_is_a_config_choice_that_still_trains():
    from sage_dist.train.loop import run_erasure

    cfg = tiny_config(**{"erase.rollout_cache": True, "erase.rollout_bank_size": 2, "optim.num_steps": 6})
    result = run_erasure(cfg, progress=False)
    assert result.eraser.bank.num_built <= 2 * (1 + 4 * 3)  # at most bank_size per prompt key seen
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)
    again = run_erasure(cfg, progress=False)
    a, b = result.text_encoders[0].state_dict(), again.text_encoders[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bank_targets_equal_the_frozen_model_at_the_cached_z_and_t():
    pipe = build_tiny_sd(0)
    tc = TextConditioner(pipe)
    sampler = DiffusionSampler(pipe.unet, pipe.scheduler.config, (4, 8, 8), ddim_steps=10)
    with torch.no_grad():
        cond = tc.condition(tc.embed(["a triangle", "a photo of chair"]), trained=False)
    uncond = tc.uncond(1)
    bank = TrajectoryBank(sampler, bank_size=3, guidance=3.0, seed=0)
    sample = bank.sample(["c", "r"], cond, uncond, 6, torch.Generator().manual_seed(1))
    assert sample.timesteps.tolist()[0] in range(600, 700) and sample.timesteps.tolist()[1] in range(600, 700)
    for j in range(2):
        row = torch.tensor([j])
        with torch.no_grad():
            e_u = sampler.eps(sample.latents[j : j + 1], int(sample.timesteps[j]), uncond)
            e_c = sampler.eps(sample.latents[j : j + 1], int(sample.timesteps[j]), cond.select(row))
        assert torch.allclose(sample.eps_uncond[j : j + 1], e_u, atol=1e-5)
        assert torch.allclose(sample.eps_cond[j : j + 1], e_c, atol=1e-5)
    again = bank.sample(["c", "r"], cond, uncond, 6, torch.Generator().manual_seed(1))
    assert torch.equal(again.latents, sample.latents) and bank.num_built == 2
