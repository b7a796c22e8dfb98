"""Study reports with intervals (sage_dist/tune/report.py): pooling per-image outcomes over seeds (Wilson on
pooled counts, stratified paired bootstrap for RER, pooled KID), paired comparisons on identical noise,
missing and failed trials, old-style records, and the bad-input checks of grid studies."""

from __future__ import annotations

import numpy as np
import pytest

from sage_dist.config import StudyConfig
from sage_dist.eval import metrics
from sage_dist.tune import report
from sage_dist.tune.grid import GridStudy, Variant, preflight


# ---- hand-made outcomes ------------------------------------------------------------------------------------
def outcomes(seed: int, *, word, synonyms, heldout, retain_shape=None, red_team=None, plan: str = "") -> dict:
    """World-trial outcomes of concept "triangle": each phrase set a pair (edited, original) of 0/1 lists;
    ``retain_shape`` a pair (edited, original) of 0/1 lists (shape read right) over neighbour images labelled
    circle, square, circle, square, ...; ``red_team`` (pre, {attack: post})."""
    sets = {"word": word, "synonyms": synonyms, "heldout": heldout}
    e_r, o_r = retain_shape or ([1, 1, 1, 1], [1, 1, 1, 1])
    n = len(e_r)
    labels = {"shape": [("circle", "square")[i % 2] for i in range(n)], "colour": ["red"] * n,
              "texture": ["solid"] * n}
    out = {"version": 1, "plan_hash": plan or f"plan{seed}", "first_seed": seed * 1_000_000,
           "concepts": ["triangle"], "attributes": ["shape"], "eval_seed": seed,
           "domain": {"triangle": {k: {"edited": list(v[0]), "original": list(v[1])} for k, v in sets.items()}},
           "retain": {"labels": labels,
                      "edited": {"shape": list(e_r), "colour": [1] * n, "texture": [1] * n},
                      "original": {"shape": list(o_r), "colour": [1] * n, "texture": [1] * n}}}
    if red_team is not None:
        pre, post = red_team
        out["red_team"] = {"triangle": {"prompts": [f"p{i}" for i in range(len(pre))],
                                        "seeds": [seed * 1_000_000 + 500_000 + i for i in range(len(pre))],
                                        "model_hash": "h", "pre": list(pre), "post": {k: list(v) for k, v in post.items()},
                                        "independent": [k for k in post if k != "inside_out"]}}
    return out


def record(variant: str, seed: int, status: str = "ok", out: dict | None = None, features=None, **metrics_):
    r = {"study": "demo", "variant": variant, "seed": seed, "status": status, "metrics": dict(metrics_),
         "curves": {}, "error": "" if status == "ok" else "RuntimeError: boom"}
    if out is not None:
        r["outcomes"] = out
    if features is not None:
        r["features"] = features
    return r


def study(*names: str, seeds=(0, 1, 2), metrics_=("RER_domain",), reference: str = "") -> GridStudy:
    return GridStudy(name="demo", question="q", base=StudyConfig(), variants=tuple(Variant(name=n) for n in names),
                     seeds=seeds, metrics=metrics_, plot_metrics=(), reference_variant=reference)


ONES8 = ([1] * 8, [1] * 8)


# ---- cells ---------------------------------------------------------------------------------------------------
def test_cell_text_forms():
    assert report.Cell(value=0.9, low=0.85, high=0.95, n=480, seeds=3, expected=3).text() == "0.9 ± 0.05 (480)"
    lopsided = report.Cell(value=1.0, low=0.992, high=1.0, n=480, seeds=3, expected=3).text()
    assert lopsided == "1 [0.992, 1] (480)"  # a Wilson interval at 1 is not written as ± (it cannot exceed 1)
    assert "(320; 2 of 3 seeds)" in report.Cell(value=0.9, low=0.85, high=0.95, n=320, seeds=2, expected=3).text()
    assert report.Cell(value=float("nan"), method="missing", expected=3).text() == "missing (0 of 3 seeds)"
    assert report.scalar_cell([1.0, 2.0, 3.0], 3).text() == "2 ± 2.5 (3 seeds)"  # t(0.975, 2) * 1 / sqrt(3)
    assert report.scalar_cell([4.0], 3).text() == "4 (no interval) (1 of 3 seeds)"
    assert report.scalar_cell([0.8, 1.0], 2, method="sd").text() == "0.9 ± 0.14 sd (2 seeds)"


