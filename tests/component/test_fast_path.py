"""Every saving of the fast path is exact for the same seeds, or a documented approximation."""

from __future__ import annotations

import torch

from sage_dist.attack.inside_out import _objective
from sage_dist.attack.prompt import build_attack_prompt
from sage_dist.config import AttackConfig
from sage_dist.models.sampler import DiffusionSampler, TrajectoryBank
from sage_dist.models.text import TextConditioner
from sage_dist.models.tiny import build_tiny_sd
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
    fast, _, _ = _objective(tc, prompt, concept, cfg)
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


def _one_step_grads(model_id: str, chunk: int, method: str = "sage", checkpointing: str = "off",
                    concepts: tuple[str, ...] = ("triangle",)) -> tuple[dict[str, float], list[torch.Tensor]]:
    cfg = tiny_config(**{"model.model_id": model_id, "erase.method": method, "erase.warmup_steps": 0,
                         "retain.top_k": 3, "model.student_chunk_size": chunk,
                         "model.gradient_checkpointing": checkpointing, "erase.erase_concept": concepts,
                         "erase.multi_concept": "sum", "erase.log_interference": len(concepts) > 1})
    eraser = _eraser(cfg)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # move τ_n off τ_o, so the retain rows have a loss and a gradient too
        for p in eraser.trainable_parameters:
            p.add_(0.05 * p.detach().abs().mean() * torch.randn(p.shape, generator=gen))
    out = eraser.train_step(0)
    assert method != "sage" or out["retain_loss"] > 0
    return out, [p.grad.clone() for p in eraser.trainable_parameters if p.grad is not None]


def test_chunked_student_pass_gives_the_same_losses_and_gradients():
    """``model.student_chunk_size`` (one UNet backward per chunk of rows, one encoder backward) and
    ``model.gradient_checkpointing`` change only memory: losses and gradients equal the one-pass step for the same seeds (SD: 1 erase + 3 retain rows in
    chunks of 1 and 3; the SDXL twin path with added_cond_kwargs; ESD-x, whose gradient goes into the UNet)."""
    for model_id, method, concepts, chunks in (
            ("tiny-sd", "sage", ("triangle",), (1, 3)), ("tiny-sdxl", "sage", ("triangle",), (2,)),
            ("tiny-sd", "sage", ("triangle", "cat"), (2,)), ("tiny-sd", "esd-x", ("triangle", "cat"), (1,))):
        ref_out, ref_grads = _one_step_grads(model_id, 0, method, concepts=concepts)
        assert ref_grads, (model_id, method)
        for chunk, checkpointing in [(c, "off") for c in chunks] + [(0, "on"), (2, "on")]:
            out, grads = _one_step_grads(model_id, chunk, method, checkpointing, concepts)
            keys = ["loss", "erase_loss", "graph_loss", "retain_loss"] + (["interference_cos"] if len(concepts) > 1 else [])
            for key in keys:
                assert abs(out[key] - ref_out[key]) <= 1e-5 * max(1.0, abs(ref_out[key])), (model_id, chunk, key)
            assert len(grads) == len(ref_grads)
            for g, g_ref in zip(grads, ref_grads):
                assert torch.allclose(g, g_ref, rtol=1e-4, atol=1e-7), (model_id, method, chunk)


def test_graph_rows_encoded_only_up_to_eot_give_the_same_losses_and_gradients(monkeypatch):
    """The retain rows that only feed L_graph and the Top-k drift are encoded up to their last EOT (exact: CLIP
    is causal and g(·) reads the EOT state); the straightforward path encodes all 77 positions."""
    from sage_dist.models.text import MAX_LENGTH
    from sage_dist.train.step import Eraser

    lengths: list[int] = []
    original = Eraser._graph_length

    def recording(batch):
        lengths.append(original(batch))
        return lengths[-1]

    for model_id in ("tiny-sd", "tiny-sdxl"):
        lengths.clear()
        monkeypatch.setattr(Eraser, "_graph_length", staticmethod(recording))
        fast_out, fast_grads = _one_step_grads(model_id, 0)
        assert lengths and max(lengths) < MAX_LENGTH // 2, lengths  # the saving is real
        monkeypatch.setattr(Eraser, "_graph_length", staticmethod(lambda batch: MAX_LENGTH))
        ref_out, ref_grads = _one_step_grads(model_id, 0)
        assert ref_out["graph_loss"] > 0
        for key in ("loss", "erase_loss", "graph_loss", "retain_loss", "retain_drift_mean"):
            assert abs(fast_out[key] - ref_out[key]) <= 1e-5 * max(1.0, abs(ref_out[key])), (model_id, key)
        assert len(fast_grads) == len(ref_grads)
        for g, g_ref in zip(fast_grads, ref_grads):
            assert torch.allclose(g, g_ref, rtol=1e-4, atol=1e-7), model_id


