"""Grid studies (``studies/*.py`` on ``sage_dist.tune.grid``): smoke paths, report writer, mined library, and an
interrupted launch resumed.

Default set (not slow, ~1-2 min): the mined template library's constraints, the report writer on hand-made
records, the interference measure, each study's grid and smoke grid, every smoke variant of every study on
random tiny models (text-space metrics), and two smoke trials on the bundled world (template library from
COCO; ESD-x). ``slow``: the other world smoke trials and every study's full ``--smoke-test --local``;
``ray`` + ``slow``: all four smoke studies launched concurrently on a local Ray instance with an MLflow SQLite
store. ``ray``: a two-cell tiny grid launch interrupted by Ctrl+C and resumed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_study  # noqa: E402

STUDY_FILES = ("multi_concept", "dual_encoder", "template_bias", "frozen_unet")


def load_study_module(name: str):
    spec = importlib.util.spec_from_file_location(f"studies_{name}", REPO / "studies" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def world_available() -> bool:
    from sage_dist.models.registry import world_path

    try:
        world_path("world"), world_path("world-xl")
        from sage_dist.world.detector import load_detector  # noqa: F401

        return True
    except (FileNotFoundError, ImportError):
        return False


needs_world = pytest.mark.skipif(not world_available(), reason="the bundled world's weights are not installed")


# ---- mined template library -------------------------------------------------------------------------------
def test_mined_library_has_one_slot_and_no_world_concept_word():
    from sage_dist.attack.mining import MINED_LIBRARY, banned_words, contains_banned
    from sage_dist.attack.templates import load_templates
    from sage_dist.world.concepts import CONCEPTS

    templates = load_templates(str(MINED_LIBRARY))  # the engine's own check: exactly one {} per line
    assert len(templates) == 125
    banned = banned_words()
    assert set(CONCEPTS) <= banned
    for t in templates:
        assert t.count("{}") == 1, t
        assert not contains_banned(t, banned), t
        words = set(t.lower().replace("{}", " ").split())
        assert not words & set(CONCEPTS), t
    default = set(load_templates("default"))
    assert not default & set(templates), "the mined library must come from a different source"


def test_caption_to_template_rules():
    from sage_dist.attack.mining import (
        banned_words,
        caption_to_template,
        contains_banned,
        mine_templates,
    )

    assert caption_to_template("Two people with skis are skiing on the snow.") == "a {} with skis are skiing on the snow"
    assert caption_to_template("Motorcycles on display.") is None  # no article: no subject phrase found
    assert contains_banned("a {} with red stripes", banned_words())
    assert contains_banned("zebra stripes", banned_words())  # "striped"'s paraphrase word and its forms
    with pytest.raises(ValueError, match="usable captions"):
        mine_templates(["A dog on a bed."], num=2)


def test_mined_library_regenerates_identically(tmp_path):
    from sage_dist.attack.mining import MINED_LIBRARY, main

    captions = REPO / "sage_dist" / "data" / "prompts" / "coco" / "coco_30k_val.csv"
    out = tmp_path / "mined.txt"
    main(["--captions", str(captions), "--out", str(out)])
    assert out.read_text() == MINED_LIBRARY.read_text()


# ---- interference -----------------------------------------------------------------------------------------
def test_interference_probe_on_tiny_model():
    from sage_dist.models.load import load_pipeline
    from sage_dist.train.interference import InterferenceProbe
    from tests.conftest import tiny_config

    cfg = tiny_config(**{"erase.erase_concept": ("cat", "dog")})
    probe = InterferenceProbe(cfg, load_pipeline("tiny-sd"))
    probe.load(probe.eraser.trainable_module.state_dict())
    grads = probe.gradients()
    assert set(grads) == {"cat", "dog"} and all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values())
    assert -1.0 <= probe.measure()["interference_cos"] <= 1.0


# ---- report writer ----------------------------------------------------------------------------------------
def _hand_study():
    from sage_dist.config import StudyConfig
    from sage_dist.tune.grid import GridStudy, Variant

    return GridStudy(name="demo", question="Does it work?", hypothesis="yes", base=StudyConfig(),
                     variants=(Variant(name="joint-1", group="joint", x=1), Variant(name="joint-2", group="joint", x=2),
                               Variant(name="seq-2", group="sequential", x=2)),
                     metrics=("RER_domain", "FID"), plot_metrics=("RER_domain",), curve_metrics=("interference_cos",))


def _record(variant, seed, status="ok", **metrics):
    return {"study": "demo", "variant": variant, "seed": seed, "status": status, "metrics": metrics,
            "curves": {"interference_cos": [(0, 0.1), (10, 0.2 + seed / 10)]} if status == "ok" else {},
            "error": "FloatingPointError: boom" if status != "ok" else ""}


def test_metric_directions():
    from sage_dist.tune.report import lower_is_better

    assert lower_is_better("FID") and lower_is_better("concept_rate_heldout") and lower_is_better("KID") and lower_is_better("train_s")
    assert lower_is_better("s_per_step") and lower_is_better("retention_drop")
    assert not lower_is_better("RER_synonyms") and not lower_is_better("retention_acc")


def test_report_writer_tables_plots_and_failures(tmp_path):
    from sage_dist.tune.report import aggregate, write_report

    records = [_record("joint-1", 0, RER_domain=0.8, FID=10.0), _record("joint-1", 1, RER_domain=1.0, FID=12.0),
               _record("joint-1", 2, RER_domain=0.9, FID=float("nan")),
               _record("joint-2", 0, RER_domain=0.5, FID=20.0), _record("joint-2", 1, status="failed"),
               _record("seq-2", 0, RER_domain=0.4, FID=30.0)]
    stats = aggregate(records, "RER_domain")
    assert stats["joint-1"] == pytest.approx((0.9, 0.1, 3))
    assert aggregate(records, "FID")["joint-1"][2] == 2  # NaN dropped
    path = write_report([_hand_study()], {"demo": records}, tmp_path / "r.md", title="T", preamble="P")
    text = path.read_text()
    # records without per-image outcomes: mean ± sd, labelled; a NaN or a failed seed is counted as missing
    assert "| joint-1 | 3 of 3 | 0.9 ± 0.1 sd (3 seeds) | 11 ± 1.4 sd (2 of 3 seeds) |" in text
    assert "| joint-2 | 1 of 3 (failed: 1; missing: 2) | 0.5 (1 of 3 seeds) | 20 (1 of 3 seeds) |" in text
    assert "best `joint-1` 0.9 ± 0.1 sd (3 seeds), worst `seq-2` 0.4 (1 of 3 seeds)" in text
    assert "best `joint-1` 11 ± 1.4 sd (2 of 3 seeds)" in text  # FID: lower is better
    assert "mean ± sd over seeds (these records carry no per-image outcomes)" in text
    assert "failed `joint-2` seed 1: FloatingPointError: boom" in text
    assert (tmp_path / "r_plots" / "demo.png").is_file()
    assert (tmp_path / "r_plots" / "demo_interference_cos.png").is_file()
    assert "![demo](r_plots/demo.png)" in text


def test_report_only_rewrites_the_report_from_trial_records(tmp_path):
    """``--report-only`` runs nothing: it reads ``<out>/<study>/trials/*.json`` and the saved preamble."""
    import json

    from sage_dist.cli.studies import main
    from sage_dist.tune.grid import write_record

    for r in (_record("joint-1", 0, RER_domain=0.8, FID=10.0), _record("joint-1", 1, RER_domain=1.0, FID=12.0)):
        write_record(tmp_path, r)
    (tmp_path / "run_summary.json").write_text(json.dumps({"preamble": "Generated by the original run."}))
    path = main(_hand_study, ["--report-only", "--out", str(tmp_path), "--report", str(tmp_path / "r.md")])
    text = path.read_text()
    assert "Generated by the original run." in text and "| joint-1 | 2 of 3 (missing: 2) | 0.9 ± 0.14 sd (2 of 3 seeds) |" \
        in text


def test_preflight_rejects_a_variant_before_anything_runs():
    """A variant whose retain set is too small fails at start, naming the study and variant (it used to fail
    per trial, after the other studies had run)."""
    import dataclasses

    from sage_dist.tune.grid import preflight

    study = load_study_module("multi_concept").study()
    preflight(study)
    joint8 = next(v for v in study.variants if v.name == "joint-8")
    assert joint8.overrides["retain.retain_batch_size"] == 8
    bad = dataclasses.replace(joint8, overrides={"erase.erase_concept": joint8.overrides["erase.erase_concept"]})
    with pytest.raises(ValueError, match="study multi_concept, variant joint-8: retain set 'auto' has 8 usable"):
        preflight(dataclasses.replace(study, variants=(bad,)))


# ---- the studies' grids -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", STUDY_FILES)
def test_study_grids_and_smoke_versions(name):
    from sage_dist.presets import STUDY_SMOKE as SMOKE_OVERRIDES
    from sage_dist.tune.grid import smoke_version

    module = load_study_module(name)
    study = module.study()
    assert study.seeds == (0, 1, 2) and len(study.variants) >= 3
    smoke = smoke_version(study)
    assert smoke.seeds == (0,) and 1 <= len(smoke.variants) <= 2
    for v in smoke.variants:
        cfg = smoke.variant_config(v, 0)
        assert cfg.optim.num_steps <= SMOKE_OVERRIDES["optim.num_steps"] * v.steps_scale
    assert "--smoke-test" in module.__doc__ and "Command" in module.__doc__ and "runtime" in module.__doc__


def test_studies_design_for_real_models():
    multi = load_study_module("multi_concept").study("CompVis/stable-diffusion-v1-4")
    assert multi.variant_config(multi.variants[3], 0).erase.erase_concept[0] == "Pablo Picasso"
    assert len(multi.variant_config(multi.variants[3], 0).erase.erase_concept) == 8
    assert multi.base.optim.num_steps == 1000  # the spec's budget, not the world's
    dual = load_study_module("dual_encoder").study("stabilityai/stable-diffusion-xl-base-1.0")
    assert dual.variants[-1].source_model == "CompVis/stable-diffusion-v1-4"
    twin = load_study_module("dual_encoder").study("CompVis/stable-diffusion-v1-4")  # open_questions --model SD
    assert twin.base.model.model_id == "stabilityai/stable-diffusion-xl-base-1.0"
    assert load_study_module("dual_encoder").study("world").base.model.model_id == "world-xl"


def test_cli_overrides_and_seeds_reach_every_study():
    from sage_dist.cli.studies import prepare

    _, studies = prepare([load_study_module(n).study for n in STUDY_FILES],
                         ["--seeds", "3,4", "--optim.lr=2e-4"], "d")
    assert all(s.seeds == (3, 4) and s.base.optim.lr == 2e-4 for s in studies)
    with pytest.raises(ValueError, match="unknown field"):
        prepare([load_study_module("frozen_unet").study], ["--optim.bogus=1"], "d")


# ---- smoke trials ------------------------------------------------------------------------------------------
TINY_MODELS = {"multi_concept": "tiny-sd", "dual_encoder": "tiny-sdxl", "template_bias": "tiny-sd",
               "frozen_unet": "tiny-sd"}


@pytest.mark.parametrize("name", STUDY_FILES)
def test_smoke_trials_on_tiny_models(name):
    """Every smoke variant of each study on a random tiny model (every procedure; text-space proxy metrics)."""
    from sage_dist.tune.grid import execute_trial, smoke_version

    study = smoke_version(load_study_module(name).study(TINY_MODELS[name]))
    for variant in study.variants:
        record = execute_trial(study, variant, 0)
        m = record["metrics"]
        assert record["status"] == "ok"
        assert {"train_s", "trial_cpu_s"} <= set(m), sorted(m)
        if record["config"]["erase.method"] != "esd-x":  # a UNet edit leaves the text proxy nothing to measure
            assert {"text_erasure", "text_retention_drift"} <= set(m), sorted(m)
        if variant.procedure == "sequential":
            assert [s for s, _ in record["curves"]["interference_cos"]] == [0, 4, 8]
        if name == "multi_concept" and variant.procedure == "erase":
            assert [s for s, _ in record["curves"]["interference_cos"]] == [0, 2, 4, 6, 8]
        json.dumps(record)


def _world_smoke_trial(name: str, variant_name: str) -> dict:
    from sage_dist.tune.grid import execute_trial, json_record, smoke_version

    study = smoke_version(load_study_module(name).study())
    record = execute_trial(study, next(v for v in study.variants if v.name == variant_name), 0)
    m = record["metrics"]
    assert record["status"] == "ok"
    for key in ("RER_domain", "RER_heldout", "concept_rate_heldout", "retention_acc", "KID", "train_s", "eval_s"):
        assert key in m
    assert 0.0 <= m["retention_acc"] <= 1.0
    assert {k: v.shape[1] for k, v in record["features"].items()} == {"edited": 128, "original": 128, "reference": 128}
    json.dumps(json_record(record))  # the record as written, its KID inputs moved to the side file
    return record


@needs_world
def test_world_smoke_trial_template_bias_mined_library():
    m = _world_smoke_trial("template_bias", "mined-coco")["metrics"]
    assert m["concept_rate_heldout"] == pytest.approx(1 - m["erasure_rate_heldout"])
    assert m["ASR_prefix_n"] == 2 and 0 <= m["ASR_prefix"] <= 1  # the independent red team judges it


def test_template_bias_calibration_chooses_the_budget_whose_asr_can_move_either_way():
    sys.path.insert(0, str(REPO / "studies"))
    module = load_study_module("template_bias_calibration")
    study = module.study()
    assert [study.variant_config(v, 0).optim.num_steps for v in study.variants] == [15, 30, 60]
    assert study.red_team and study.fidelity.name == "full" and study.seeds == (0,)

    def record(steps, asr, lo, rer, status="ok"):
        return {"variant": f"steps-{steps}", "status": status,
                "metrics": {"ASR_prefix": asr, "ASR_prefix_ci95_lo": lo, "ASR_prefix_ci95_hi": min(1, asr + .2),
                            "RER_domain": rer}}

    # 15 steps: closest to 0.5 but erases too little; 60: ASR interval touches 0; 30 wins
    steps, reason = module.choose_budget([record(15, 0.5, 0.3, 0.4), record(30, 0.25, 0.1, 0.8),
                                          record(60, 0.03, 0.0, 0.95)])
    assert steps == 30 and "chosen: 30 steps" in reason and "15 steps: ASR_prefix 0.5" in reason
    # a tie in distance from 0.5 goes to fewer steps; a failed trial never qualifies
    assert module.choose_budget([record(30, 0.4, 0.2, 0.9), record(60, 0.6, 0.4, 0.9),
                                 record(15, 0.5, 0.3, 0.9, status="failed")])[0] == 30
    steps, reason = module.choose_budget([record(60, 0.0, 0.0, 1.0)])
    assert steps is None and "no budget qualifies" in reason
    assert load_study_module("template_bias").STEPS in module.BUDGETS  # the study runs at a calibrated budget


@needs_world
def test_world_smoke_trial_frozen_unet_esdx():
    m = _world_smoke_trial("frozen_unet", "esd-x-striped")["metrics"]
    assert m["RER_domain_after_encoder_swap"] == m["RER_domain"]  # a UNet edit survives the encoder swap


@pytest.mark.slow
@needs_world
def test_world_smoke_trial_multi_concept_sequential():
    record = _world_smoke_trial("multi_concept", "sequential-2")
    assert "triangle/RER_domain" in record["metrics"] and "red/RER_domain" in record["metrics"]
    assert [s for s, _ in record["curves"]["interference_cos"]] == [0, 4, 8]


@pytest.mark.slow
@needs_world
def test_world_smoke_trial_dual_encoder_transfer():
    assert "source_RER_domain" in _world_smoke_trial("dual_encoder", "transfer-from-sd")["metrics"]


@pytest.mark.slow
@needs_world
@pytest.mark.parametrize("name", STUDY_FILES)
def test_study_smoke_test_local(name, tmp_path):
    """``python studies/<name>.py --smoke-test --local`` end to end (report included)."""
    module = load_study_module(name)
    from sage_dist.cli.studies import main

    report = main(module.study, ["--smoke-test", "--local", "--out", str(tmp_path), "--report",
                                 str(tmp_path / "report.md")])
    text = report.read_text()
    assert "| variant |" in text and "0 of" not in text


@pytest.mark.ray
@pytest.mark.slow
@needs_world
def test_open_questions_smoke_on_ray(tmp_path):
    """All four studies' smoke grids concurrently on a local Ray instance, MLflow in a tmp SQLite store."""
    sys.path.insert(0, str(REPO / "studies"))
    import ray

    from sage_dist.cli.studies import main
    from sage_dist.tracking.mlflow_tracker import search_runs

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    try:
        report = main([load_study_module(n).study for n in STUDY_FILES],
                      ["--smoke-test", "--ray-address", "local", "--out", str(tmp_path / "out"),
                       "--report", str(tmp_path / "oq.md"), "--tracking-uri", uri])
    finally:
        ray.shutdown()
    text = report.read_text()
    for name in STUDY_FILES:
        assert f"## {name}:" in text
        runs = search_runs(uri, f"open_questions.{name}")
        assert len(runs) == 3  # parent + 2 trials
        assert all(r.info.status == "FINISHED" for r in runs)


def test_variants_option_selects_variants_and_rejects_unknown_names():
    from sage_dist.cli.studies import prepare

    fn = load_study_module("multi_concept").study
    _, studies = prepare([fn], ["--variants", "joint-8,sequential-2"], "")
    assert [v.name for v in studies[0].variants] == ["joint-8", "sequential-2"]
    with pytest.raises(ValueError, match="no such variant"):
        prepare([fn], ["--variants", "joint-9"], "")


@pytest.mark.ray
def test_interrupted_grid_launch_is_killed_keeps_finished_trials_and_resumes(tmp_path):
    """Ctrl+C (SIGINT to the launch's process group) once one of two cells has its record: the study's parent
    run ends KILLED, the finished cell's record stays, the driver exits 130 and prints the --resume command;
    that command runs only the missing cell, under the same parent run, which then ends FINISHED."""
    from sage_dist.tracking.mlflow_tracker import child_runs, search_runs

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "out"
    argv = ["--out", str(out), "--report", str(tmp_path / "report.md"), "--tracking-uri", uri,
            "--cpus-per-trial", "2"]  # one cell at a time on the 2-CPU instance
    records = out / "tiny_grid" / "trials"
    log1 = tmp_path / "launch1.log"
    driver = tiny_study.study_driver(tmp_path, argv, log1.name, entry="grid_main")
    try:
        (first,) = tiny_study.wait_for(lambda: list(records.glob("*.json")), "the first trial record", log1)
        os.killpg(driver.pid, signal.SIGINT)
        assert driver.wait(timeout=180) == 130, log1.read_text()[-3000:]
    finally:
        tiny_study.stop_group(driver)
    done = json.loads(first.read_text())
    assert done["status"] == "ok"
    printed = re.search(r"^resume with: .* --resume$", log1.read_text(), re.M)
    assert printed, log1.read_text()[-3000:]
    (parent,) = search_runs(uri, "open_questions.tiny_grid", "tags.`sage_dist.kind` = 'grid_study'")
    assert parent.info.status == "KILLED"

    log2 = tmp_path / "launch2.log"
    driver = tiny_study.study_driver(tmp_path, [*argv, "--resume"], log2.name, entry="grid_main")
    try:
        assert driver.wait(timeout=300) == 0, log2.read_text()[-3000:]
    finally:
        tiny_study.stop_group(driver)
    assert sorted(p.name for p in records.glob("*.json")) == ["high__s0.json", "low__s0.json"]
    assert all(json.loads(p.read_text())["status"] == "ok" for p in records.glob("*.json"))
    (again,) = search_runs(uri, "open_questions.tiny_grid", "tags.`sage_dist.kind` = 'grid_study'")
    assert again.info.run_id == parent.info.run_id and again.info.status == "FINISHED"
    runs = sorted((r.data.tags["variant"], r.info.status) for r in child_runs(uri, parent.info.run_id))
    other = ({"low", "high"} - {done["variant"]}).pop()
    assert [run for run in runs if run[0] == done["variant"]] == [(done["variant"], "FINISHED")]  # ran once
    assert (other, "FINISHED") in runs and set(runs) <= {(done["variant"], "FINISHED"), (other, "FINISHED"),
                                                         (other, "KILLED")}  # an interrupted attempt is KILLED
    disk = (tmp_path / "report.md").read_text()
    assert "| low | 1 of 1 |" in disk

    # the same tables rebuilt from MLflow alone: the trial records are artifacts of their runs
    import shutil

    from sage_dist.cli.studies import main as grid_cli

    shutil.rmtree(out)
    grid_cli(tiny_study.grid_study, ["--report-only", "--from-mlflow", "--tracking-uri", uri, "--report",
                                     str(tmp_path / "from_mlflow.md")], title="tiny grid")
    rebuilt = (tmp_path / "from_mlflow.md").read_text()
    table = lambda text: [line for line in text.splitlines() if line.startswith("| ")]  # noqa: E731
    assert table(rebuilt) == table(disk) and "Rebuilt from MLflow alone" in rebuilt
    # another grid (other seeds) finds none of its cells in the experiment: every cell reads missing
    grid_cli(tiny_study.grid_study, ["--report-only", "--from-mlflow", "--tracking-uri", uri, "--seeds", "7",
                                     "--report", str(tmp_path / "other.md")], title="tiny grid")
    assert "| low | 0 of 1 (missing: 7) | missing (0 of 1 seeds) |" in (tmp_path / "other.md").read_text()


def test_resume_with_every_record_present_finishes_the_interrupted_parent_run(tmp_path, monkeypatch):
    """An interrupt that lands after the last trial wrote its record leaves nothing to run: the resumed launch
    still reopens the study's KILLED parent run and ends it FINISHED, without starting Ray."""
    import ray

    from sage_dist.tracking import MlflowTracker, ensure_experiment, resolve_tracking
    from sage_dist.tracking.mlflow_tracker import search_runs
    from sage_dist.tune.grid import grid_cells, write_record
    from sage_dist.tune.grid_runner import RunSettings, launch, parent_key

    study = tiny_study.grid_study()
    settings = RunSettings(out_dir=str(tmp_path / "out"), tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    for variant, seed in grid_cells(study):
        write_record(settings.out_dir, {"study": study.name, "variant": variant.name, "group": variant.name,
                                        "x": None, "seed": seed, "status": "ok", "metrics": {}, "curves": {}})
    target = resolve_tracking(settings.tracking_uri)
    experiment = ensure_experiment(target, settings.experiment_prefix + study.name)
    parent = MlflowTracker.start(target, experiment, run_name="interrupted",
                                 tags={"sage_dist.key": parent_key(settings, study), "sage_dist.kind": "grid_study"})
    parent.end("KILLED", "interrupted")
    monkeypatch.setattr(ray, "init", lambda *a, **k: (_ for _ in ()).throw(AssertionError("Ray was started")))
    assert launch([study], settings, resume=True) == {study.name: []}
    (again,) = search_runs(target.tracking_uri, settings.experiment_prefix + study.name,
                           "tags.`sage_dist.kind` = 'grid_study'")
    assert again.info.run_id == parent.run_id and again.info.status == "FINISHED"


# ---- the methods study (studies/methods.py) and AdvUnlearn's published settings ------------------------------
def test_methods_study_grid_budgets_and_advunlearn_published_settings():
    from sage_dist.presets import ADVUNLEARN_PUBLISHED, WORLD_ERASE
    from sage_dist.tune.grid import smoke_version

    module = load_study_module("methods")
    study = module.study()
    assert [v.name for v in study.variants] == ["sage", "esd", "esd-x", "advunlearn"]
    assert study.seeds == (0, 1, 2) and study.red_team and not study.quick_eval and study.reference_variant == "sage"
    assert study.fidelity.name == "full" and study.fidelity.red_team_prompts == 32
    configs = {v.name: study.variant_config(v, 0) for v in study.variants}
    for name, cfg in configs.items():  # one budget for every method: the world erase preset
        assert (cfg.optim.num_steps, cfg.optim.lr, cfg.erase.warmup_steps, cfg.attack.attack_steps) == \
            (WORLD_ERASE["optim.num_steps"], WORLD_ERASE["optim.lr"], WORLD_ERASE["erase.warmup_steps"],
             WORLD_ERASE["attack.attack_steps"]), name
        assert cfg.erase.method == name and cfg.erase.erase_concept == ("triangle",)
    adv = configs["advunlearn"]
    assert (adv.retain.retain_batch_size, adv.retain.retain_loss_weight, adv.attack.reinit) == (5, 0.3, "latest")
    assert ADVUNLEARN_PUBLISHED == {"retain.retain_batch_size": 5, "retain.retain_loss_weight": 0.3,
                                    "attack.reinit": "latest"}
    assert configs["sage"].retain.retain_batch_size == 32 and configs["sage"].attack.reinit == "resample"
    assert {f"neighbour_acc_{s}" for s in ("circle", "square", "diamond", "cross", "star")} <= set(study.metrics)
    smoke = smoke_version(study)
    assert smoke.seeds == (0,) and len(smoke.variants) == 4 and smoke.fidelity.name == "smoke"
    assert "--smoke-test" in module.__doc__ and "Command" in module.__doc__ and "runtime" in module.__doc__


def test_methods_study_takes_a_concept_from_the_command_line():
    from sage_dist.cli.studies import prepare

    module = load_study_module("methods")
    _, (study,) = prepare([module.study], ["--concept", "red", "--seeds", "0,1,2,3,4"], "d")
    assert study.base.erase.erase_concept == ("red",) and study.seeds == (0, 1, 2, 3, 4)
    assert "neighbour_acc_blue" in study.metrics and "neighbour_acc_red" not in study.metrics
    with pytest.raises(ValueError, match="takes no concept argument"):
        prepare([load_study_module("frozen_unet").study], ["--concept", "red"], "d")
    with pytest.raises(ValueError, match="repeats \\[1\\]"):
        prepare([module.study], ["--seeds", "0,1,1"], "d")


def test_erase_cli_applies_advunlearn_published_settings_and_explicit_overrides_win():
    import argparse

    from sage_dist.cli.erase import build_config

    def args(**kw):
        return argparse.Namespace(**{"model": None, "concept": None, "method": None, "steps": None, "seed": None,
                                     "preset": "auto", **kw})

    cfg = build_config(args(method="advunlearn"), [])
    assert (cfg.retain.retain_batch_size, cfg.retain.retain_loss_weight, cfg.attack.reinit) == (5, 0.3, "latest")
    assert cfg.optim.num_steps == 150  # the world preset still applies
    cfg = build_config(args(), ["--erase.method=advunlearn", "--retain.retain_batch_size=8",
                                "--retain.retain_loss_weight=0.5"])
    assert (cfg.retain.retain_batch_size, cfg.retain.retain_loss_weight, cfg.attack.reinit) == (8, 0.5, "latest")
    assert build_config(args(method="advunlearn", preset="none"), []).retain.retain_batch_size == 32
    assert build_config(args(method="sage"), []).retain.retain_batch_size == 32


def test_methods_smoke_trials_on_a_tiny_model(tmp_path):
    """Every method of the study on tiny-sd (text-space proxy; the red team is world-only), records and report."""
    from sage_dist.tune.grid import read_records, run_local, smoke_version
    from sage_dist.tune.report import write_report

    study = smoke_version(load_study_module("methods").study("tiny-sd"))
    records = run_local(study, tmp_path)
    assert [r["status"] for r in records] == ["ok"] * 4, [r.get("error") for r in records]
    for r in records:
        assert r["metrics"]["num_unet_calls"] > 0 and "outcomes" not in r
    calls = {r["variant"]: r["metrics"]["num_unet_calls"] for r in records}
    assert calls["advunlearn"] > calls["esd"]  # its outside-in attack runs through the UNet
    assert study.name == "methods_Pablo_Picasso"  # the study name carries the concept
    text = write_report([study], {study.name: read_records(tmp_path, study.name, features=True)},
                        tmp_path / "r.md").read_text()
    assert "| num_unet_calls |" in text and "**advunlearn vs sage**" in text


@needs_world
def test_methods_world_trial_records_outcomes_that_reproduce_its_metrics(tmp_path):
    """One world trial of the methods study (ESD-x, seed 1, smoke budgets): its per-image outcomes, KID inputs and
    red-team outcomes are written, were drawn with the trial's seed, and pooled over that one seed give back the
    trial's own numbers."""
    from sage_dist.eval.world import RED_TEAM_SEED_OFFSET, image_seeds
    from sage_dist.tune import report
    from sage_dist.tune.grid import features_path, read_records, run_local, smoke_version, with_variants

    study = smoke_version(load_study_module("methods").study(), {})
    study = with_variants(study, tuple(v for v in study.variants if v.name == "esd-x"), seeds=(1,))
    (record,) = run_local(study, tmp_path)
    assert record["status"] == "ok", record.get("error")
    assert features_path(tmp_path, "methods_triangle", "esd-x", 1).is_file()
    (back,) = read_records(tmp_path, "methods_triangle", features=True)
    out = back["outcomes"]
    assert out["eval_seed"] == 1 and out["first_seed"] == image_seeds(1, 1)[0]  # evaluation noise = trial seed
    rt = out["red_team"]["triangle"]
    assert rt["seeds"][0] == image_seeds(1, 1, RED_TEAM_SEED_OFFSET)[0]
    assert (Path(back["adversarial_dir"]) / "prefix.json").is_file()
    units = report.Units.from_records([back])
    m = back["metrics"]
    for key in ("RER_domain", "RER_heldout", "erasure_rate_word", "retention_acc", "retention_acc_all", "pre_ASR",
                "ASR", "ASR_prefix", "ASR_ring_max", "ASR_inside_out", "KID", "KID_original"):
        cell = report.pooled_cell(key, units, expected=1)
        # KID from the side file's float32 features: equal to the float64 evaluation's within float32 rounding
        assert cell.value == pytest.approx(m[key], abs=1e-6 if key.startswith("KID") else 1e-12), key
        if cell.method == "wilson":
            assert (cell.low, cell.high) == pytest.approx((m[f"{key}_ci95_lo"], m[f"{key}_ci95_hi"])), key
    assert m["num_unet_calls"] > 0 and m["train_s"] > 0


# ---- the ablation study (studies/ablations.py) ----------------------------------------------------------------
def test_ablation_study_variants_change_one_part_of_sage_each():
    from sage_dist.presets import WORLD_ERASE
    from sage_dist.tune.grid import smoke_version

    module = load_study_module("ablations")
    study = module.study()
    assert study.variants[0].name == "sage" and study.reference_variant == "sage" and study.found_prompts
    assert study.red_team and study.fidelity.name == "full"
    full = study.variant_config(study.variants[0], 0)
    assert (full.erase.method, full.optim.num_steps, full.erase.rollout_cache) == ("sage", WORLD_ERASE["optim.num_steps"], True)
    full_flat = full.to_flat_dict()
    for v in study.variants[1:]:  # each variant differs from full SAGE in exactly its own override
        flat = study.variant_config(v, 0).to_flat_dict()
        assert {k for k in flat if flat[k] != full_flat[k]} == set(v.overrides), v.name
    cfg = {v.name: study.variant_config(v, 0) for v in study.variants}
    assert (cfg["h1_only"].attack.h2_weight, cfg["h2_only"].attack.h1_weight) == (0.0, 0.0)
    assert "found_prompt_concept_rate" in study.metrics and len(smoke_version(study).variants) == 3
    assert "--smoke-test" in module.__doc__ and "Command" in module.__doc__ and "runtime" in module.__doc__


@needs_world
def test_ablation_world_trial_measures_the_drift_of_its_found_prompts(tmp_path):
    """H2-only on the world (smoke budgets): the prompts its self-check found are rendered by the original model
    and judged; the counts are in the record and pool to the report's cell."""
    from sage_dist.tune import report
    from sage_dist.tune.grid import run_local, smoke_version, with_variants

    study = smoke_version(load_study_module("ablations").study(), {})
    study = with_variants(study, tuple(v for v in study.variants if v.name == "h2_only"), seeds=(0,))
    (record,) = run_local(study, tmp_path)
    assert record["status"] == "ok", record.get("error")
    m = record["metrics"]
    kept = m["found_prompts"]
    assert kept >= 1 and m["found_prompt_concept_rate_n"] == 2 * kept
    assert m["found_prompt_concept_rate"] == m["found_prompt_concept_rate_k"] / m["found_prompt_concept_rate_n"]
    vr = report.variant_records(study, [record])["h2_only"]
    cell = report.variant_cell("found_prompt_concept_rate", vr, expected=1)
    assert cell.method == "wilson" and (cell.low, cell.high) == pytest.approx(
        (m["found_prompt_concept_rate_ci95_lo"], m["found_prompt_concept_rate_ci95_hi"]))


# ---- the claims launcher (studies/claims.py) -----------------------------------------------------------------
def test_claims_builds_one_study_per_concept_and_the_ablations_with_five_seeds():
    from sage_dist.cli.studies import prepare

    sys.path.insert(0, str(REPO / "studies"))
    module = load_study_module("claims")
    fns, argv = module.parse_claims_args(["--concepts", "triangle,red", "--out", "x"])
    _, studies = prepare(fns, argv, "d")
    assert [s.name for s in studies] == ["methods_triangle", "methods_red", "ablations_triangle"]
    assert all(s.seeds == (0, 1, 2, 3, 4) for s in studies) and studies[1].base.erase.erase_concept == ("red",)
    fns, argv = module.parse_claims_args(["--parts", "ablations", "--seeds", "0"])
    assert [s.name for s in prepare(fns, argv, "d")[1]] == ["ablations_triangle"] and argv[-2:] == ["--seeds", "0"]
    with pytest.raises(ValueError, match="name each concept once"):
        module.parse_claims_args(["--concepts", "red,red"])
    with pytest.raises(ValueError, match="choose from methods, ablations"):
        module.parse_claims_args(["--parts", "methods,baselines"])


def test_an_interrupted_claims_launch_prints_its_whole_command_to_resume(tmp_path, monkeypatch, capsys):
    """The resume hint keeps the claims options (--parts, --concepts) that claims.py takes before the grid
    options: without them a resume would run every part and concept."""
    import shlex

    import sage_dist.cli.studies as cli

    sys.path.insert(0, str(REPO / "studies"))
    module = load_study_module("claims")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "launch", interrupted)
    out = tmp_path / "out dir"
    argv = ["--parts", "methods", "--concepts", "red", "--out", str(out), "--seeds", "0",
            "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--report", str(tmp_path / "r.md")]
    with pytest.raises(SystemExit) as exit_:
        module.run(argv)
    assert exit_.value.code == 130
    [line] = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("resume with: ")]
    assert shlex.split(line.removeprefix("resume with: "))[2:] == [*argv, "--resume"]