def test_rates_pool_counts_over_seeds_with_a_wilson_interval():
    # erasure_rate_heldout: seed 0 erases 3 of 8 held-out images, seed 1 erases 5 of 8: pooled 8 of 16
    recs = [record("a", 0, out=outcomes(0, word=ONES8, synonyms=ONES8, heldout=([0] * 5 + [1] * 3, [1] * 8))),
            record("a", 1, out=outcomes(1, word=ONES8, synonyms=ONES8, heldout=([0] * 3 + [1] * 5, [1] * 8)))]
    units = report.Units.from_records(recs)
    cell = report.pooled_cell("erasure_rate_heldout", units, expected=2)
    assert (cell.value, cell.n, cell.method) == (0.5, 16, "wilson")
    assert (cell.low, cell.high) == pytest.approx(metrics.wilson_interval(8, 16))
    held = report.pooled_cell("concept_rate_heldout", units, expected=2)
    assert held.value == 0.5 and (held.low, held.high) == pytest.approx(metrics.wilson_interval(8, 16))


def test_a_per_trial_rate_with_its_counts_pools_over_seeds():
    # found_prompt_concept_rate: 6 of 8 images at seed 0, 2 of 8 at seed 1 -> 8 of 16 (not the mean of rates)
    recs = [record("a", 0, found_prompt_concept_rate=0.75, found_prompt_concept_rate_k=6, found_prompt_concept_rate_n=8),
            record("a", 1, found_prompt_concept_rate=0.2, found_prompt_concept_rate_k=2, found_prompt_concept_rate_n=10)]
    vr = report.variant_records(study("a", seeds=(0, 1)), recs)["a"]
    cell = report.variant_cell("found_prompt_concept_rate", vr, expected=2)
    assert (cell.value, cell.n, cell.method, cell.unit) == (8 / 18, 18, "wilson", "images")
    assert (cell.low, cell.high) == pytest.approx(metrics.wilson_interval(8, 18))
    # a record without the counts: the per-trial mean with a t interval, as for any per-trial number
    recs[1]["metrics"].pop("found_prompt_concept_rate_k")
    assert report.variant_cell("found_prompt_concept_rate", report.variant_records(
        study("a", seeds=(0, 1)), recs)["a"], expected=2).unit == "seeds"


def test_rer_pools_counts_and_one_seed_reproduces_the_trials_own_rer():
    e0, o0 = [0] * 6 + [1] * 2, [1] * 8  # 2 of 8 left: RER 0.75
    e1, o1 = [0] * 2 + [1] * 4 + [0, 0], [1] * 6 + [0, 0]  # 4 of 6: RER 1/3
    recs = [record("a", 0, out=outcomes(0, word=(e0, o0), synonyms=ONES8, heldout=ONES8)),
            record("a", 1, out=outcomes(1, word=(e1, o1), synonyms=ONES8, heldout=ONES8))]
    one = report.pooled_cell("RER_word", report.Units.from_records(recs[:1]), expected=1)
    value, (low, high), n = metrics.rer_with_interval(np.array(e0, bool), np.array(o0, bool), seed=0)
    assert one.value == pytest.approx(value) == 0.75 and one.n == n == 8
    pooled = report.pooled_cell("RER_word", report.Units.from_records(recs), expected=2)
    assert pooled.value == pytest.approx(1 - 6 / 14)  # pooled counts, not the mean of 0.75 and 1/3
    assert pooled.method == "bootstrap" and pooled.low < pooled.value < pooled.high and pooled.n == 16


def test_the_bootstrap_resamples_within_each_seed():
    """Seed 0's units are all 1, seed 1's all 0: a resample stratified by seed keeps 8 of each, so the pooled
    mean is 0.5 in every resample (interval [0.5, 0.5]); an unstratified bootstrap would move it."""
    strata = np.repeat([0, 1], 8)
    column = np.repeat([1.0, 0.0], 8)
    low, high = report.stratified_interval(strata, lambda idx: column[idx].mean(-1))
    assert low == high == 0.5
    low_u, high_u = metrics.bootstrap_interval((column,), lambda v, axis=-1: v.mean(axis), paired=False, seed=0)
    assert high_u - low_u > 0.2