def _student_rows_per_step(**overrides) -> tuple[list[int], dict[str, float]]:
    cfg = tiny_config(**{"erase.warmup_steps": 0, "retain.top_k": 3, **overrides})
    eraser = _eraser(cfg)
    rows: list[int] = []
    eps = eraser.student.eps

    def recording(latents, timestep, cond):
        if torch.is_grad_enabled() and cond.encoder_hidden_states.requires_grad:
            rows.append(latents.shape[0])
        return eps(latents, timestep, cond)

    eraser.student.eps = recording
    return rows, eraser.train_step(0)


def test_retain_loss_rows_subsamples_the_top_k_and_equals_the_exact_step_when_m_is_k():
    import pytest

    rows, _ = _student_rows_per_step()
    assert sum(rows) == 1 + 3
    rows, _ = _student_rows_per_step(**{"retain.retain_loss_rows": 1})
    assert sum(rows) == 1 + 1
    _, exact = _student_rows_per_step()
    _, same = _student_rows_per_step(**{"retain.retain_loss_rows": 3})
    assert same == exact  # m = k draws nothing and changes nothing
    with pytest.raises(ValueError, match="retain_loss_rows"):
        tiny_config(**{"retain.top_k": 3, "retain.retain_loss_rows": 4})


def test_retain_loss_rows_draw_each_top_k_row_with_probability_m_over_k():
    """The m-row mean is an unbiased estimate of the k-row L_image iff every selected row is kept with
    probability m / k: the step's draw, 600 times (k = 3, m = 1)."""
    from sage_dist.train import step as step_module

    counts = torch.zeros(3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(600):
        kept = step_module.subsample_top_k(torch.arange(3), 1, gen)
        counts[kept] += 1
    assert torch.allclose(counts / 600, torch.full((3,), 1 / 3), atol=0.06), counts


def test_two_group_encoder_pass_equals_the_single_77_position_pass():
    """Against the straightforward step structure: one τ_n pass over [erase; all retain prompts] at 77 positions,
    the graph loss and the drift from its retain rows, the UNet rows selected from it. The step takes the drift
    from a no-grad pass up to EOT and encodes [erase; selected] at 77 and the retain rows up to EOT in one call.
    Same drift, same loss, same gradients (tiny SD and the SDXL twin with both encoders trained, so the pooled
    ``text_embeds`` of encoder 2 is covered; mean pooling too)."""
    from sage_dist.losses import graph_loss
    from sage_dist.models.text import MAX_LENGTH, PromptBatch
    from sage_dist.models.tiny import build_tiny_sdxl

    for build, encoders, pooling in ((build_tiny_sd, (0,), "eot"), (build_tiny_sdxl, (0, 1), "eot"),
                                     (build_tiny_sd, (0,), "mean")):
        tc = TextConditioner(build(0), train_encoders=encoders, pooling=pooling)
        gen = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for p in tc.trainable_parameters:
                p.add_(0.05 * p.abs().mean() * torch.randn(p.shape, generator=gen))
        x = tc.embed(["a photo of a triangle in the city"])
        shard = ["a red circle", "a photo of banana on a table", "a blue striped square", "chair"]
        retain = tc.embed(shard)
        with torch.no_grad():
            cond_o = tc.condition(retain, trained=False)
        selected = torch.tensor([2, 0])
        weights = None

        def total(graph_feats, unet_cond):
            nonlocal weights
            if weights is None:
                weights = torch.randn(unet_cond.encoder_hidden_states.shape, generator=gen)
            loss = sum(graph_loss(graph_feats[e], cond_o.features[e], kind="mse") for e in encoders)
            loss = loss + (unet_cond.encoder_hidden_states * weights).sum()
            if unet_cond.added_cond_kwargs is not None:
                loss = loss + unet_cond.added_cond_kwargs["text_embeds"].square().sum()
            return loss

        old = tc.condition(PromptBatch.cat([x, retain]), trained=True)
        rows = torch.arange(1, 1 + len(shard))
        old_drift = torch.stack([(old.features[e][rows] * cond_o.features[e]).sum(-1) for e in encoders]).mean(0)
        old_loss = total([f[rows] for f in old.features], old.select(torch.cat([torch.tensor([0]), 1 + selected])))
        old_grads = torch.autograd.grad(old_loss, tc.trainable_parameters)

        length = int(retain.eot_index.max()) + 1
        assert length < MAX_LENGTH // 4
        with torch.no_grad():
            feats = tc.condition(retain, trained=True, length=length, through_wrapper=False).features
        new_drift = torch.stack([(feats[e] * cond_o.features[e]).sum(-1) for e in encoders]).mean(0)
        unet_cond, graph_cond = tc.condition_groups([(PromptBatch.cat([x, retain.select(selected)]), MAX_LENGTH),
                                                     (retain, length)], trained=True)
        new_loss = total(graph_cond.features, unet_cond)
        new_grads = torch.autograd.grad(new_loss, tc.trainable_parameters)

        assert torch.allclose(new_drift, old_drift, atol=1e-6)
        assert torch.allclose(new_loss, old_loss, rtol=1e-6), (float(new_loss), float(old_loss))
        scale = max(float(g.abs().max()) for g in old_grads)  # float32 summation order differs: compare at its scale
        worst = max(float((g_new - g_old).abs().max()) for g_new, g_old in zip(new_grads, old_grads))
        assert worst <= 2e-6 * scale, (worst, scale)


def test_the_frozen_unet_gets_no_weight_gradients_even_from_a_pipeline_built_in_code():
    """models.tiny builds pipelines whose parameters require grad (diffusers' default); the student backward must
    still only reach the conditioning, not compute (and keep) gradients for every UNet weight."""
    pipe = build_tiny_sd(0)
    assert all(p.requires_grad for p in pipe.unet.parameters())
    from sage_dist.train.step import Eraser

    eraser = Eraser(tiny_config(**{"erase.warmup_steps": 0}), pipe, [f"a photo of thing {i}" for i in range(40)])
    eraser.train_step(0)
    assert not any(p.requires_grad or p.grad is not None for p in pipe.unet.parameters())
    assert any(p.grad is not None for p in eraser.trainable_parameters)


def test_gradient_checkpointing_follows_each_runs_config_on_a_reused_pipeline():
    """Runs in one process share cached pipelines: "on" in one run must not leak into the next run's "off"."""
    pipe = build_tiny_sd(0)
    from sage_dist.train.step import Eraser

    retain = [f"a photo of thing {i}" for i in range(40)]
    Eraser(tiny_config(**{"model.gradient_checkpointing": "on"}), pipe, retain)
    assert pipe.unet.is_gradient_checkpointing
    Eraser(tiny_config(**{"model.gradient_checkpointing": "off"}), pipe, retain)
    assert not pipe.unet.is_gradient_checkpointing
    Eraser(tiny_config(**{"model.gradient_checkpointing": "auto"}), pipe, retain)  # tiny UNet: auto = off
    assert not pipe.unet.is_gradient_checkpointing


def test_ddp_options_let_sdxl_steps_without_the_graph_loss_train_under_ddp():
    """ESD on SDXL's first encoder leaves its last block unused (the UNet reads the penultimate states); plain DDP
    then fails at the second step's forward. A one-process gloo group runs the same reducer as a Ray Train
    worker group; SD keeps DDP's defaults."""
    import socket

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from sage_dist.models.tiny import build_tiny_sdxl
    from sage_dist.train.ray_worker import ddp_options
    from sage_dist.train.step import Eraser

    assert ddp_options(tiny_config(), build_tiny_sd(0)) == {}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        cfg = tiny_config(**{"model.model_id": "tiny-sdxl", "erase.method": "esd", "erase.warmup_steps": 0})
        pipe = build_tiny_sdxl(0)
        eraser = Eraser(cfg, pipe, [f"a photo of thing {i}" for i in range(40)])
        eraser.conditioner.wrap_trainable(lambda m: DistributedDataParallel(m, **ddp_options(cfg, pipe)))
        losses = [eraser.train_step(step)["loss"] for step in range(2)]
    finally:
        dist.destroy_process_group()
    assert all(torch.isfinite(torch.tensor(losses)))
