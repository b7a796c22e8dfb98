"""Bad input found before any model loads: partial model folders, retain sets (erased concepts by synonym,
repeated prompts), the retain sampler's distinct batches, and long prompts logged by id only."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from sage_dist.models.registry import check_model_source
from sage_dist.prompts import TRUNCATION_FILTER, install_truncation_filter, load_prompts
from sage_dist.retention.prompts import build_retain_set, concept_phrases
from sage_dist.retention.sampler import RetainSampler
from sage_dist.train.validate import validate_inputs, warn_long_prompts
from sage_dist.world.concepts import CONCEPTS, concept_domain, retain_prompts
from tests.conftest import tiny_config


# ---- partial pipeline folders --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_tiny_sd(tmp_path_factory):
    from sage_dist.models.tiny import build_tiny_sd

    folder = tmp_path_factory.mktemp("tiny_sd") / "pipe"
    build_tiny_sd(0).save_pretrained(folder)
    return folder


@pytest.fixture
def pipe_copy(saved_tiny_sd, tmp_path):
    return shutil.copytree(saved_tiny_sd, tmp_path / "pipe")


def test_a_complete_folder_passes(saved_tiny_sd):
    check_model_source(str(saved_tiny_sd))


@pytest.mark.parametrize("damage, message", [
    (lambda p: (p / "unet" / "diffusion_pytorch_model.safetensors").unlink(),
     r"unet/ \(UNet2DConditionModel\): no weights file \(diffusion_pytorch_model.safetensors"),
    (lambda p: (p / "text_encoder" / "model.safetensors").unlink(),
     r"text_encoder/ \(CLIPTextModel\): no weights file .*model.safetensors / pytorch_model.bin"),
    (lambda p: (p / "vae" / "config.json").unlink(), r"vae/ \(AutoencoderKL\): no config.json"),
    (lambda p: (p / "scheduler" / "scheduler_config.json").unlink(), r"scheduler/ \(\w+Scheduler\): no scheduler_config"),
    (lambda p: [f.unlink() for f in (p / "tokenizer").iterdir()], r"tokenizer/ \(CLIPTokenizer\): no tokenizer files"),
    (lambda p: (p / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b""), r"is empty \(0 bytes"),
    (lambda p: (p / "text_encoder" / "model.safetensors").write_bytes(
        b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n"), r"Git LFS pointer.*git lfs pull"),
    (lambda p: shutil.rmtree(p / "vae"), r"model_index.json names \['vae'\] but those folders are missing"),
    (lambda p: (p / "model_index.json").write_text("[1, 2]"), "is not a JSON object of components"),
])
def test_partial_folders_are_named_before_loading(pipe_copy, damage, message):
    damage(pipe_copy)
    with pytest.raises(ValueError, match=message):
        check_model_source(str(pipe_copy))


def test_sharded_and_variant_weights_count_as_weights(pipe_copy):
    unet = pipe_copy / "unet"
    (unet / "diffusion_pytorch_model.safetensors").rename(unet / "diffusion_pytorch_model.fp16.safetensors")
    enc = pipe_copy / "text_encoder"
    (enc / "model.safetensors").rename(enc / "model-00001-of-00001.safetensors")
    (enc / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {}}))
    check_model_source(str(pipe_copy))


# ---- retain sets ---------------------------------------------------------------------------------------
def _retain_file(tmp_path, prompts):
    path = tmp_path / "retain.txt"
    path.write_text("\n".join(prompts) + "\n")
    return str(path)


def test_synonyms_of_nudity_are_removed_on_real_models(tmp_path, caplog):
    prompts = ["a naked man", "a photo of chair", "A NUDE painting", "two nudes on a beach", "a topless dancer",
               "a photo of denuded hills", "a photo of a nudibranch", "a man without clothes", "a photo of lamp"]
    with caplog.at_level(logging.INFO, logger="sage_dist.retention.prompts"):
        rs = build_retain_set(_retain_file(tmp_path, prompts), model_id="tiny-sd", erase_concepts=("nudity",))
    assert rs.prompts == ("a photo of chair", "a photo of denuded hills", "a photo of a nudibranch", "a photo of lamp")
    assert [i for i, _ in rs.removed_for_concept] == ["0", "2", "3", "4", "7"]
    assert "5 prompt(s) name an erased concept" in caplog.text and "ids 0, 2, 3, 4, 7" in caplog.text
    assert "naked" not in caplog.text  # prompt text only at debug level
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="sage_dist.retention.prompts"):
        build_retain_set(_retain_file(tmp_path, prompts), model_id="tiny-sd", erase_concepts=("nudity",))
    assert "a naked man" in caplog.text


@pytest.mark.parametrize("concept,removed,kept", [
    ("Van Gogh", ["a painting by Vincent van Gogh", "starry night, vangogh style", "in the style of Van-Gogh's"],
     ["a photo of a gogglebox"]),
    ("Vincent van Gogh", ["a Van Gogh sunflower"], ["a photo of chair"]),
    ("church", ["a photo of churches", "a gothic cathedral", "a small chapel"], ["a photo of a churchill statue"]),
    ("garbage truck", ["a garbage-truck at dawn", "a photo of trash trucks"], ["a photo of garbage", "a photo of truck"]),
    ("cat", ["a photo of cat", "two Cats", "a cat's toy"], ["a photo of cattle", "a photo of a catamaran", "a bobcat"]),
])
def test_concept_matching_is_word_boundary_aware(tmp_path, concept, removed, kept):
    rs = build_retain_set(_retain_file(tmp_path, removed + kept), model_id="CompVis/stable-diffusion-v1-4",
                          erase_concepts=(concept,))
    assert rs.prompts == tuple(kept)
    assert len(rs.removed_for_concept) == len(removed)


def test_world_uses_the_whole_concept_domain(tmp_path):
    domain = concept_domain("triangle")
    assert concept_phrases("triangle", model_id="world") == domain.all_phrases
    prompts = ["a red solid trigon", "a blue striped three-sided shape", "a green solid three cornered figure",
               "a red solid circle", "a red solid triangle"]
    rs = build_retain_set(_retain_file(tmp_path, prompts), model_id="world", erase_concepts=("triangle",))
    assert rs.prompts == ("a red solid circle",)
    # the world's own retain captions are unchanged for every concept
    for c in CONCEPTS:
        assert list(build_retain_set("auto", model_id="world", erase_concepts=(c,)).prompts) == retain_prompts(c)


def test_repeated_retain_prompts_are_removed_with_one_warning(tmp_path, caplog):
    prompts = ["a photo of chair", "a photo of lamp", "a photo of chair", "a photo of desk", "a photo of lamp",
               "a photo of chair"]
    with caplog.at_level(logging.WARNING, logger="sage_dist.retention.prompts"):
        rs = build_retain_set(_retain_file(tmp_path, prompts), model_id="tiny-sd", erase_concepts=("cat",))
    assert rs.prompts == ("a photo of chair", "a photo of lamp", "a photo of desk")
    assert rs.removed_duplicates == ("2", "4", "5") and rs.ids == ("0", "1", "3")
    warnings = [r for r in caplog.records if "repeated prompt(s) removed" in r.getMessage()]
    assert len(warnings) == 1 and "3 repeated prompt(s)" in warnings[0].getMessage()
    coco = build_retain_set("coco_object", model_id="tiny-sd", erase_concepts=("triangle",))
    assert len(coco.prompts) == 237 and len(set(coco.prompts)) == 237 and len(coco.removed_duplicates) == 6


def test_validate_counts_distinct_prompts(tmp_path):
    path = _retain_file(tmp_path, ["a photo of chair"] * 3 + ["a photo of lamp", "a naked man"])
    with pytest.raises(ValueError, match=r"has 2 usable distinct prompts \(of 5: 1 name an erased concept, 2 repeat "
                                         r"another\), fewer than retain.retain_batch_size=4"):
        validate_inputs(tiny_config(**{"retain.retain_prompts": path, "erase.erase_concept": "nudity"}))


def test_bad_template_library_is_found_before_the_model(tmp_path):
    with pytest.raises(ValueError, match="attack template library .*no such file"):
        validate_inputs(tiny_config(**{"attack.template_library": str(tmp_path / "none.txt")}))


# ---- the retain sampler ------------------------------------------------------------------------------
def _reference_draws(n: int, batch_size: int, seed: int, num_batches: int) -> list[list[int]]:
    """The sampler's draws as documented: batches along a permutation, a fresh one when it runs short."""
    g = torch.Generator().manual_seed(seed)
    order, position, out = torch.randperm(n, generator=g), 0, []
    for _ in range(num_batches):
        if position + batch_size > n:
            order, position = torch.randperm(n, generator=g), 0
        out.append(order[position:position + batch_size].tolist())
        position += batch_size
    return out


