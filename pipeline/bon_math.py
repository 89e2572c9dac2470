"""Best-of-N (BoN) estimation: pure math, no Ray.

Setting: for one prompt we hold a pool of ``N`` candidate completions, each with a proxy
(reward-model) score ``p_i`` and a gold score ``g_i``.  Best-of-n draws ``n`` of the ``N``
candidates uniformly *without replacement* and keeps the one with the highest proxy score.

Unbiased estimator (Nakano et al. 2021, "WebGPT", App.; Gao et al. 2022, "Scaling Laws for
Reward Model Overoptimization", Sec. 2): with the pool sorted ascending by proxy,
``g_(1), ..., g_(N)``, and no ties in the proxy,

    E[g_best-of-n] = sum_{i=n..N} C(i-1, n-1) / C(N, n) * g_(i)

because the ``i``-th lowest candidate wins exactly when it is drawn together with ``n-1`` of the
``i-1`` candidates below it.

Ties are handled exactly rather than by sort position (see :func:`expected_best_of_n`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

TABLE_COLUMNS: tuple[str, ...] = (
    "n",
    "kl",
    "gold_mean",
    "gold_ci_low",
    "gold_ci_high",
    "proxy_mean",
    "oracle_gold_mean",
)


@functools.lru_cache(maxsize=512)
def _subset_max_cdf(pool_size: int, n: int) -> np.ndarray:
    """``F[L] = C(L, n) / C(N, n)`` for ``L = 0..N``.

    ``F[L]`` is the probability that all ``n`` draws come from a fixed set of ``L`` candidates,
    i.e. that the subset's maximum lies among the ``L`` lowest.  Numerators and the
    denominator are exact Python integers and ``int / int`` is correctly rounded, so this does
    not overflow even for ``C(1024, 512) ~ 1e306``.  Cached because every prompt of a BoN
    table shares the same ``(N, n)``.
    """
    total = math.comb(pool_size, n)
    cdf = np.array([math.comb(size, n) / total for size in range(pool_size + 1)], dtype=np.float64)
    cdf.setflags(write=False)  # shared through the cache: must never be mutated
    return cdf


def _validate_pool(proxy: np.ndarray, gold: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    proxy = np.asarray(proxy, dtype=np.float64)
    gold = np.asarray(gold, dtype=np.float64)
    if proxy.ndim != 1 or proxy.shape != gold.shape:
        raise ValueError(f"proxy and gold must be 1-D and the same length, got {proxy.shape}, {gold.shape}")
    if not 1 <= n <= proxy.size:
        raise ValueError(f"n must be in [1, N={proxy.size}], got {n}")
    if np.isnan(proxy).any():
        # NaN breaks the ordering the estimator relies on; fail loudly instead of guessing.
        raise ValueError("proxy scores contain NaN")
    return proxy, gold


def expected_best_of_n(proxy: np.ndarray, gold: np.ndarray, n: int) -> float:
    """Exact expected gold score of the proxy-selected best-of-n from one pool of ``N``.

    Draw a uniformly random ``n``-subset of the ``N`` candidates (without replacement); the
    winner is the candidate with the highest proxy, chosen uniformly among those tied for it.

    Group the candidates by distinct proxy value ``v_1 < ... < v_m`` with sizes ``c_j`` and
    cumulative counts ``L_j = c_1 + ... + c_j`` (``L_0 = 0``).  The subset's maximum lies in
    group ``j`` iff all draws fall in the ``L_j`` lowest but not all in the ``L_{j-1}`` lowest:

        P(max in group j) = [C(L_j, n) - C(L_{j-1}, n)] / C(N, n)

    Given that event, group ``j``'s members are exchangeable, so each is equally likely to be the
    (uniformly tie-broken) winner and the conditional expected gold is the group mean ``gbar_j``:

        E[gold] = sum_j [C(L_j, n) - C(L_{j-1}, n)] / C(N, n) * gbar_j

    Without ties ``L_j = j`` and ``C(j, n) - C(j-1, n) = C(j-1, n-1)``, which recovers the
    Nakano et al. (2021) / Gao et al. (2022) estimator in the module docstring.
    """
    proxy, gold = _validate_pool(proxy, gold, n)
    values, group_of, group_size = np.unique(proxy, return_inverse=True, return_counts=True)
    del values  # only the grouping matters; np.unique already sorts groups ascending
    group_gold_mean = np.bincount(group_of, weights=gold) / group_size
    cdf = _subset_max_cdf(proxy.size, n)
    p_max_in_group = np.diff(cdf[np.concatenate(([0], np.cumsum(group_size)))])
    return float(np.dot(p_max_in_group, group_gold_mean))


def oracle_best_of_n(gold: np.ndarray, n: int) -> float:
    """Ceiling: best-of-n selected by the gold score itself.

    ``oracle(gold, n) = expected_best_of_n(gold, gold, n)``: the expected maximum gold score of a
    random ``n``-subset.
    """
    return expected_best_of_n(gold, gold, n)


def kl_best_of_n(n: int) -> float:
    """Analytic KL(best-of-n || base policy) = ``log n - (n - 1) / n`` nats.

    The analytic formula of Stiennon et al. (2020, App.) and Hilton, used by Gao et al. (2022):
    derived for a continuous reward distribution; in general it upper-bounds the true KL
    (Beirami et al. 2024).  ``kl(1) = 0``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return math.log(n) - (n - 1) / n


