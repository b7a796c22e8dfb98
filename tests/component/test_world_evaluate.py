"""evaluate_world on the shipped world: the original against itself erases nothing; a scrambled encoder
erases the concept and hurts retention (issue 3 item 5)."""

import argparse

import torch

from sage_dist.world.commands import register
from sage_dist.world.evaluate import evaluate_world
from sage_dist.world.generate import load_world_pipeline


def test_evaluate_world_original_and_scrambled():
    pipe = load_world_pipeline("world")
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


def test_world_command_registers_subcommands():
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["world", "evaluate", "--concept", "triangle", "--quick"])
    assert args.concept == "triangle" and args.quick
    args = parser.parse_args(["world", "quality", "--guidance", "2", "3"])
    assert args.guidance == [2.0, 3.0]
    args = parser.parse_args(["world", "train", "--seed", "1", "--out", "x", "--minutes", "2", "--resume"])
    assert args.resume and args.minutes == 2.0
