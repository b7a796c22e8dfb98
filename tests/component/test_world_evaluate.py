"""evaluate_world on the shipped world: the original against itself erases nothing; a scrambled encoder
erases the concept and hurts retention."""

import argparse

import torch

from sage_dist.cli.world import register
from sage_dist.eval.world import evaluate_world
from sage_dist.models.load import load_pipeline


def test_evaluate_world_original_and_scrambled():
    pipe = load_pipeline("world")
    same = evaluate_world(pipe, None, concept="triangle", quick=True, num_inference_steps=6)
    for key in ("RER_word", "RER_synonyms", "RER_heldout", "RER_domain"):
        assert same[key] == 0.0
    assert same["retention_drop"] == 0.0 and same["FID"] == same["FID_original"]
    assert same["concept_rate_original"] >= 0.8 and 0.0 <= same["alignment"] <= 1.0

    scrambled = type(pipe.text_encoder)(pipe.text_encoder.config)
    torch.manual_seed(0)
    scrambled.load_state_dict(pipe.text_encoder.state_dict())
    with torch.no_grad():
        weight = scrambled.get_input_embeddings().weight
        weight.copy_(weight[torch.randperm(weight.shape[0])])
    erased = evaluate_world(pipe, scrambled, concept="triangle", quick=True, num_inference_steps=6)
    assert erased["RER_domain"] > 0.5 and erased["retention_acc"] < same["retention_acc"]


def test_evaluate_world_several_concepts_and_a_unet_edit():
    """Two concepts at once (per-concept keys, retain prompts naming neither) and a UNet edit: a UNet whose
    text pathways (cross-attention K/V and the pooled-text embedding) are zeroed cannot draw the prompted shape."""
    import copy

    pipe = load_pipeline("world")
    same = evaluate_world(pipe, None, concept=("triangle", "red"), quick=True, num_inference_steps=6)
    assert same["triangle/RER_domain"] == 0.0 and same["red/RER_domain"] == 0.0 and same["RER_domain"] == 0.0
    blind = copy.deepcopy(pipe.unet)
    with torch.no_grad():
        for name, param in blind.named_parameters():
            if ".attn2.to_k." in name or ".attn2.to_v." in name or name.startswith("add_embedding."):
                param.zero_()
    edited = evaluate_world(pipe, None, concept="triangle", unet=blind, quick=True, num_inference_steps=6)
    assert edited["RER_domain"] > 0.5 and edited["retention_acc"] < edited["retention_acc_original"]


def test_world_command_registers_subcommands():
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["world", "quality", "--guidance", "2", "3"])
    assert args.guidance == [2.0, 3.0]
    args = parser.parse_args(["world", "train", "--seed", "1", "--out", "x", "--minutes", "2", "--resume"])
    assert args.resume and args.minutes == 2.0


def test_edited_pipeline_never_casts_the_callers_module():
    """An fp32 trained encoder put into an fp16 pipeline is converted as a copy; the caller's stays fp32."""
    import copy

    from sage_dist.models.load import edited_pipeline

    pipe = load_pipeline("world")
    half = copy.copy(pipe)
    half.text_encoder = copy.deepcopy(pipe.text_encoder).to(torch.float16)
    trained = copy.deepcopy(pipe.text_encoder)
    edited = edited_pipeline(half, trained)
    assert next(trained.parameters()).dtype == torch.float32
    assert next(edited.text_encoder.parameters()).dtype == torch.float16
    assert edited_pipeline(pipe, trained).text_encoder is trained and half.text_encoder is not edited.text_encoder
