"""The engine on tiny random SD / SDXL: wiring, gradients, objectives, determinism, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sage_dist.attack.inside_out import inside_out_attack
from sage_dist.attack.prompt import build_attack_prompt
from sage_dist.models.text import TextConditioner, select_trainable_parameters
from sage_dist.models.tiny import build_tiny_sd, build_tiny_sdxl
from sage_dist.train.loop import run_erasure
from sage_dist.train.step import Eraser, erase_objective
from sage_dist.train.validate import validate_inputs
from tests.conftest import tiny_config

GOLDEN = Path(__file__).resolve().parents[1] / "assets" / "losses" / "tiny_sd_sage_float64.json"


@pytest.fixture(scope="module")
def tiny_sd():
    return build_tiny_sd(0)


def _eraser(cfg, pipe=None):
    from sage_dist.models.load import load_pipeline

    pipe = pipe or load_pipeline(cfg.model.model_id)
    return Eraser(cfg, pipe, validate_inputs(cfg))


def test_encoding_from_embeddings_equals_clip_forward(tiny_sd):
    tc = TextConditioner(tiny_sd)
    ids = tc.tokenize(["a photo of a cat", "a triangle"])
    cond = tc.condition(tc.embed_ids(ids), trained=False)
    ref = tiny_sd.text_encoder(ids[0])
    assert torch.allclose(cond.encoder_hidden_states, ref.last_hidden_state, atol=1e-6)
    # truncating at EOT is exact for positions before it (causal encoder)
    short = tc.condition(tc.embed_ids(ids), trained=False, length=7)
    assert torch.allclose(short.final[0][:, :7], cond.final[0][:, :7], atol=1e-6)
    assert torch.allclose(short.features[0], cond.features[0], atol=1e-6)


def test_sdxl_conditioning_matches_pipeline_encode_prompt():
    pipe = build_tiny_sdxl(0)
    tc = TextConditioner(pipe, train_encoders=(0, 1))
    cond = tc.condition(tc.embed(["a photo of a cat"]), trained=True)
    embeds, _, pooled, _ = pipe.encode_prompt(["a photo of a cat"], do_classifier_free_guidance=False)
    assert torch.allclose(cond.encoder_hidden_states, embeds, atol=1e-6)
    assert torch.allclose(cond.added_cond_kwargs["text_embeds"], pooled, atol=1e-6)


def test_trainable_selection_freezes_embeddings(tiny_sd):
    enc = build_tiny_sd(0).text_encoder
    params = select_trainable_parameters(enc, trainable="full")
    names = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert names and all(n.startswith(("encoder.layers", "final_layer_norm")) for n in names)
    assert not any("embedding" in n for n in names)
    assert len(params) == len(names)
    select_trainable_parameters(enc, trainable="attn", layers=(1,))
    names = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert names and all(n.startswith("encoder.layers.1.self_attn") for n in names)
    with pytest.raises(ValueError, match="has 4 blocks"):
        select_trainable_parameters(enc, layers=(7,))


def test_train_step_updates_only_the_trainable_encoder():
    cfg = tiny_config(**{"erase.warmup_steps": 0})
    eraser = _eraser(cfg)
    pipe_unet = eraser.sampler.unet
    before = {n: p.clone() for n, p in eraser.conditioner.trainable.named_parameters()}
    frozen_before = [p.clone() for p in eraser.conditioner.original[0].parameters()]
    eraser.train_step(0)
    assert all(p.grad is None for p in pipe_unet.parameters())
    assert all(p.grad is None for p in eraser.conditioner.original[0].parameters())
    changed = {n for n, p in eraser.conditioner.trainable.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".encoder.layers." in n or "final_layer_norm" in n for n in changed)
    assert all(torch.equal(a, b) for a, b in zip(frozen_before, eraser.conditioner.original[0].parameters()))


def test_attack_gradient_reaches_only_template_embeddings(tiny_sd):
    tc = TextConditioner(tiny_sd)
    prompt = build_attack_prompt(tc, "triangle", template="a photo of {} in the city")
    # learnable: "a photo of" (3) and "in the city" (3); the concept's token stays fixed
    assert prompt.learnable.tolist() == [1, 2, 3, 5, 6, 7] and prompt.eot_index == 8
    from sage_dist.config import AttackConfig

    with torch.no_grad():
        concept = tc.condition(tc.embed(["triangle"]), trained=False).features
    table_before = tc.token_embedding(0).weight.clone()
    result = inside_out_attack(tc, prompt, concept, AttackConfig(attack_steps=5, attack_lr=1e-2), max_norms=[1e9])
    assert all(p.grad is None for p in tc.trainable.parameters())
    assert all(p.grad is None for p in tiny_sd.unet.parameters())
    assert torch.equal(tc.token_embedding(0).weight, table_before)
    assert not torch.equal(result.prompt.tokens[0], prompt.tokens[0])
    assert result.losses[-1] < result.losses[0]
    # the concept position is untouched in the assembled prompt
    assembled = result.prompt.assemble(tc).embeds[0][0]
    assert torch.equal(assembled[4], tc.token_embedding(0)(prompt.ids[0][4:5])[0])


@pytest.mark.parametrize("method", ["sage", "esd", "advunlearn", "esd-x"])
def test_each_method_lowers_its_erase_objective_in_warmup(method):
    # tiny random UNets barely respond to text (‖e_c − e_∅‖² ~ 1e-4), so the trend needs ~16 steps to show
    cfg = tiny_config(**{"erase.method": method, "optim.num_steps": 16, "optim.lr": 1e-3, "erase.warmup_steps": 16})
    eraser = _eraser(cfg)
    before = erase_objective(eraser, "triangle", seed=123)
    for step in range(cfg.optim.num_steps):
        eraser.train_step(step)
    after = erase_objective(eraser, "triangle", seed=123)
    assert after < 0.8 * before, (method, before, after)


@pytest.mark.parametrize("method", ["sage", "advunlearn"])
def test_self_erasure_lowers_the_objective_on_the_attack_prompt(method):
    # one attack at step 1, then 14 training steps on that attack prompt (steps_per_cycle=15)
    cfg = tiny_config(**{"erase.method": method, "optim.num_steps": 16, "optim.lr": 1e-3, "erase.warmup_steps": 1,
                         "erase.steps_per_cycle": 15})
    eraser = _eraser(cfg)
    eraser.train_step(0)
    eraser.train_step(1)
    attack_prompt = eraser.concepts["triangle"].attack.assemble(eraser.conditioner).detach()
    before = erase_objective(eraser, "triangle", seed=7, prompt=attack_prompt)
    for step in range(2, cfg.optim.num_steps):
        eraser.train_step(step)
    assert len(eraser.concepts["triangle"].attack_log) == 1
    after = erase_objective(eraser, "triangle", seed=7, prompt=attack_prompt)
    assert after < 0.8 * before, (method, before, after)


GOLDEN_KEYS = ("loss", "erase_loss", "graph_loss", "retain_loss", "attack_loss_first", "attack_loss_last", "attack_H1",
               "attack_H2")
GOLDEN_RTOL, GOLDEN_ATOL = 1e-6, 1e-12
"""The traced run is float64 end to end. Its spread between CPU kernels, measured by running it under forced AVX2
kernels (``AVX2_KERNELS``), OpenMP with one thread and SSE-only MKL kernels on an AVX-512 machine, was at most
1.5e-7 relative (4e-12 among AVX2-class kernels); a one-line change to a loss moves it by 1e-4 or more
(``test_golden_trace_catches_a_one_line_change``)."""
AVX2_KERNELS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
"""Environment that makes PyTorch, MKL and oneDNN use their AVX2 kernels, as on an AVX2-only AMD EPYC."""


def golden_config():
    return tiny_config(**{"optim.num_steps": 10, "erase.warmup_steps": 4, "model.frozen_dtype": "float64",
                          "model.train_dtype": "float64"})


def golden_trace() -> list[dict[str, float]]:
    """Per-step scalars of the golden run (tiny SD, SAGE, 10 steps, warm-up 4, float64)."""
    result = run_erasure(golden_config(), progress=False)
    return [{k: h[k] for k in GOLDEN_KEYS if k in h} for h in result.history]


def trace_mismatches(trace: list[dict[str, float]]) -> list[str]:
    """``step key: got vs golden`` for every value outside the tolerance (empty: the trace matches)."""
    golden = json.loads(GOLDEN.read_text())["steps"]
    if len(golden) != len(trace):
        return [f"{len(trace)} steps, golden has {len(golden)}"]
    bad = []
    for step, (got, want) in enumerate(zip(trace, golden)):
        if set(got) != set(want):
            bad.append(f"step {step}: keys {sorted(got)} vs {sorted(want)}")
        for k in set(got) & set(want):
            if abs(got[k] - want[k]) > GOLDEN_ATOL + GOLDEN_RTOL * abs(want[k]):
                bad.append(f"step {step} {k}: {got[k]!r} vs {want[k]!r}")
    return bad


def write_golden() -> None:
    """Rewrite the golden file (only for an intended change of the numbers; say why in the commit):
    ``python -c "from tests.component.test_engine import write_golden; write_golden()"``."""
    GOLDEN.write_text(json.dumps({"config": "tests/component/test_engine.py golden_config", "steps": golden_trace()},
                                 indent=1))


def test_golden_trace_of_first_losses():
    assert GOLDEN.is_file(), f"{GOLDEN} is missing; see write_golden()"
    assert trace_mismatches(golden_trace()) == []


def test_golden_trace_holds_under_avx2_kernels():
    """The same trace with PyTorch, MKL and oneDNN forced to their AVX2 kernels (another CPU of this kind)."""
    import os
    import subprocess
    import sys

    code = ("import json; from tests.component.test_engine import golden_trace; "
            "print(json.dumps(golden_trace()))")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **AVX2_KERNELS}, check=True,
                         capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2], timeout=300)
    assert trace_mismatches(json.loads(out.stdout.strip().splitlines()[-1])) == []


@pytest.mark.parametrize("change", ["negative_guidance_1.001", "graph_loss_over_n_n_minus_1", "top_k_most_similar"])
def test_golden_trace_catches_a_one_line_change(change, monkeypatch):
    """The tolerance is far tighter than what a real change does: each of these one-line edits fails the trace."""
    import sage_dist.train.step as step
    from sage_dist.losses import erase as erase_mod
    from sage_dist.losses import retain as retain_mod

    if change == "negative_guidance_1.001":
        original = erase_mod.esd_target
        monkeypatch.setattr(erase_mod, "esd_target", lambda u, c, *, negative_guidance: original(
            u, c, negative_guidance=negative_guidance * 1.001))
    elif change == "graph_loss_over_n_n_minus_1":
        original = retain_mod.graph_loss
        monkeypatch.setattr(step, "graph_loss", lambda a, b, **kw: original(a, b, **kw) * a.shape[0] / (a.shape[0] - 1))
    else:
        original = retain_mod.select_top_k
        monkeypatch.setattr(step, "select_top_k", lambda scores, k: original(-scores, k))
    assert trace_mismatches(golden_trace()) != []


def test_same_seed_same_encoder_bit_for_bit(tmp_path):
    cfg = tiny_config()
    a = run_erasure(cfg, progress=False).text_encoders[0].state_dict()
    b = run_erasure(cfg, progress=False).text_encoders[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = run_erasure(tiny_config(**{"optim.seed": 1}), progress=False).text_encoders[0].state_dict()
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_resume_from_checkpoint_matches_uninterrupted_run(tmp_path):
    cfg = tiny_config(**{"optim.num_steps": 6, "erase.warmup_steps": 2, "scaling.checkpoint_every": 3,
                         "attack.reinit": "latest"})
    full = run_erasure(cfg, progress=False, checkpoint_dir=tmp_path / "ck")
    ckpt = tmp_path / "ck" / "step_000003"
    assert (ckpt / "trainable.safetensors").is_file() and not list(ckpt.glob("*.pt")) and not list(ckpt.glob("*.bin"))
    resumed = run_erasure(cfg, progress=False, resume_from=ckpt)
    a, b = full.text_encoders[0].state_dict(), resumed.text_encoders[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    # the found prompts kept for the semantic-drift measurement survive the checkpoint
    kept, again = full.eraser.concepts["triangle"].found, resumed.eraser.concepts["triangle"].found
    assert len(kept) == 4 and len(again) == len(kept)  # one per attack after the warm-up (stride 1)
    assert all(torch.equal(x.tokens[0], y.tokens[0]) and x.template == y.template for x, y in zip(kept, again))
    with pytest.raises(ValueError, match="different configuration"):
        run_erasure(tiny_config(**{"optim.num_steps": 6, "erase.warmup_steps": 2, "retain.top_k": 1}),
                    progress=False, resume_from=ckpt)


def test_stop_request_checkpoints_the_completed_steps_and_resume_matches(tmp_path):
    from sage_dist.train.loop import TrainingInterrupted

    cfg = tiny_config(**{"optim.num_steps": 6, "erase.warmup_steps": 2, "attack.reinit": "latest"})
    full = run_erasure(cfg, progress=False)
    steps = []
    with pytest.raises(TrainingInterrupted) as stopped:
        run_erasure(cfg, progress=False, checkpoint_dir=tmp_path / "ck", on_step=lambda s, m: steps.append(s),
                    stop_requested=lambda: len(steps) >= 4)
    assert stopped.value.step == 4 and stopped.value.checkpoint == tmp_path / "ck" / "step_000004"
    resumed = run_erasure(cfg, progress=False, resume_from=stopped.value.checkpoint)
    a, b = full.text_encoders[0].state_dict(), resumed.text_encoders[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(TrainingInterrupted) as before_start:  # a request while loading: nothing to save
        run_erasure(cfg, progress=False, checkpoint_dir=tmp_path / "ck2", stop_requested=lambda: True)
    assert before_start.value.step == 0 and before_start.value.checkpoint is None
    steps.clear()  # a request during the last step lets the run finish and save
    done = run_erasure(cfg, progress=False, out_dir=tmp_path / "out", on_step=lambda s, m: steps.append(s),
                       stop_requested=lambda: len(steps) >= 6)
    assert len(done.history) == 6 and (tmp_path / "out" / "record.json").is_file()


def test_time_based_checkpoints_keep_only_the_latest_of_this_run(tmp_path):
    stale = tmp_path / "ck" / "step_000900"  # an abandoned run's checkpoint with a higher step number
    stale.mkdir(parents=True)
    (stale / "state.json").write_text("{}")
    seen = []
    run_erasure(tiny_config(), progress=False, checkpoint_dir=tmp_path / "ck", checkpoint_interval_s=0.0,
                keep_checkpoints=1, on_checkpoint=lambda done, folder: seen.append(done))
    assert seen == [1, 2, 3]  # after every step but the last (the outputs follow it)
    assert [p.name for p in (tmp_path / "ck").iterdir()] == ["step_000003"]


def test_unwritable_out_dir_fails_before_model_work(tmp_path, monkeypatch):
    import sage_dist.train.loop as loop

    monkeypatch.setattr(loop, "load_pipeline", lambda *a, **k: pytest.fail("a model was loaded"))
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="output folder .*file/out: cannot create or write this folder"):
        run_erasure(tiny_config(), out_dir=tmp_path / "file" / "out")
    with pytest.raises(ValueError, match="checkpoint folder .* is a file, not a folder"):
        run_erasure(tiny_config(**{"scaling.checkpoint_every": 2}), checkpoint_dir=tmp_path / "file")


def test_outputs_load_with_from_pretrained_and_swap_into_pipeline(tmp_path):
    from transformers import CLIPTextModel

    from sage_dist.models.load import (
        edited_pipeline,
        load_text_encoders,
        original_encoders,
    )

    result = run_erasure(tiny_config(), out_dir=tmp_path / "out", progress=False)
    enc = CLIPTextModel.from_pretrained(tmp_path / "out" / "text_encoder")
    ref = result.text_encoders[0].state_dict()
    assert all(torch.equal(ref[k], v) for k, v in enc.state_dict().items())
    record = json.loads((tmp_path / "out" / "record.json").read_text())
    assert record["seed"] == 0 and len(record["history"]) == 4 and record["wall_time_s"] > 0
    assert record["retain_prompts"] == result.retain_prompts and len(set(record["retain_prompts"])) >= 4
    assert record["versions"]["torch"] and record["config"]["erase.method"] == "sage"
    pipe = build_tiny_sd(0)
    edited = edited_pipeline(pipe, load_text_encoders(tmp_path / "out", original_encoders(pipe)))
    image = edited("a triangle", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 64, 64, 3)


@pytest.mark.parametrize("encoders", [(0,), (1,), (0, 1)])
def test_sdxl_trains_either_or_both_encoders(encoders):
    cfg = tiny_config(**{"model.model_id": "tiny-sdxl", "model.train_encoders": encoders, "optim.num_steps": 3,
                         "erase.warmup_steps": 1})
    result = run_erasure(cfg, progress=False)
    assert set(result.text_encoders) == set(encoders)
    pipe = build_tiny_sdxl(0)
    originals = [pipe.text_encoder, pipe.text_encoder_2]
    for e, enc in result.text_encoders.items():
        sd_new, sd_old = enc.state_dict(), originals[e].state_dict()
        assert any(not torch.equal(sd_new[k], sd_old[k]) for k in sd_old)


def test_multi_concept_each_with_its_own_attack():
    cfg = tiny_config(**{"erase.erase_concept": "cat,dog", "optim.num_steps": 6, "erase.warmup_steps": 2})
    result = run_erasure(cfg, progress=False)
    assert len(result.attack_log["cat"]) == 2 and len(result.attack_log["dog"]) == 2
    summed = run_erasure(tiny_config(**{"erase.erase_concept": "cat,dog", "erase.multi_concept": "sum",
                                        "optim.num_steps": 3, "erase.warmup_steps": 1}), progress=False)
    assert len(summed.attack_log["cat"]) == 2 and len(summed.attack_log["dog"]) == 2


def test_bad_input_fails_before_model_work(tmp_path, monkeypatch):
    import sage_dist.train.loop as loop

    def boom(*args, **kwargs):  # loading a model would be "model work"
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(loop, "load_pipeline", boom)
    with pytest.raises(ValueError, match="no such folder"):
        run_erasure(tiny_config(**{"model.model_id": str(tmp_path / "missing")}))
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    with pytest.raises(ValueError, match="no text_encoder/"):
        run_erasure(tiny_config(**{"model.model_id": str(tmp_path / "pipe")}))
    with pytest.raises(ValueError, match="fewer than retain.retain_batch_size=64"):
        run_erasure(tiny_config(**{"retain.retain_batch_size": 64, "retain.retain_prompts": str(_small_retain(tmp_path))}))
    with pytest.raises(ValueError, match="unknown concept of the bundled world"):
        run_erasure(tiny_config(**{"model.model_id": "world", "erase.erase_concept": "nudity"}))
    with pytest.raises(ValueError, match="is 70 tokens long"):
        run_erasure(tiny_config(**{"erase.erase_concept": "word " * 70}))


def _small_retain(tmp_path):
    path = tmp_path / "retain.txt"
    path.write_text("\n".join(f"a photo of object number {i}" for i in range(10)))
    return path


def test_long_retain_prompts_warn_once(tmp_path):
    path = tmp_path / "long.txt"
    path.write_text("\n".join([f"a photo of a chair {i}" for i in range(3)] + ["word " * 100, "thing " * 90]))
    with pytest.warns(UserWarning, match="2 retain prompts exceed 77 CLIP tokens"):
        validate_inputs(tiny_config(**{"retain.retain_prompts": str(path), "retain.retain_batch_size": 4}))


def test_esd_x_runs_in_a_one_worker_ray_train_group_and_refuses_several():
    """Under Ray Train the worker always passes prepare_model; ESD-x (a UNet edit) must still run with one worker
    and refuse data parallelism with a clear error."""
    wrapped = []
    cfg = tiny_config(**{"erase.method": "esd-x", "optim.num_steps": 1, "erase.warmup_steps": 0})
    result = run_erasure(cfg, progress=False, wrap_trainable=lambda m: wrapped.append(m) or m)
    assert result.unet is not None and wrapped == []
    with pytest.raises(ValueError, match="scaling.num_workers=1"):
        run_erasure(cfg, progress=False, world_size=2, wrap_trainable=lambda m: m)


def test_esd_x_trains_only_unet_cross_attention(tmp_path):
    from diffusers import UNet2DConditionModel

    cfg = tiny_config(**{"erase.method": "esd-x", "optim.num_steps": 3, "erase.warmup_steps": 0})
    result = run_erasure(cfg, out_dir=tmp_path / "out", progress=False)
    assert result.text_encoders == {}
    original = build_tiny_sd(0).unet.state_dict()
    edited = result.unet.state_dict()
    changed = {k for k in original if not torch.equal(original[k], edited[k])}
    assert changed and all("attn2" in k for k in changed)
    saved = UNet2DConditionModel.from_pretrained(tmp_path / "out" / "unet")
    assert all(torch.equal(v, edited[k]) for k, v in saved.state_dict().items())


def test_interference_between_concepts_is_logged():
    cfg = tiny_config(**{"erase.erase_concept": "cat,dog,car", "erase.multi_concept": "sum",
                         "erase.log_interference": True, "optim.num_steps": 2, "erase.warmup_steps": 2})
    result = run_erasure(cfg, progress=False)
    values = [h["interference_cos"] for h in result.history]
    assert len(values) == 2 and all(-1.0 <= v <= 1.0 for v in values)


def test_loaded_pipelines_use_sdpa_attention(tiny_sd):
    """SDPA attention in the UNet (diffusers AttnProcessor2_0) and the text encoder."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    assert all(isinstance(p, AttnProcessor2_0) for p in tiny_sd.unet.attn_processors.values())
    assert tiny_sd.text_encoder.config._attn_implementation == "sdpa"