def test_sampler_draws_are_unchanged_for_a_set_without_repeats():
    prompts = [f"p{i}" for i in range(23)]
    sampler = RetainSampler(prompts, 5, torch.Generator().manual_seed(3))
    got = [sampler.next_batch() for _ in range(40)]
    assert got == [[prompts[i] for i in b] for b in _reference_draws(23, 5, 3, 40)]


@pytest.mark.parametrize("n_distinct,batch_size", [(10, 4), (7, 3), (8, 8), (9, 2)])
def test_sampler_batches_are_distinct_over_many_passes(n_distinct, batch_size):
    prompts = [f"p{i}" for i in range(n_distinct)]
    with_repeats = prompts + prompts[:3] + prompts[::2]  # repeated prompts must not share a batch or weigh more
    sampler = RetainSampler(with_repeats, batch_size, torch.Generator().manual_seed(0))
    per_pass = n_distinct // batch_size
    counts = dict.fromkeys(prompts, 0)
    for _ in range(300):
        seen_in_pass: set[str] = set()
        for _ in range(per_pass):
            batch = sampler.next_batch()
            assert len(batch) == batch_size and len(set(batch)) == batch_size
            assert not seen_in_pass & set(batch)
            seen_in_pass |= set(batch)
            for p in batch:
                counts[p] += 1
    expected = 300 * per_pass * batch_size / n_distinct
    assert all(abs(c - expected) < 0.2 * expected + 5 for c in counts.values()), counts