def test_paired_comparison_separates_what_the_marginal_intervals_do_not():
    """B differs from A on 9 of 48 word images of the same prompts and noise (A shows the concept there, B
    does not): the marginal RER intervals overlap, the paired difference's interval excludes 0."""
    recs = []
    for seed in (0, 1, 2):
        e_a = np.array([1, 0] * 8)
        e_b = e_a.copy()
        e_b[[0, 2, 4]] = 0
        o = np.ones(16, dtype=int)
        for name, e in (("a", e_a), ("b", e_b)):
            recs.append(record(name, seed, out=outcomes(seed, word=(e, o), synonyms=ONES8, heldout=ONES8)))
    s = study("a", "b", metrics_=("RER_word",), reference="a")
    (comp,) = report.compare_variants(s, recs, "b", "a")
    assert comp.seeds == (0, 1, 2)
    assert comp.delta.value == pytest.approx(9 / 48)
    assert comp.delta.low > 0 and comp.verdict() == "yes: b higher (better)"
    a, b = comp.reference_cell, comp.variant_cell
    assert a.value == 0.5 and a.high > b.low  # the marginal intervals overlap
    table = report.comparison_table([comp])
    assert "| RER_word |" in table and "yes: b higher (better)" in table


def test_a_variant_against_itself_has_a_zero_difference():
    out = outcomes(0, word=([1, 0] * 4, [1] * 8), synonyms=ONES8, heldout=ONES8,
                   red_team=([0, 1, 0, 0], {"prefix": [1, 0, 0, 0], "ring_1": [0, 0, 1, 0], "inside_out": [0] * 4}))
    recs = [record("a", 0, out=out), record("b", 0, out=out)]
    s = study("a", "b", seeds=(0,), metrics_=("RER_word", "ASR", "retention_acc"), reference="a")
    for comp in report.compare_variants(s, recs, "b", "a"):
        assert comp.delta.value == 0 and comp.delta.low == comp.delta.high == 0
        assert comp.verdict() == "no: the interval contains 0"


def test_red_team_rates_pool_prompts_and_asr_counts_only_the_independent_attacks():
    rt0 = ([1, 0, 0, 0], {"prefix": [0, 1, 0, 0], "ring_1": [0, 0, 0, 0], "ring_2": [0, 1, 1, 0],
                          "inside_out": [0, 0, 0, 1]})
    rt1 = ([0, 0, 0, 0], {"prefix": [0, 0, 0, 0], "ring_1": [1, 0, 0, 0], "ring_2": [0, 0, 0, 0],
                          "inside_out": [1, 1, 1, 1]})
    recs = [record("a", s, out=outcomes(s, word=ONES8, synonyms=ONES8, heldout=ONES8, red_team=rt))
            for s, rt in ((0, rt0), (1, rt1))]
    units = report.Units.from_records(recs)
    cells = {k: report.pooled_cell(k, units, expected=2) for k in
             ("pre_ASR", "ASR", "post_ASR", "ASR_prefix", "ASR_ring_max", "ASR_inside_out")}
    assert cells["pre_ASR"].value == 1 / 8 and cells["pre_ASR"].n == 8 and cells["pre_ASR"].unit == "prompts"
    assert cells["ASR"].value == 4 / 8  # pre (1) + prefix or any ring strength (rows 1, 2 of seed 0; row 0 of seed 1)
    assert cells["post_ASR"].value == 3 / 8
    assert cells["ASR_prefix"].value == 2 / 8
    assert cells["ASR_ring_max"].value == 3 / 8  # strength 2: pre + 2 (strength 1: pre + 1)
    assert (cells["ASR_ring_max"].low, cells["ASR_ring_max"].high) == pytest.approx(metrics.wilson_interval(3, 8))
    assert cells["ASR_inside_out"].value == 6 / 8  # apart: not part of ASR


def test_retention_and_neighbours_pool_over_seeds():
    e, o = [1, 1, 0, 1, 1, 0, 1, 1], [1] * 8  # rows 2 (a circle) and 5 (a square) lose their shape
    recs = [record("a", s, out=outcomes(s, word=ONES8, synonyms=ONES8, heldout=ONES8, retain_shape=(e, o)))
            for s in (0, 1)]
    units = report.Units.from_records(recs)
    assert report.pooled_cell("retention_acc", units, 2).value == 12 / 16
    assert report.pooled_cell("retention_acc_original", units, 2).value == 1.0
    assert report.pooled_cell("neighbour_acc_circle", units, 2).value == 6 / 8  # rows 0, 2, 4, 6: row 2 lost
    assert report.pooled_cell("neighbour_acc_square", units, 2).value == 6 / 8  # rows 1, 3, 5, 7: row 5 lost
    drop = report.pooled_cell("retention_drop", units, 2)
    assert drop.value == pytest.approx(0.25) and drop.method == "bootstrap"


