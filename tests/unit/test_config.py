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


# ---- every field checked through its annotation --------------------------------------------------------
def _fields_of_type(ftype):
    import dataclasses
    import typing

    from sage_dist.config import _section_class

    out = []
    for section in dataclasses.fields(StudyConfig):
        cls = _section_class(section.name)
        hints = typing.get_type_hints(cls)
        out += [(f"{section.name}.{f.name}", cls, f.name) for f in dataclasses.fields(cls) if hints[f.name] is ftype]
    return out


FLOAT_FIELDS = _fields_of_type(float)
INT_FIELDS = _fields_of_type(int)


def test_the_field_lists_cover_the_config():
    assert len(FLOAT_FIELDS) >= 9 and ("optim.lr", OptimConfig, "lr") in FLOAT_FIELDS
    assert len(INT_FIELDS) >= 15 and ("optim.num_steps", OptimConfig, "num_steps") in INT_FIELDS


@pytest.mark.parametrize("key,cls,name", FLOAT_FIELDS, ids=[k for k, _, _ in FLOAT_FIELDS])
@pytest.mark.parametrize("bad", ["inf", "-inf", "nan", "1e400"])
def test_every_float_field_must_be_finite(key, cls, name, bad):
    with pytest.raises(ValueError, match=rf"^{key}=(-?inf|nan): must be a finite number"):
        StudyConfig().override([f"--{key}={bad}"])
    with pytest.raises(ValueError, match=rf"^{key}=.*: must be a finite number"):
        cls(**{name: float(bad)})


@pytest.mark.parametrize("key,cls,name", FLOAT_FIELDS + INT_FIELDS, ids=[k for k, _, _ in FLOAT_FIELDS + INT_FIELDS])
def test_every_numeric_field_has_a_range(key, cls, name):
    """No numeric field of the config allows a negative value; the message names the field."""
    with pytest.raises(ValueError, match=rf"^{key}=-1(\.0)?: \S"):
        StudyConfig().override([f"--{key}=-1"])


@pytest.mark.parametrize("key,cls,name", INT_FIELDS, ids=[k for k, _, _ in INT_FIELDS])
@pytest.mark.parametrize("bad", ["inf", "nan", "2.5", "ten"])
def test_every_int_field_rejects_non_integers_by_name(key, cls, name, bad):
    with pytest.raises(ValueError, match=rf"^{key}='{bad}': expected an integer"):
        StudyConfig().override([f"--{key}={bad}"])


def test_large_integers_are_exact_and_seed_is_bounded():
    assert StudyConfig().override(["--optim.seed=4294967295"]).optim.seed == 2**32 - 1
    assert StudyConfig().override(["--optim.num_steps=1e3"]).optim.num_steps == 1000
    with pytest.raises(ValueError, match=r"optim.seed=4294967296: allowed 0..4294967295"):
        StudyConfig().override(["--optim.seed=4294967296"])


@pytest.mark.parametrize("build, message", [
    (lambda: EraseConfig(erase_concept="nudity"), r"erase.erase_concept='nudity': expected a tuple"),
    (lambda: EraseConfig(method="ESD"), r"erase.method='ESD': allowed values are"),
    (lambda: OptimConfig(num_steps=10.0), r"optim.num_steps=10.0: expected an integer"),
    (lambda: OptimConfig(lr="1e-4"), r"optim.lr='1e-4': expected a number"),
    (lambda: AttackConfig(norm_clip=1), r"attack.norm_clip=1: expected true or false"),
    (lambda: RetainConfig(retain_loss_weight=True), r"retain.retain_loss_weight=True: expected a number"),
    (lambda: StudyConfig(optim={"lr": 1e-4}), r"optim=\{'lr': 0.0001\}: expected a OptimConfig"),
    (lambda: StudyConfig().override(["--tracking.experiment_name= "]), "tracking.experiment_name is empty"),
])
def test_direct_construction_is_type_checked(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_numbers_of_other_numeric_types_are_accepted():
    import numpy as np

    cfg = StudyConfig(optim=OptimConfig(lr=np.float64(1e-4), num_steps=np.int64(300)))
    assert cfg.optim.lr == 1e-4 and cfg.optim.num_steps == 300
    assert OptimConfig(lr=1).lr == 1  # an int is a valid float value