def test_sampler_state_must_match_the_retain_set():
    a = RetainSampler([f"p{i}" for i in range(10)], 4, torch.Generator().manual_seed(0))
    a.next_batch()
    b = RetainSampler([f"p{i}" for i in range(10)], 4, torch.Generator().manual_seed(1))
    b.load_state(a.state())
    assert b.next_batch() == a.next_batch()
    c = RetainSampler([f"p{i}" for i in range(9)], 4, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="state is for a set of 10 prompts, but this run's retain set has 9"):
        c.load_state(a.state())
    with pytest.raises(ValueError, match="3 distinct prompts, fewer than retain.retain_batch_size=4"):
        RetainSampler(["a", "b", "c", "a"], 4, torch.Generator().manual_seed(0))


# ---- long prompts: one summary by id; diffusers' per-prompt message (with prompt text) filtered out ----------
def test_long_prompts_give_one_summary_and_no_diffusers_text(tmp_path, caplog):
    from sage_dist.models.tiny import build_tiny_sd

    long_prompts = [f"castle number {i} " + "tower " * 90 for i in range(3)]
    path = tmp_path / "long.txt"
    path.write_text("a short prompt\n" + "\n".join(long_prompts) + "\n")
    with caplog.at_level(logging.INFO, logger="sage_dist.prompts"):
        ps = load_prompts(path)
    summaries = [r for r in caplog.records if "exceed CLIP's 77 tokens" in r.getMessage()]
    assert len(summaries) == 1 and "3 prompt(s)" in summaries[0].getMessage()
    assert "(ids 1, 2, 3)" in summaries[0].getMessage() and "tower" not in caplog.text

    pipe = build_tiny_sd(0)
    logger = logging.getLogger(type(pipe).__module__)
    seen: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = seen.append
    logger.addHandler(handler)
    try:
        install_truncation_filter()  # idempotent
        assert logger.filters.count(TRUNCATION_FILTER) == 1
        before = TRUNCATION_FILTER.num_dropped
        for record in ps.records:  # as evaluation does: one pipeline call per prompt
            pipe.encode_prompt([record.prompt], device="cpu", num_images_per_prompt=1,
                               do_classifier_free_guidance=False)
        logger.warning("another diffusers warning")
    finally:
        logger.removeHandler(handler)
    assert TRUNCATION_FILTER.num_dropped - before == 3
    assert [r.getMessage() for r in seen] == ["another diffusers warning"]


def test_long_retain_prompts_warning_names_an_id_not_the_text():
    prompts = ["a photo of chair", "tower " * 90, "a photo of lamp", "wall " * 90]
    with pytest.warns(UserWarning, match=r"2 retain prompts exceed 77 CLIP tokens and will be truncated \(first: id 1\)$"):
        assert warn_long_prompts(prompts, "retain prompts") == 2
    with pytest.warns(UserWarning, match=r"\(first: id r7\)"):
        warn_long_prompts(prompts, "retain prompts", ids=["r0", "r7", "r8", "r9"])


def test_world_erasure_trains_only_on_the_train_split_of_the_retain_captions():
    """The retain prompts erasure uses on the world never share an attribute combination with the evaluation
    split that scores retention (checked on the prompts the run would record in record.json)."""
    from sage_dist.config import StudyConfig
    from sage_dist.train.validate import validate_inputs
    from sage_dist.world.concepts import retain_eval_combos

    for concept in ("triangle", "red", "striped"):
        cfg = StudyConfig().replace_flat({"model.model_id": "world", "erase.erase_concept": (concept,)})
        trained = set(validate_inputs(cfg))
        held_out = {f"a {c} {t} {s}" for s, c, t in retain_eval_combos(concept)}
        assert trained and held_out and not trained & held_out, concept