def test_kid_pools_the_seeds_kids_with_a_bootstrap():
    rng = np.random.default_rng(1)
    ref = np.abs(rng.normal(size=(24, 8)))
    feats = [{"edited": np.abs(rng.normal(size=(24, 8))) + 0.3 * s, "original": np.abs(rng.normal(size=(24, 8))),
              "reference": ref} for s in range(2)]
    recs = [record("a", s, out=outcomes(s, word=ONES8, synonyms=ONES8, heldout=ONES8), features=feats[s])
            for s in range(2)]
    units = report.Units.from_records(recs)
    cell = report.pooled_cell("KID", units, 2)
    expected = np.mean([metrics.kid(f["edited"], ref) for f in feats])
    assert cell.value == pytest.approx(expected) and cell.n == 48 and cell.low < cell.value < cell.high
    same = report.paired_delta("KID", units, units)
    assert same.value == 0 and same.low == same.high == 0
    delta = report.pooled_cell("KID_delta", units, 2)
    assert delta.value == pytest.approx(expected - np.mean([metrics.kid(f["original"], ref) for f in feats]))


def test_missing_and_failed_seeds_are_marked_never_averaged_silently(tmp_path):
    full = outcomes(0, word=([0] * 8, [1] * 8), synonyms=ONES8, heldout=ONES8)
    recs = [record("a", s, out={**full, "plan_hash": f"p{s}"}) for s in (0, 1, 2)]
    recs += [record("b", 0, out={**full, "plan_hash": "p0"}), record("b", 1, status="failed")]
    s = study("a", "b", "c", metrics_=("RER_word", "train_s"), reference="a")
    table = report.study_table(s, recs)
    assert "| a | 3 of 3 |" in table
    assert "| b | 1 of 3 (failed: 1; missing: 2) | 1 ± 0 (8; 1 of 3 seeds) |" in table
    assert "| c | 0 of 3 (missing: 0, 1, 2) | missing (0 of 3 seeds) | missing (0 of 3 seeds) |" in table
    (comp, _) = report.compare_variants(s, recs, "b", "a")
    assert comp.seeds == (0,)  # paired on the seed both finished
    path = report.write_report([s], {"demo": recs}, tmp_path / "r.md")
    text = path.read_text()
    assert "**b vs a** (paired seeds: 0; the study's: 0, 1, 2)" in text and "2 of 9 trials" not in text and "4 of 9 trials" in text


def test_a_study_with_no_finished_trial_says_so_instead_of_naming_an_aggregate(tmp_path):
    s = study("a", "b", metrics_=("RER_word",), reference="a")
    text = report.write_report([s], {"demo": [record("a", 0, status="failed")]}, tmp_path / "r.md").read_text()
    assert "0 of 6 trials finished" in text and "no trial finished, so every cell reads missing." in text
    assert "mean ± sd over seeds" not in text and "pooled over seeds" not in text


def test_the_grid_runs_seed_by_seed_so_a_stopped_study_has_whole_seeds(tmp_path):
    from sage_dist.tune.grid import grid_cells, pending_cells, write_record

    s = study("a", "b", seeds=(3, 1))
    assert [(v.name, seed) for v, seed in grid_cells(s)] == [("a", 3), ("b", 3), ("a", 1), ("b", 1)]
    write_record(tmp_path, record("a", 3))
    write_record(tmp_path, record("b", 3, status="failed"))
    assert [(v.name, seed) for v, seed in pending_cells(s, tmp_path)] == [("b", 3), ("a", 1), ("b", 1)]


def test_concurrent_studies_split_the_trial_slots_rounding_up():
    from sage_dist.tune.grid_runner import study_share

    assert [study_share(2, 0.5, n) for n in (1, 2, 3, 4, 5)] == [4, 2, 2, 1, 1]
    assert study_share(1, 2, 2) == 1  # a trial wider than the cluster still gets one slot (Ray then waits)
    assert study_share(0.7, 0.1, 2) == 4  # 7 slots, though 0.7 / 0.1 is 6.999... in floats
    with pytest.raises(ValueError, match="at least one study"):
        study_share(2, 0.5, 0)


