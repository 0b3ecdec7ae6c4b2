"""Drift and agreement numbers with known answers: PSI by hand, its ε floor, the union of
categories, PSI of live rows against training statistics, output PSI, agreement with
tolerances, and the Wilson interval."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from modelcd.analysis.drift import (
    agreement,
    categorical_psi,
    input_psi,
    output_psi,
    psi,
    psi_noise,
    wilson_interval,
)
from modelcd.analysis.statistics import compute_statistics


def test_psi_by_hand() -> None:
    e, a = [0.5, 0.5], [0.25, 0.75]
    want = (0.25 - 0.5) * math.log(0.25 / 0.5) + (0.75 - 0.5) * math.log(0.75 / 0.5)
    assert psi(e, a) == pytest.approx(want, rel=1e-12)
    assert psi([50, 50], [25, 75]) == pytest.approx(want, rel=1e-12)  # counts or shares: the same
    assert psi(a, e) == pytest.approx(want, rel=1e-12)  # symmetric


def test_psi_of_identical_distributions_is_zero() -> None:
    assert psi([10, 20, 30, 40], [10, 20, 30, 40]) == 0.0
    assert psi([1, 2, 3, 4], [100, 200, 300, 400]) == pytest.approx(0.0, abs=1e-15)


def test_empty_bins_are_floored_at_eps() -> None:
    # reference has nothing in bin 2: its share is taken as eps, not 0 (which would be infinite)
    got = psi([100, 0], [50, 50], eps=1e-4)
    want = (0.5 - 1.0) * math.log(0.5 / 1.0) + (0.5 - 1e-4) * math.log(0.5 / 1e-4)
    assert got == pytest.approx(want, rel=1e-12)
    assert psi([100, 0], [50, 50], eps=1e-2) < got  # a larger floor, a smaller penalty
    assert psi([100, 0, 0], [100, 0, 0]) == 0.0  # both empty: floored alike, no contribution


def test_psi_refuses_what_it_cannot_compare() -> None:
    for e, a in (([1, 2], [1, 2, 3]), ([0, 0], [1, 1]), ([1, -1], [1, 1]), ([1, float("nan")], [1, 1])):
        with pytest.raises(ValueError):
            psi(e, a)


def test_categorical_psi_is_over_the_union_of_categories() -> None:
    ref = {"a": 50, "b": 50}
    cur = {"b": 50, "c": 50}
    want = psi([50, 50, 0], [0, 50, 50])
    assert categorical_psi(ref, cur) == pytest.approx(want)
    assert categorical_psi(ref, {"a": 5, "b": 5}) == pytest.approx(0.0, abs=1e-15)


def test_psi_noise_matches_the_simulated_null_table() -> None:
    """integrations.md §13: null p99 0.044 at N = M = 1000, 0.117 at 10000 / 200, 10 bins."""
    assert psi_noise(1000, 1000, 10) == pytest.approx(0.044, abs=0.002)
    assert psi_noise(10000, 200, 10) == pytest.approx(0.117, abs=0.01)
    # with 100 current values the chi-square law is rougher: simulated 0.221, the approximation 8% under
    assert psi_noise(500, 100, 10, quantile=0.95) == pytest.approx(0.221, rel=0.1)


def test_shifted_normal_drifts_and_an_unshifted_one_does_not() -> None:
    rng = np.random.default_rng(5)
    train = pd.DataFrame({"x": rng.normal(0, 1, 100_000), "y": rng.normal(10, 2, 100_000)})
    stats = compute_statistics([train])
    same = input_psi(stats, pd.DataFrame({"x": rng.normal(0, 1, 5_000), "y": rng.normal(10, 2, 5_000)}))
    moved = input_psi(stats, pd.DataFrame({"x": rng.normal(1, 1, 5_000), "y": rng.normal(10, 2, 5_000)}))
    assert same["x"] < psi_noise(100_000, 5_000, 11) and same["y"] < 0.01
    assert moved["x"] > 0.25 and moved["y"] < 0.01
    assert list(moved) == ["x", "y"] and moved.rows == 5_000 and moved.missing == () and moved.extra == ()


def test_input_psi_takes_records_lists_and_columns_and_reports_missing_features() -> None:
    rng = np.random.default_rng(9)
    train = pd.DataFrame({"a": rng.normal(size=2_000), "b": rng.choice(["x", "y"], 2_000), "c": rng.normal(size=2_000)})
    stats = compute_statistics([train])
    records = [{"a": 0.1, "b": "x", "extra": 1}, {"a": -0.2, "b": "y", "extra": 2}]
    got = input_psi(stats, records)
    assert set(got) == {"a", "b"} and got.missing == ("c",) and got.extra == ("extra",) and got.rows == 2
    assert got.to_dict()["missing"] == ["c"]
    lists = input_psi(stats, [[0.1, "x", 0.3], [-0.2, "y", 0.1]])
    assert set(lists) == {"a", "b", "c"}
    columns = input_psi(stats, {"a": [0.1, -0.2], "b": ["x", "y"], "c": [0.3, 0.1]})
    assert columns == lists
    with pytest.raises(ValueError, match="3 features"):
        input_psi(stats, [[1.0, 2.0]])
    with pytest.raises(ValueError, match="no rows"):
        input_psi(stats, [])


def test_input_psi_sees_new_categories_and_missing_values() -> None:
    train = pd.DataFrame({"color": ["red", "blue"] * 500, "n": np.arange(1000.0)})
    stats = compute_statistics([train])
    same = input_psi(stats, pd.DataFrame({"color": ["red", "blue"] * 50, "n": np.arange(0.0, 1000.0, 10.0)}))
    assert same["color"] == pytest.approx(0.0, abs=1e-12) and same["n"] < 0.01
    new = input_psi(stats, pd.DataFrame({"color": ["green"] * 100, "n": [None] * 100}))
    assert new["color"] > 1 and new["n"] > 1  # everything in "other" / in the missing bin


def test_output_psi_numbers_and_labels() -> None:
    rng = np.random.default_rng(1)
    ref = rng.normal(size=20_000)
    assert output_psi(ref, rng.normal(size=20_000)) < 0.01
    assert output_psi(ref, rng.normal(1.0, 1, 20_000)) > 0.25
    labels = ["cat"] * 500 + ["dog"] * 500
    assert output_psi(labels, ["dog", "cat"] * 500) == pytest.approx(0.0, abs=1e-12)
    assert output_psi(labels, ["cat"] * 900 + ["dog"] * 100) > 0.25
    assert output_psi([0, 1, 2] * 100, [0, 1, 2, 3] * 75) > 0.25  # integers with few values are labels: 3 is new
    assert output_psi([True, False] * 50, [True] * 100) > 1
    with pytest.raises(ValueError, match="one position"):
        output_psi([[0.1, 0.9]], [[0.2, 0.8]])


def test_agreement_of_labels() -> None:
    r = agreement(["a", "b", "c", "a"], ["a", "b", "a", "a"])
    assert (r.n, r.agreed, r.rate) == (4, 3, 0.75)
    assert agreement([0, 1, 2], [0, 1, 2]).rate == 1.0
    assert agreement([1, 2], [1, 3], rtol=0.5).agreed == 1  # integers are labels: no tolerance
    assert agreement([True, False], [1, 0]).agreed == 0  # a boolean is not the number 1


def test_agreement_of_numbers_with_rtol_and_atol() -> None:
    champion = [100.0, 100.0, 0.0, 0.0, float("nan")]
    candidate = [100.09, 100.2, 5e-7, 2e-6, float("nan")]
    r = agreement(champion, candidate, rtol=1e-3, atol=1e-6)
    assert r.agreed == 3 and r.rtol == 1e-3 and r.atol == 1e-6  # 100.09 within 0.1; 5e-7 within atol; NaN = NaN
    # asymmetric, as numpy's isclose: the tolerance scales with the champion
    assert agreement([1.0], [1.5], rtol=0.4, atol=0).agreed == 0
    assert agreement([1.5], [1.0], rtol=0.4, atol=0).agreed == 1
    assert agreement(np.array([1.0, 2.0]), np.array([1.0, 2.0])).rate == 1.0


def test_list_valued_outputs_agree_only_when_every_element_does() -> None:
    champion = [[0.1, 0.9], [0.5, 0.5], [0.3, 0.7], {"p": 0.4}]
    candidate = [[0.1, 0.9], [0.5, 0.51], [0.3], {"p": 0.4}]
    assert agreement(champion, candidate, rtol=1e-3).agreed == 2


def test_agreement_refuses_unpaired_outputs() -> None:
    with pytest.raises(ValueError, match="pair them"):
        agreement([1, 2], [1])
    with pytest.raises(ValueError, match="nothing to compare|no outputs"):
        agreement([], [])


def test_wilson_interval_known_values() -> None:
    low, high = wilson_interval(81, 263)  # worked by hand: p = 0.308, z = 1.96, centre 0.3107, half-width 0.0555
    assert (round(low, 4), round(high, 4)) == (0.2553, 0.3662)
    low, high = wilson_interval(50, 50)
    assert low == pytest.approx(50 / (50 + 1.959964**2), rel=1e-6) and high == 1.0
    assert wilson_interval(0, 10)[0] == 0.0
    r = agreement([1] * 1000, [1] * 990 + [0] * 10)
    assert r.wilson_low < r.rate < r.wilson_high and r.wilson_high - r.wilson_low < 0.02
    assert r.to_dict()["confidence"] == 0.95
