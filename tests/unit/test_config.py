"""Config validation and dotted overrides."""

import pytest

from sage_dist.config import (
    AttackConfig,
    EraseConfig,
    OptimConfig,
    RetainConfig,
    StudyConfig,
    parse_overrides,
)


def test_defaults_are_the_spec_defaults():
    cfg = StudyConfig()
    assert cfg.optim.num_steps == 1000 and cfg.erase.warmup_steps == 200 and cfg.attack.attack_steps == 30
    assert cfg.retain.retain_batch_size == 32 and cfg.retain.top_k == 4
    assert cfg.erase.negative_guidance == 1.0 and cfg.erase.start_guidance == 3.0 and cfg.erase.ddim_steps == 50
    assert cfg.optim.lr == 1e-5 and cfg.attack.attack_lr == 1e-3 and cfg.erase.steps_per_cycle == 1
    assert cfg.model.model_id == "world"


def test_flat_dict_round_trip():
    cfg = StudyConfig().override(["--erase.erase_concept=nudity,Van Gogh", "--retain.top_k", "2",
                                  "--model.train_encoders=0,1", "--attack.norm_clip=false"])
    assert cfg.erase.erase_concept == ("nudity", "Van Gogh")
    assert cfg.retain.top_k == 2 and cfg.model.train_encoders == (0, 1) and cfg.attack.norm_clip is False
    assert StudyConfig.from_flat_dict(cfg.to_flat_dict()) == cfg


@pytest.mark.parametrize("arg, message", [
    ("--erase.bogus=1", "unknown field 'bogus' in erase"),
    ("--nothing.lr=1", "unknown section 'nothing'"),
    ("--optim.lr=-1", "optim.lr=-1.0: the learning rate must be > 0"),
    ("--optim.num_steps=0", "optim.num_steps=0: must be >= 1"),
    ("--optim.num_steps=2.5", "expected an integer"),
    ("--erase.method=foo", "allowed values are \\['sage', 'esd', 'advunlearn', 'esd-x'\\]"),
    ("--retain.top_k=40", "top_k=40 is larger than retain.retain_batch_size=32"),
    ("--erase.erase_concept=", "erase_concept is empty"),
    ("--attack.attack_lr=0", "attack.attack_lr=0.0: must be > 0"),
    ("--model.train_encoders=2", "allowed indices are 0 and 1"),
])
def test_bad_values_name_the_field(arg, message):
    with pytest.raises(ValueError, match=message):
        StudyConfig().override([arg])


def test_cross_field_check():
    with pytest.raises(ValueError, match="warmup_steps=200 exceeds optim.num_steps=10"):
        StudyConfig(optim=OptimConfig(num_steps=10))
    StudyConfig(optim=OptimConfig(num_steps=10), erase=EraseConfig(warmup_steps=5))


def test_parse_overrides_errors():
    with pytest.raises(ValueError, match="expected --section.field=value"):
        parse_overrides(["erase.method=sage"])
    with pytest.raises(ValueError, match="has no value"):
        parse_overrides(["--erase.method"])


def test_sections_validate_alone():
    with pytest.raises(ValueError, match="repeats a concept"):
        EraseConfig(erase_concept=("a", "a"))
    with pytest.raises(ValueError, match="num_adv_tokens"):
        AttackConfig(num_adv_tokens=0)
    with pytest.raises(ValueError, match="graph_temperature"):
        RetainConfig(graph_temperature=0)