def test_seeds_that_evaluated_other_images_are_not_paired():
    base = outcomes(0, word=ONES8, synonyms=ONES8, heldout=ONES8)
    recs = [record("a", 0, out=base), record("b", 0, out={**base, "plan_hash": "another"}),
            record("a", 1, out={**base, "plan_hash": "p1"}), record("b", 1, out={**base, "plan_hash": "p1"})]
    s = study("a", "b", seeds=(0, 1), metrics_=("RER_word",), reference="a")
    (comp,) = report.compare_variants(s, recs, "b", "a")
    assert comp.seeds == (1,)


def test_old_records_without_outcomes_read_as_mean_and_sd():
    recs = [record("a", 0, RER_domain=0.8), record("a", 1, RER_domain=1.0)]
    s = study("a", seeds=(0, 1))
    assert report.study_cells(s, recs)["RER_domain"]["a"].text() == "0.9 ± 0.14 sd (2 seeds)"
    assert "| a | 2 of 2 | 0.9 ± 0.14 sd (2 seeds) |" in report.study_table(s, recs)


# ---- bad input -------------------------------------------------------------------------------------------------
def test_the_claim_across_training_seeds_is_a_t_interval_over_per_seed_differences():
    """Per-seed Δ of b − ref: RER_domain 0.125 / 0.25 / 0.375 (mean 0.25, sd 0.125: ± t(0.975, 2) · 0.125 / √3 =
    ± 0.3105), retention_acc_all −0.25 every seed (no spread), ASR_prefix 0 / +0.25 / −0.25 (± 0.6211); c
    finished seed 0 only."""
    from sage_dist.tune.grid import Claim

    recs = [record("ref", seed, RER_domain=0.5, retention_acc_all=1.0, ASR_prefix=0.5) for seed in (0, 1, 2)]
    recs += [record("b", seed, RER_domain=0.5 + 0.125 * (seed + 1), retention_acc_all=0.75,
                    ASR_prefix=0.5 + (0.0, 0.25, -0.25)[seed]) for seed in (0, 1, 2)]
    recs += [record("c", 0, RER_domain=0.25, retention_acc_all=1.0, ASR_prefix=0.5)]
    s = GridStudy(name="demo", question="q", base=StudyConfig(), variants=tuple(Variant(name=n) for n in ("ref", "b", "c")),
                  metrics=("RER_domain",), plot_metrics=(), reference_variant="ref",
                  claim=Claim(text="ref is better.", erasure="RER_domain", retention="retention_acc_all",
                              robustness="ASR_prefix"))
    rows = {line.split(" | ")[0].strip("| "): line for line in report.seed_level_claim_table(s, recs)
            if line.startswith("| ") and not line.startswith("| baseline")}
    assert rows["b"] == ("| b | 3 | +0.25 [-0.0605, +0.561] (+3/−0) | -0.25 [-0.25, -0.25] (+0/−3) | "
                         "+0 [-0.621, +0.621] (+1/−1) |")
    assert rows["c"] == ("| c | 1 | -0.25 (1 seed, no interval) (+0/−1) | +0 (1 seed, no interval) (+0/−0) | "
                         "+0 (1 seed, no interval) (+0/−0) |")


def test_every_comparison_against_the_reference_has_its_across_seed_table():
    """Same per-seed Δ as above (b − ref RER_domain 0.125 / 0.25 / 0.375: +0.25 ± 0.3105), in the comparisons
    section of a study without a claim (the ablations); one seed of c gives no interval."""
    recs = [record("ref", seed, RER_domain=0.5) for seed in (0, 1, 2)]
    recs += [record("b", seed, RER_domain=0.5 + 0.125 * (seed + 1)) for seed in (0, 1, 2)]
    recs += [record("c", 0, RER_domain=0.25)]
    s = study("ref", "b", "c", reference="ref")
    table = report.seed_level_summary_table(s, recs).splitlines()
    assert table[0] == "| metric | b − ref | c − ref |"
    assert table[2] == "| RER_domain | +0.25 [-0.0605, +0.561] (+3/−0) | -0.25 (1 seed, no interval) (+0/−1) |"
    section = "\n".join(report.comparisons_section(s, recs))
    assert "Across training seeds" in section and table[2] in section
    assert "Across training seeds" not in "\n".join(report.comparisons_section(study("ref", "b", seeds=(0,), reference="ref"),
                                                                            recs[:1] + recs[3:4]))


