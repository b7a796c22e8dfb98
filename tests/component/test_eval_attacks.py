"""UnlearnDiffAtk-style prefix attack on the tiny SD pipeline (CPU, seeded)."""

from __future__ import annotations

import pytest
import torch

from sage_dist.eval.attacks import (
    AdversarialPrompt,
    PrefixAttackConfig,
    prefix_attack_steps,
    prefix_token_attack,
    project_to_simplex,
    run_external_attack,
    sampled_timesteps,
)


def test_sampled_timesteps_match_unlearndiffatk():
    ts = sampled_timesteps(50)
    assert ts[:3] == [10, 30, 50] and ts[-1] == 990 and len(ts) == 50
    assert sampled_timesteps(2) == [250, 750]


def test_project_to_simplex():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(4, 50, generator=g) * 3
    p = project_to_simplex(v)
    assert torch.all(p >= 0)
    torch.testing.assert_close(p.sum(-1), torch.ones(4))
    x = torch.softmax(torch.randn(3, 10, generator=g), -1)
    torch.testing.assert_close(project_to_simplex(x), x)  # already on the simplex: unchanged
    # closest point: no other random simplex point is nearer
    for _ in range(20):
        q = torch.softmax(torch.randn(4, 50, generator=g) * 3, -1)
        assert torch.all(((v - p) ** 2).sum(-1) <= ((v - q) ** 2).sum(-1) + 1e-6)


def test_config_validation():
    with pytest.raises(ValueError, match="attack_lr"):
        PrefixAttackConfig(attack_lr=0)
    with pytest.raises(ValueError, match="num_adv_tokens"):
        PrefixAttackConfig(num_adv_tokens=0)


@pytest.mark.parametrize("target", ["noise", "original"])
def test_prefix_attack_runs_on_tiny_sd_and_stops_at_success(target):
    from sage_dist.models.tiny import build_tiny_sd

    torch.set_flush_denormal(True)
    pipe = build_tiny_sd(0)
    erased = build_tiny_sd(1).text_encoder  # a different encoder stands in for the erased one
    unet_before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    te_before = {k: v.clone() for k, v in erased.state_dict().items()}
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    judged: list[AdversarialPrompt] = []

    def judge(adv: AdversarialPrompt):
        judged.append(adv)
        return len(judged) >= 2, {"n": len(judged)}  # "succeeds" at the second check

    cfg = PrefixAttackConfig(num_adv_tokens=3, attack_steps=3, num_timesteps=4, target=target)
    out = prefix_token_attack(unet=pipe.unet, text_encoder=erased, tokenizer=pipe.tokenizer,
                              noise_scheduler=pipe.scheduler, reference_latents=latents, prompt="a photo of a cat",
                              cfg=cfg, judge=judge, original_text_encoder=pipe.text_encoder)
    assert out.success and out.num_judged == 2 and len(out.losses) == 2
    assert all(torch.isfinite(torch.tensor(out.losses)))
    assert out.adversarial.prompt_embeds.shape == (1, 77, 32)
    assert out.adversarial.text.endswith(" a photo of a cat")
    # the attack never changes model weights, and the embedding hook is removed afterwards
    assert all(torch.equal(v, pipe.unet.state_dict()[k]) for k, v in unet_before.items())
    assert all(torch.equal(v, erased.state_dict()[k]) for k, v in te_before.items())
    ids = pipe.tokenizer("a cat", return_tensors="pt").input_ids
    assert torch.equal(erased(ids)[0], build_tiny_sd(1).text_encoder(ids)[0])
    # deterministic for a fixed seed
    judged.clear()
    again = prefix_token_attack(unet=pipe.unet, text_encoder=erased, tokenizer=pipe.tokenizer,
                                noise_scheduler=pipe.scheduler, reference_latents=latents,
                                prompt="a photo of a cat", cfg=cfg, judge=judge,
                                original_text_encoder=pipe.text_encoder)
    assert again.losses == out.losses and again.adversarial.text == out.adversarial.text


def test_prompts_attacked_in_lockstep_get_the_prompts_they_get_alone():
    """Two prompts' attack generators advanced alternately (how the red team judges them in one batch) yield, step
    for step, the same adversarial prompts as each generator run alone: each has its own random generator and
    optimiser, and the prefix hook is live only during its own forward."""
    from sage_dist.models.tiny import build_tiny_sd

    pipe = build_tiny_sd(0)
    erased = build_tiny_sd(1).text_encoder
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    prompts = ("a photo of a cat", "a drawing of a dog")

    def steps(j):
        cfg = PrefixAttackConfig(num_adv_tokens=2, attack_steps=2, num_timesteps=3, seed=10 + j)
        return prefix_attack_steps(unet=pipe.unet, text_encoder=erased, tokenizer=pipe.tokenizer,
                                   noise_scheduler=pipe.scheduler, reference_latents=latents[j:j + 1],
                                   prompt=prompts[j], cfg=cfg)

    alone = [[(adv.prompt_embeds, adv.text, losses) for adv, losses in steps(j)] for j in (0, 1)]
    a, b = steps(0), steps(1)
    interleaved = [[], []]
    for _ in range(3):
        for j, gen in ((0, a), (1, b)):
            adv, losses = next(gen)
            interleaved[j].append((adv.prompt_embeds, adv.text, losses))
    for j in (0, 1):
        assert len(alone[j]) == 3
        for (e1, t1, l1), (e2, t2, l2) in zip(alone[j], interleaved[j]):
            assert torch.equal(e1, e2) and t1 == t2 and l1 == l2


def test_external_attack_hook():
    adv = AdversarialPrompt(prompt_embeds=torch.zeros(1, 77, 32), text="x")
    out = run_external_attack(lambda record: adv, record=None, judge=lambda a: (True, "ok"))
    assert out.success and out.adversarial is adv and out.details == "ok"


def test_denoising_target_follows_the_prediction_type_as_diffusers_trains_it():
    """Hand check at a = 0.64 (sqrt 0.8 / 0.6) and diffusers' own ``get_velocity`` for a v-prediction model."""
    from diffusers import DDPMScheduler

    from sage_dist.eval.attacks import denoising_target, noisy_latents

    x0, noise = torch.full((1, 1, 1, 2), 2.0), torch.tensor([[[[1.0, -1.0]]]])
    assert torch.equal(denoising_target(x0, noise, 0.64, "epsilon"), noise)
    v = denoising_target(x0, noise, 0.64, "v_prediction")
    assert torch.allclose(v, torch.tensor([[[[0.8 - 1.2, -0.8 - 1.2]]]]))
    sched = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", rescale_betas_zero_snr=True)
    x0, noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.randn(2, 4, 8, 8)
    for t in (0, 500, 999):
        a = sched.alphas_cumprod[t]
        ts = torch.tensor([t, t])
        assert torch.allclose(denoising_target(x0, noise, a, "v_prediction"), sched.get_velocity(x0, noise, ts), atol=1e-6)
        assert torch.allclose(noisy_latents(x0, noise, a), sched.add_noise(x0, noise, ts), atol=1e-6)
    with pytest.raises(ValueError, match="prediction_type 'sample'"):
        denoising_target(x0, noise, 0.5, "sample")
