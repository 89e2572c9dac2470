"""Best-of-N estimator checks against brute-force enumeration and hand-computed values."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from pipeline.bon_math import (
    TABLE_COLUMNS,
    best_of_n_table,
    bootstrap_ci,
    expected_best_of_n,
    kl_best_of_n,
    n_grid,
    oracle_best_of_n,
)

pytestmark = pytest.mark.unit


def brute_force_best_of_n(proxy: np.ndarray, gold: np.ndarray, n: int) -> float:
    """Average over every n-subset of the gold of its winner, uniform among proxy-tied maxima."""
    values = []
    for subset in itertools.combinations(range(len(proxy)), n):
        top = max(proxy[i] for i in subset)
        winners = [gold[i] for i in subset if proxy[i] == top]
        values.append(sum(winners) / len(winners))
    return sum(values) / len(values)


def _random_pools(with_ties: bool, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    pools = []
    for size in range(1, 9):
        for _ in range(3):
            # Integer proxies from a small range force ties; continuous ones almost surely have none.
            proxy = rng.integers(0, 3, size).astype(float) if with_ties else rng.normal(size=size)
            pools.append((proxy, rng.normal(size=size)))
    return pools


@pytest.mark.parametrize("with_ties", [False, True])
def test_matches_brute_force_for_every_n(with_ties: bool) -> None:
    """Pools of N = 1..8, every n in 1..N: exact enumeration over C(N, n) subsets."""
    pools = _random_pools(with_ties, seed=1 if with_ties else 2)
    if with_ties:
        assert any(len(np.unique(p)) < len(p) for p, _ in pools)
    for proxy, gold in pools:
        for n in range(1, len(proxy) + 1):
            expected = brute_force_best_of_n(proxy, gold, n)
            assert expected_best_of_n(proxy, gold, n) == pytest.approx(expected, abs=1e-12)


def test_hand_computed_without_ties() -> None:
    """proxy = gold = [1, 2, 3] scaled to gold [10, 20, 30], n = 2.

    Subsets {1,2} -> 20, {1,3} -> 30, {2,3} -> 30, mean 80/3.  Formula: C(1,1)/C(3,2) * 20 +
    C(2,1)/C(3,2) * 30 = 20/3 + 60/3 = 80/3.
    """
    value = expected_best_of_n(np.array([1.0, 2.0, 3.0]), np.array([10.0, 20.0, 30.0]), 2)
    assert value == pytest.approx(80 / 3)


def test_hand_computed_with_tie() -> None:
    """proxy [1, 1, 2], gold [0, 6, 9], n = 2.

    Subsets {a,b} (tied, winner uniform) -> (0 + 6)/2 = 3, {a,c} -> 9, {b,c} -> 9; mean 21/3 = 7.
    Groups: P(max in {a,b}) = C(2,2)/C(3,2) = 1/3 (mean gold 3), P(max = c) = 2/3 -> 1 + 6 = 7.
    A positional tie-break would give 6 or 8 instead.
    """
    assert expected_best_of_n(np.array([1.0, 1.0, 2.0]), np.array([0.0, 6.0, 9.0]), 2) == pytest.approx(7.0)


def test_n_equals_one_is_mean_gold() -> None:
    rng = np.random.default_rng(3)
    proxy, gold = rng.integers(0, 2, 7).astype(float), rng.normal(size=7)
    assert expected_best_of_n(proxy, gold, 1) == pytest.approx(gold.mean())


def test_n_equals_pool_is_gold_of_argmax_averaged_over_ties() -> None:
    """Whole pool drawn: winner uniform among the proxy maxima (indices 1 and 3): (4 + 8)/2 = 6."""
    proxy = np.array([0.0, 5.0, 1.0, 5.0])
    gold = np.array([100.0, 4.0, -3.0, 8.0])
    assert expected_best_of_n(proxy, gold, 4) == pytest.approx(6.0)
    no_ties = np.array([0.0, 5.0, 1.0, 4.0])
    assert expected_best_of_n(no_ties, gold, 4) == pytest.approx(4.0)


def test_large_pool_no_overflow() -> None:
    """Expected max of a random n-subset of {1..N} is n(N + 1)/(n + 1); here values are 0..N-1."""
    pool, n = 1024, 512
    values = np.arange(pool, dtype=float)
    expected = n * (pool + 1) / (n + 1) - 1
    assert expected_best_of_n(values, values, n) == pytest.approx(expected, rel=1e-12)
    assert oracle_best_of_n(values, pool) == pytest.approx(pool - 1)


def test_oracle_is_best_of_n_on_gold_and_an_upper_bound() -> None:
    rng = np.random.default_rng(4)
    proxy, gold = rng.normal(size=8), rng.normal(size=8)
    for n in range(1, 9):
        assert oracle_best_of_n(gold, n) == pytest.approx(brute_force_best_of_n(gold, gold, n))
        assert oracle_best_of_n(gold, n) >= expected_best_of_n(proxy, gold, n) - 1e-12


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError):
        expected_best_of_n(np.zeros(3), np.zeros(3), 4)
    with pytest.raises(ValueError):
        expected_best_of_n(np.zeros(3), np.zeros(2), 1)
    with pytest.raises(ValueError):
        expected_best_of_n(np.array([0.0, np.nan]), np.zeros(2), 1)


def test_kl() -> None:
    """kl(1) = log 1 - 0 = 0; kl(2) = log 2 - 1/2; kl(4) = log 4 - 3/4."""
    assert kl_best_of_n(1) == 0.0
    assert kl_best_of_n(2) == pytest.approx(math.log(2) - 0.5)
    assert kl_best_of_n(4) == pytest.approx(math.log(4) - 0.75)


def test_bootstrap_ci_contains_mean_and_is_reproducible() -> None:
    rng = np.random.default_rng(5)
    values = rng.normal(loc=1.0, size=200)
    low, high = bootstrap_ci(values, n_boot=500, seed=7)
    assert low < values.mean() < high
    assert (low, high) == bootstrap_ci(values, n_boot=500, seed=7)
    assert bootstrap_ci(np.full(5, 2.5)) == (2.5, 2.5)


def test_n_grid() -> None:
    assert n_grid(1) == [1]
    assert n_grid(8) == [1, 2, 4, 8]
    assert n_grid(10) == [1, 2, 4, 8, 10]


def test_best_of_n_table() -> None:
    """Two pools of 4; n = 1 row equals plain means, kl column is analytic."""
    pools = [
        (np.array([1.0, 2.0, 3.0, 4.0]), np.array([0.0, 1.0, 0.0, 1.0])),
        (np.array([0.0, 0.0, 1.0, 1.0]), np.array([2.0, 0.0, 1.0, 3.0])),
    ]
    table = best_of_n_table(pools, n_grid(4), n_boot=200, seed=0)
    assert tuple(table.columns) == TABLE_COLUMNS
    assert table["n"].tolist() == [1, 2, 4]
    first = table.iloc[0]
    assert first["kl"] == 0.0
    assert first["gold_mean"] == pytest.approx((0.5 + 1.5) / 2)
    assert first["proxy_mean"] == pytest.approx((2.5 + 0.5) / 2)
    # n = 4 draws the whole pool: pool 1 picks gold 1; pool 2 picks the mean of the tied {1, 3} = 2.
    assert table.iloc[-1]["gold_mean"] == pytest.approx(1.5)
    assert (table["oracle_gold_mean"] >= table["gold_mean"] - 1e-12).all()
    assert (table["gold_ci_low"] <= table["gold_ci_high"]).all()
    with pytest.raises(ValueError):
        best_of_n_table(pools, [8], n_boot=10, seed=0)
