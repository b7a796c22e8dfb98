"""Study command lines (search studies: ``studies/tune_gamma.py``; grid studies: ``studies/*.py``): explicit
settings win over ``--smoke-test``, and bad input stops a study before Ray starts and before any MLflow run or
experiment exists (Ray's start and MLflow's run creation raise in these tests), with a message naming the fix."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def load_study(name: str):
    spec = importlib.util.spec_from_file_location(f"studies_{name}", REPO / "studies" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Started(Exception):
    """Raised where the study would start its run (nothing of it runs in these tests)."""


@pytest.fixture
def nothing_starts(monkeypatch):
    """Ray's start and MLflow's experiment and run creation raise :class:`AssertionError`."""
    import mlflow
    import ray

    def refuse(what):
        def raiser(*args, **kwargs):
            raise AssertionError(f"{what} was called before the input was checked")
        return raiser

    monkeypatch.setattr(ray, "init", refuse("ray.init"))
    monkeypatch.setattr(mlflow.MlflowClient, "create_experiment", refuse("MLflow create_experiment"))
    monkeypatch.setattr(mlflow.MlflowClient, "create_run", refuse("MLflow create_run"))


# ---- search studies -------------------------------------------------------------------------------------
def _search_inputs(monkeypatch, argv: list[str]):
    """``(cfg, opts)`` that ``tune_gamma.py argv`` hands to the study."""
    from sage_dist.cli import study as cli

    seen = {}

    def capture(cfg, search_space, opts):
        seen.update(cfg=cfg, opts=opts)
        raise Started

    monkeypatch.setattr(cli, "run_search", capture)
    tune_gamma = load_study("tune_gamma")
    with pytest.raises(Started):
        cli.main(tune_gamma.config, tune_gamma.search_space, argv, name="tune_gamma", smoke=tune_gamma.smoke)
    return seen["cfg"], seen["opts"]


def test_smoke_test_sets_its_budget_when_nothing_is_given(monkeypatch):
    cfg, opts = _search_inputs(monkeypatch, ["--smoke-test"])
    assert cfg.optim.num_steps == 24 and cfg.scaling.checkpoint_every == 12 and opts.num_samples == 2
    assert opts.rescore_budget == 2  # the default budget shrinks to a smaller study
    cfg, opts = _search_inputs(monkeypatch, [])
    assert cfg.optim.num_steps == 48 and opts.num_samples == 12 and opts.rescore_budget == 4
    assert opts.objectives == ""  # the model's default: robust_erasure vs retention_loss on the world
    _, opts = _search_inputs(monkeypatch, ["--objectives", "erasure=text_erasure,retention=text_retention_drift",
                                           "--rescore-budget", "0"])
    assert opts.objectives == "erasure=text_erasure,retention=text_retention_drift" and opts.rescore_budget == 0


def test_explicit_search_settings_win_over_the_smoke_test(monkeypatch):
    cfg, opts = _search_inputs(monkeypatch, ["--smoke-test", "--num-samples", "5", "--optim.num_steps=30",
                                             "--scaling.checkpoint_every=10", "--concept", "square"])
    assert opts.num_samples == 5
    assert cfg.optim.num_steps == 30 and cfg.scaling.checkpoint_every == 10
    assert cfg.erase.erase_concept == ("square",)
    cfg, _ = _search_inputs(monkeypatch, ["--optim.num_steps=30", "--smoke-test"])  # order does not matter
    assert cfg.optim.num_steps == 30


def test_resume_command_replaces_the_resume_option():
    from sage_dist.cli.study import resume_command

    assert resume_command(["--smoke-test", "--resume", "old", "--seed", "3"], "s-1", "python x.py") == \
        "python x.py --smoke-test --seed 3 --resume s-1"
    assert resume_command(["--resume", "--smoke-test"], "s-1", "p") == "p --smoke-test --resume s-1"
    assert resume_command(["--resume=old"], "s-1", "p") == "p --resume s-1"


@pytest.mark.parametrize("argv, words", [
    (["--mode", "single", "--scaling.checkpoint_every=0"], "--mode single uses ASHA.*checkpoint_every"),
    (["--mode", "single", "--objectives", "erasure=RER_domain,retention=KID"], "--mode single maximises one score"),
    (["--objectives", "erasure=robust_erasure,retention=FID"], "retention=FID: not a metric a study can optimise"),
    (["--model", "tiny-sd", "--objectives", "erasure=robust_erasure,retention=retention_loss"],
     "does not report robust_erasure"),
    (["--erase.method=esd-x", "--objectives", "erasure=text_erasure,retention=retention_loss"],
     "does not report text_erasure"),
    (["--rescore-budget", "13"], "--rescore-budget=13 is larger than the study's --num-samples=12"),
    (["--num-samples", "3", "--rescore-budget=4"], "--rescore-budget=4 is larger than the study's --num-samples=3"),
    (["--rescore-budget", "-1"], "--rescore-budget=-1: must be >= 0"),
    (["--model", "tiny-sd", "--erase.method=esd-x"], "esd-x trains the UNet"),
    (["--concept", "hexagon"], "unknown concept of the bundled world"),
    (["--retain.retain_batch_size=4"], "search space bound retain.top_k=8"),
    (["--optim.bogus=1"], "unknown field"),
    (["--resume", "no-such-study"], "not a restorable Tune experiment"),
])
def test_search_study_input_errors_come_before_ray_and_mlflow(argv, words, tmp_path, nothing_starts, capsys):
    from sage_dist.cli import study as cli

    tune_gamma = load_study("tune_gamma")
    common = ["--storage", str(tmp_path / "studies"), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(tune_gamma.config, tune_gamma.search_space, [*argv, *common], name="tune_gamma",
                 smoke=tune_gamma.smoke)
    assert exit_info.value.code == 2
    assert re.search(words, capsys.readouterr().err), words


def test_unwritable_study_storage_is_found_before_ray(tmp_path, nothing_starts, capsys):
    from sage_dist.cli import study as cli

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    tune_gamma = load_study("tune_gamma")
    with pytest.raises(SystemExit):
        cli.main(tune_gamma.config, tune_gamma.search_space,
                 ["--storage", str(blocker / "studies"), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"],
                 name="tune_gamma")
    err = capsys.readouterr().err
    assert "study storage" in err and "cannot create or write this folder" in err


# ---- grid studies ---------------------------------------------------------------------------------------
def test_explicit_grid_settings_win_over_the_smoke_test():
    from sage_dist.cli.studies import prepare
    from sage_dist.presets import STUDY_SMOKE

    fn = load_study("multi_concept").study
    (smoke,) = prepare([fn], ["--smoke-test"], "")[1]
    assert smoke.base.optim.num_steps == STUDY_SMOKE["optim.num_steps"] and smoke.seeds == (0,)
    assert [v.name for v in smoke.variants] == ["joint-2", "sequential-2"]
    (study,) = prepare([fn], ["--smoke-test", "--optim.num_steps=6", "--attack.attack_steps=3", "--seeds", "4,5",
                              "--variants", "joint-1"], "")[1]
    assert study.base.optim.num_steps == 6 and study.base.attack.attack_steps == 3
    assert study.base.retain.top_k == STUDY_SMOKE["retain.top_k"]  # what was not given keeps the smoke budget
    assert study.seeds == (4, 5) and [v.name for v in study.variants] == ["joint-1"]


@pytest.mark.parametrize("argv, words", [
    (["--out", "{blocker}/out"], "--out .*cannot create or write this folder"),
    (["--report", "{blocker}/r/report.md"], "--report folder .*cannot create or write this folder"),
    (["--optim.bogus=1"], "unknown field"),
    (["--tracking-uri", "sqlite:///relative.db"], "absolute SQLite path"),
])
def test_grid_study_input_errors_come_before_ray_and_mlflow(argv, words, tmp_path, nothing_starts, capsys):
    from sage_dist.cli.studies import main

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    argv = [a.format(blocker=blocker) for a in argv]
    defaults = {"--out": str(tmp_path / "out"), "--report": str(tmp_path / "report.md"),
                "--tracking-uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    for flag, value in defaults.items():
        if flag not in argv:
            argv += [flag, value]
    with pytest.raises(SystemExit) as exit_info:
        main(load_study("frozen_unet").study, ["--smoke-test", *argv])
    assert exit_info.value.code == 2
    assert re.search(words, capsys.readouterr().err), words


# ---- interrupts -----------------------------------------------------------------------------------------
def test_sigterm_raises_an_interrupt_or_reaches_a_graceful_sigint_handler():
    import os
    import signal

    from sage_dist.tune.interrupts import StudyInterrupted, stop_on_sigterm

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(StudyInterrupted, match="SIGTERM"), stop_on_sigterm():
        os.kill(os.getpid(), signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is before

    caught = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))  # a graceful handler
    try:
        with stop_on_sigterm():
            os.kill(os.getpid(), signal.SIGTERM)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert caught == [signal.SIGINT]


def test_an_interrupt_that_tune_caught_is_seen_after_fit():
    """Ray Tune's handler, on its first signal, puts back the handler it found: that is how the study learns
    that ``fit()`` returned early."""
    import os
    import signal

    from sage_dist.tune.interrupts import watch_tune_interrupt

    def fit(signal_arrives: bool) -> bool:
        with watch_tune_interrupt() as watch:
            found = signal.getsignal(signal.SIGINT)

            def tune_handler(signum, frame):  # what tune.run installs
                signal.signal(signal.SIGINT, found)

            signal.signal(signal.SIGINT, tune_handler)
            if signal_arrives:
                os.kill(os.getpid(), signal.SIGINT)
        return watch["interrupted"]

    assert fit(signal_arrives=True) and not fit(signal_arrives=False)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