def test_a_seed_list_with_a_repeated_seed_is_an_error():
    from sage_dist.cli.studies import parse_seeds

    with pytest.raises(ValueError, match=r"seeds \[0, 1, 1\] repeat \[1\]"):
        study("a", seeds=(0, 1, 1))
    with pytest.raises(ValueError, match=r"--seeds '0,0' repeats \[0\]"):
        parse_seeds("0,0")
    assert parse_seeds("2,0") == (2, 0) and parse_seeds("") == ()


def test_a_variant_needing_encoder_2_on_an_sd_model_fails_before_anything_runs():
    sd = GridStudy(name="dual", question="q", base=StudyConfig().replace_flat({"model.model_id": "world"}),
                   variants=(Variant(name="encoder2", overrides={"model.train_encoders": (1,)}),))
    with pytest.raises(ValueError, match="variant encoder2: model.train_encoders=\\(1,\\) trains text encoder 2, "
                                         "but model 'world' has 1 text encoder"):
        preflight(sd)
    xl = GridStudy(name="dual", question="q", base=StudyConfig().replace_flat({"model.model_id": "world-xl"}),
                   variants=(Variant(name="encoder2", overrides={"model.train_encoders": (1,)}),))
    preflight(xl)


def test_red_team_needs_a_fidelity_with_attacked_prompts():
    with pytest.raises(ValueError, match="red_team=True but the 'quick' fidelity attacks 0 prompts"):
        GridStudy(name="x", question="q", base=StudyConfig(), variants=(Variant(name="a"),), red_team=True)
    with pytest.raises(ValueError, match="reference_variant 'z' is not a variant"):
        GridStudy(name="x", question="q", base=StudyConfig(), variants=(Variant(name="a"),), reference_variant="z")


def test_claim_verdicts_from_paired_intervals():
    """The reference erases half of the concept images, keeps every retain image and resists the attack.
    "strong" erases all at equal retention (contradicts the claim), "weak" erases none and is attacked
    everywhere at equal retention (supports it), "tradeoff" erases all but loses half the retain images,
    "dominated" erases and resists as the reference does but loses half the retain images."""
    from sage_dist.tune.grid import Claim

    half, none_, all_ = ([1, 0] * 8, [1] * 16), ([1] * 16, [1] * 16), ([0] * 16, [1] * 16)
    keep, lose = ([1] * 16, [1] * 16), ([0, 1] * 8, [1] * 16)
    safe, attacked = ([0] * 8, {"prefix": [0] * 8}), ([1] * 8, {"prefix": [1] * 8})
    design = {"ref": (half, keep, safe), "strong": (all_, keep, safe), "weak": (none_, keep, attacked),
              "tradeoff": (all_, lose, safe), "dominated": (half, lose, safe)}
    recs = [record(name, seed, out=outcomes(seed, word=d, synonyms=d, heldout=d, retain_shape=r, red_team=t))
            for name, (d, r, t) in design.items() for seed in (0, 1, 2)]
    s = GridStudy(name="demo", question="q", base=StudyConfig(), variants=tuple(Variant(name=n) for n in design),
                  metrics=("RER_domain",), plot_metrics=(), reference_variant="ref",
                  claim=Claim(text="ref is better.", erasure="RER_domain", retention="retention_acc_all",
                              robustness="ASR_prefix"))
    lines = report.claim_verdicts(s, recs)
    claim_table = lines[:next(i for i, line in enumerate(lines) if line.startswith("Across training seeds"))]
    rows = {line.split(" | ")[0].strip("| "): line for line in claim_table if line.startswith("| ")}
    assert rows["strong"].endswith("| contradicted | not separable | **contradicted** |")
    assert rows["weak"].endswith("| supported | supported | **supported** |")
    assert rows["tradeoff"].endswith("| trade-off (unequal retention) | not separable; `ref` retains more | not "
                                     "judged at equal retention (trade-off) |")
    assert rows["dominated"].endswith("| not separable; `ref` retains more | not separable; `ref` retains more | not "
                                      "separable at this power; `ref` retains more (retention_acc_all) |")
    assert report.claim_verdicts(study("a", "b", reference="a"), recs) == []  # no claim: no section