def bootstrap_ci(
    values: np.ndarray, *, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean.

    Resample the ``m`` values with replacement ``n_boot`` times, take each resample's mean
    ``mu*_b``, and return the ``alpha/2`` and ``1 - alpha/2`` quantiles of ``{mu*_b}``.
    The resampling unit is one value per prompt, so prompts (not candidates) are the
    independent units.
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    rng = np.random.default_rng(seed)
    resample_idx = rng.integers(0, values.size, size=(n_boot, values.size))
    boot_means = values[resample_idx].mean(axis=1)
    low, high = np.quantile(boot_means, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(low), float(high)


def n_grid(n_max: int) -> list[int]:
    """``[1, 2, 4, ..., 2^k, n_max]`` with ``2^k <= n_max``; ``n_max`` is always the last entry."""
    if n_max < 1:
        raise ValueError(f"n_max must be >= 1, got {n_max}")
    grid = [2**k for k in range(n_max.bit_length()) if 2**k <= n_max]
    if grid[-1] != n_max:
        grid.append(n_max)
    return grid


def best_of_n_table(
    pools: Sequence[tuple[np.ndarray, np.ndarray]],
    ns: Sequence[int],
    *,
    n_boot: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """One row per ``n`` with columns exactly :data:`TABLE_COLUMNS`.

    For each prompt ``k`` with pool ``(proxy_k, gold_k)``:

    - ``gold_mean``        = mean_k expected_best_of_n(proxy_k, gold_k, n)
    - ``gold_ci_low/high`` = percentile bootstrap CI over prompts of that mean
    - ``proxy_mean``       = mean_k expected_best_of_n(proxy_k, proxy_k, n)  (what the RM believes)
    - ``oracle_gold_mean`` = mean_k oracle_best_of_n(gold_k, n)               (selection ceiling)
    - ``kl``               = kl_best_of_n(n)

    Every pool must hold at least ``max(ns)`` candidates (use ``n_grid(min pool size)``).
    """
    if not pools:
        raise ValueError("best_of_n_table needs at least one pool")
    smallest = min(len(proxy) for proxy, _ in pools)
    if max(ns) > smallest:
        raise ValueError(f"n={max(ns)} exceeds the smallest pool size {smallest}")
    rows = [_table_row(pools, n, n_boot=n_boot, seed=seed) for n in ns]
    return pd.DataFrame(rows, columns=list(TABLE_COLUMNS))


def _table_row(
    pools: Sequence[tuple[np.ndarray, np.ndarray]], n: int, *, n_boot: int, seed: int
) -> dict[str, float]:
    gold = np.array([expected_best_of_n(p, g, n) for p, g in pools])
    proxy = np.array([expected_best_of_n(p, p, n) for p, _ in pools])
    oracle = np.array([oracle_best_of_n(g, n) for _, g in pools])
    low, high = bootstrap_ci(gold, n_boot=n_boot, seed=seed)
    return {
        "n": n,
        "kl": kl_best_of_n(n),
        "gold_mean": float(gold.mean()),
        "gold_ci_low": low,
        "gold_ci_high": high,
        "proxy_mean": float(proxy.mean()),
        "oracle_gold_mean": float(oracle.mean()),
    }


def summary_metrics(table: pd.DataFrame) -> dict[str, float]:
    """End points, the peak, and whether selecting by the reward model beat random selection (n = 1, the same
    pools): ``bon/beats_random`` is 1 when some n > 1 has its whole 95% gold CI above n = 1's gold;
    ``bon/clearest_n`` is the n > 1 whose CI reaches highest; ``bon/beats_random_up_to`` the largest n whose CI
    is above n = 1's gold (0: none); ``bon/overoptimised`` is 1 when gold falls after its peak by more than the
    largest n's CI allows (the whole interval at ``n_max`` below the peak's mean: the proxy is being exploited)."""
    first, last = table.iloc[0], table.iloc[-1]
    peak = table.loc[table["gold_mean"].idxmax()]
    rest = table[table["n"] > 1]
    clearest = rest.loc[rest["gold_ci_low"].idxmax()] if len(rest) else first
    above = rest[rest["gold_ci_low"] > first["gold_mean"]]
    return {"bon/gold_at_1": float(first["gold_mean"]), "bon/gold_at_nmax": float(last["gold_mean"]),
            "bon/gain": float(last["gold_mean"] - first["gold_mean"]),
            "bon/oracle_at_nmax": float(last["oracle_gold_mean"]), "bon/peak_n": int(peak["n"]),
            "bon/gold_at_peak": float(peak["gold_mean"]), "bon/clearest_n": int(clearest["n"]),
            "bon/clearest_gold": float(clearest["gold_mean"]), "bon/clearest_ci_low": float(clearest["gold_ci_low"]),
            "bon/beats_random": float(len(above) > 0),  # the clearest n's interval is above n = 1 iff any is
            "bon/beats_random_up_to": int(above["n"].max()) if len(above) else 0,
            "bon/overoptimised": float(int(peak["n"]) < int(last["n"]) and last["gold_ci_high"] < peak["gold_mean"])}


def verdict(metrics: Mapping[str, float]) -> str:
    """One line saying whether selecting by the reward model beat random selection, with the numbers."""
    random = metrics["bon/gold_at_1"]
    if metrics["bon/beats_random"]:
        line = (f"the reward model beats random selection: gold {metrics['bon/clearest_gold']:.3f} at "
                f"n={metrics['bon/clearest_n']} (95% CI from {metrics['bon/clearest_ci_low']:.3f}) vs {random:.3f} "
                f"at n=1; the curve peaks at n={metrics['bon/peak_n']} ({metrics['bon/gold_at_peak']:.3f})")
    else:
        line = (f"the reward model does NOT beat random selection: no n > 1 has its 95% CI above {random:.3f} "
                f"(n=1); the curve peaks at n={metrics['bon/peak_n']} ({metrics['bon/gold_at_peak']:.3f})")
    if metrics.get("bon/overoptimised"):
        line += (f"; past the peak gold falls to {metrics['bon/gold_at_nmax']:.3f}: over-optimisation, the policy's "
                 f"candidates exploit what the reward model gets wrong")
    return line
