"""95 % intervals: Wilson against hand-computed and published values, paired bootstraps, KID (docs/METHOD.md
"Evaluation")."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sage_dist.eval import metrics as m

Z = 1.959963984540054  # the 97.5 % standard-normal quantile


def _wilson_by_hand(k: int, n: int) -> tuple[float, float]:
    p = k / n
    centre = (p + Z * Z / (2 * n)) / (1 + Z * Z / n)
    half = Z * math.sqrt(p * (1 - p) / n + Z * Z / (4 * n * n)) / (1 + Z * Z / n)
    return centre - half, centre + half


@pytest.mark.parametrize("k, n, published", [
    (81, 263, (0.2553, 0.3662)),  # Newcombe (1998), Stat. Med. 17:857, Table I, method 3
    (15, 148, (0.0624, 0.1605)),
    (0, 20, (0.0000, 0.1611)),
    (1, 29, (0.0061, 0.1718)),
])
def test_wilson_interval_matches_hand_computed_and_published_values(k, n, published):
    low, high = m.wilson_interval(k, n)
    by_hand = _wilson_by_hand(k, n)
    assert low == pytest.approx(by_hand[0], abs=1e-12) and high == pytest.approx(by_hand[1], abs=1e-12)
    assert (round(low, 4), round(high, 4)) == published


def test_wilson_hand_computed_eight_of_ten():
    # p = 0.8, z^2 = 3.8415: centre (0.8 + 0.19207) / 1.38415 = 0.71676, half 0.31997 x 1.95996 / 1.38415 = 0.45308 / 2
    low, high = m.wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    rate, ci, n = m.rate_with_interval([True] * 8 + [False] * 2)
    assert rate == 0.8 and ci == (low, high) and n == 10


def test_wilson_rejects_bad_counts():
    for k, n in ((1, 0), (-1, 5), (6, 5)):
        with pytest.raises(ValueError, match="Wilson"):
            m.wilson_interval(k, n)
    with pytest.raises(ValueError, match="at least one image"):
        m.rate_with_interval([])


def test_rer_paired_bootstrap():
    rng = np.random.default_rng(0)
    original = rng.random(160) < 0.95
    edited = original & (rng.random(160) < 0.2)
    value, (low, high), n = m.rer_with_interval(edited, original, seed=0)
    assert value == pytest.approx(1 - edited.sum() / original.sum()) and n == 160
    assert low < value < high and 0.05 < high - low < 0.3
    assert m.rer_with_interval(edited, original, seed=0) == (value, (low, high), n)  # seeded
    # identical detections: RER exactly 0 and a zero-width interval
    assert m.rer_with_interval(original, original, seed=0) == (0.0, (0.0, 0.0), 160)
    # undefined when the original never shows the concept
    v, ci, _ = m.rer_with_interval(edited, np.zeros(160, bool), seed=0)
    assert math.isnan(v) and all(math.isnan(x) for x in ci)
    with pytest.raises(ValueError, match="equal length"):
        m.rer_with_interval(edited[:5], original, seed=0)


def test_rer_pairing_narrows_the_interval():
    """With the edited model's misses tied to the original's (same noise), resampling images jointly keeps the
    correlation; resampling the two counts independently would overstate the spread."""
    rng = np.random.default_rng(1)
    original = rng.random(200) < 0.7
    edited = original & (rng.random(200) < 0.9)
    _, (lo_p, hi_p), _ = m.rer_with_interval(edited, original, seed=0)
    unpaired = m.bootstrap_interval((edited.astype(float), original.astype(float)),
                                    lambda e, o, axis=-1: 1 - e.sum(axis) / o.sum(axis), paired=False, seed=0)
    assert hi_p - lo_p < 0.7 * (unpaired[1] - unpaired[0])


def test_rer_groups_average_per_concept_ratios():
    e = np.array([1, 0, 0, 0, 1, 1, 1, 0], bool)
    o = np.ones(8, bool)
    groups = [0, 0, 0, 0, 1, 1, 1, 1]
    value, _, _ = m.rer_with_interval(e, o, seed=0, groups=groups)
    assert value == pytest.approx(((1 - 1 / 4) + (1 - 3 / 4)) / 2)


def test_paired_differences():
    a = np.array([1.0, 0, 1, 1, 0, 1])
    assert m.paired_difference_with_interval(a, a, seed=0) == (0.0, (0.0, 0.0), 6)
    value, (low, high), _ = m.paired_difference_with_interval(a, np.zeros(6), seed=0)
    assert value == pytest.approx(4 / 6) and 0 < low < value < high <= 1
    d, (lo, hi), n = m.rer_difference_with_interval(np.zeros(6), a, np.ones(6), seed=0)
    assert d == pytest.approx(4 / 6) and lo <= d <= hi and n == 6  # RER_a 1.0 - RER_b (1 - 4/6)
    with pytest.raises(ValueError, match="at least 2"):
        m.bootstrap_interval((np.ones(1),), lambda x, axis=-1: x.mean(axis), paired=False, seed=0)


def test_kid_is_clean_fid_and_its_interval_covers_zero_under_the_null():
    from cleanfid.fid import kernel_distance

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(128, 16)), rng.normal(size=(128, 16))
    state = np.random.get_state()
    value, (low, high), n = m.kid_with_interval(a, b, seed=0, n_resamples=500)
    assert np.random.get_state()[1].tolist() == state[1].tolist()  # the global numpy RNG is left untouched
    np.random.seed(0)
    assert value == pytest.approx(kernel_distance(a, b, num_subsets=1, max_subset_size=128), rel=1e-9)
    assert n == 128 and low < 0 < high  # same distribution
    shifted = m.kid_with_interval(a, b + 0.5, seed=0, n_resamples=500)
    assert shifted[1][0] > 0  # a shifted distribution is told apart
    with pytest.raises(ValueError, match="same shape"):
        m.kid(a, b[:10])


def test_kid_bootstrap_never_pairs_an_image_with_its_own_copy():
    """The within-set term of a resample averages kernel values over pairs of distinct original images only:
    with duplicates counted, resampling with replacement would bias KID upwards by ~ (k(x, x) - k(x, y)) / N."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(6, 3))
    kernel = m._poly_kernel(x, x)
    index = np.array([[0, 0, 1, 2, 2, 2]])
    by_hand = [kernel[i, j] for a, i in enumerate(index[0]) for b, j in enumerate(index[0]) if i != j]
    assert m._within(m._counts(index, 6), kernel)[0] == pytest.approx(np.mean(by_hand))
    identity = m._counts(np.arange(6)[None], 6)
    assert m._within(identity, kernel)[0] == pytest.approx(kernel[~np.eye(6, dtype=bool)].mean())


def test_kid_difference_of_a_model_with_itself_is_zero():
    rng = np.random.default_rng(3)
    a, ref = rng.normal(size=(64, 8)), rng.normal(size=(64, 8))
    assert m.kid_difference_with_interval(a, a, ref, seed=0, n_resamples=200) == (0.0, (0.0, 0.0), 64)
    value, (low, high), _ = m.kid_difference_with_interval(a + 1.0, a, ref, seed=0, n_resamples=200)
    assert value > 0 and low > 0
