"""BT vs NormBT (or any loss settings) compared over seeds: the grid of trials, Student-t intervals of each setting's
mean and of the paired difference (paired by seed), and the bar plot. Pure: no Ray.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.artifacts import save_png
from pipeline.config import PipelineConfig


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float, int]:
    """``(mean, low, high, n)`` of the Student-t interval over the finite ``values``; bounds NaN when n < 2."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    n = len(x)
    if n == 0:
        return math.nan, math.nan, math.nan, 0
    mean = float(x.mean())
    if n < 2:
        return mean, math.nan, math.nan, 1
    from scipy import stats

    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * float(x.std(ddof=1)) / math.sqrt(n)
    return mean, mean - half, mean + half, n


def loss_label(setting: Mapping[str, Any]) -> str:
    """A short name for a loss setting: ``bt`` for ``{loss.name: bt}``, else ``name=bt,beta=0.5``."""
    if set(setting) == {"loss.name"}:
        return str(setting["loss.name"])
    return ",".join(f"{k.removeprefix('loss.')}={plain(v)}" for k, v in setting.items()) or "base"


def compare_settings(cfg: PipelineConfig) -> list[tuple[str, dict[str, Any]]]:
    """``(label, setting)`` of every ``tune.losses`` entry (labels made unique by ``#i``)."""
    settings = [dict(s) for s in cfg.tune.losses]
    if len(settings) < 2:
        raise ValueError("tune.losses: compare mode needs at least two loss settings")
    labels = [loss_label(s) for s in settings]
    labels = [f"{lab}#{i}" if labels.count(lab) > 1 else lab for i, lab in enumerate(labels)]
    return list(zip(labels, settings, strict=True))


def setting_lr(cfg: PipelineConfig, setting: Mapping[str, Any], chosen: Mapping[str, float], label: str) -> float:
    """The lr a setting trains at: its own ``train.lr``, else the one chosen for it on validation, else the
    trials' (``train.lr`` after ``tune.trial_overrides``)."""
    if "train.lr" in setting:
        return float(setting["train.lr"])
    if label in chosen:
        return float(chosen[label])
    return float(cfg.tune.trial_overrides.get("train.lr", cfg.train.lr))


def compare_grid(cfg: PipelineConfig, lrs: Mapping[str, float] | None = None) -> list[dict[str, Any]]:
    """The compare trials in grid order: ``{"loss": label, "seed": s, "setting": {...}, "lr": lr,
    "overrides": {...}}``; ``lrs`` (label → lr chosen on validation, :func:`choose_lrs`) sets ``train.lr`` of
    the settings that do not fix it themselves."""
    grid = []
    for label, setting in compare_settings(cfg):
        lr = setting_lr(cfg, setting, lrs or {}, label)
        own = {"train.lr": lr} if lrs and label in lrs and "train.lr" not in setting else {}
        for i in range(cfg.tune.seeds):
            seed = cfg.train.seed + i
            grid.append({"loss": label, "seed": seed, "setting": setting, "lr": lr,
                         "overrides": {**setting, **own, "train.seed": seed, "model.seed": seed}})
    return grid


def lr_search_grid(cfg: PipelineConfig) -> list[dict[str, Any]]:
    """The validation-only lr search before a comparison: every setting without its own ``train.lr`` × each of
    ``tune.compare_lr_grid`` × ``tune.compare_lr_seeds`` seeds; cells like :func:`compare_grid`'s."""
    grid = []
    for label, setting in compare_settings(cfg):
        if "train.lr" in setting:
            continue
        for lr in cfg.tune.compare_lr_grid:
            for i in range(cfg.tune.compare_lr_seeds):
                seed = cfg.train.seed + i
                grid.append({"loss": label, "seed": seed, "setting": setting, "lr": float(lr),
                             "overrides": {**setting, "train.lr": float(lr), "train.seed": seed,
                                           "model.seed": seed}})
    return grid


def choose_lrs(records: Sequence[Mapping[str, Any]], metric: str) -> tuple[pd.DataFrame, dict[str, float]]:
    """Per setting, the lr with the highest mean validation ``metric`` over its seeds (ties: the smaller lr).

    ``records``: one per lr-search trial with ``loss``, ``lr``, ``seed``, ``status`` and ``metric``; only
    completed trials with a finite metric count. Returns the per (setting, lr) table (``loss, lr, mean, n,
    chosen``) and ``{label: lr}``. A setting none of whose trials finished is an error naming it."""
    frame = pd.DataFrame.from_records(records, columns=["loss", "lr", "seed", "status", metric])
    ok = frame[(frame["status"] == "COMPLETED") & frame[metric].map(finite)].astype({metric: float})
    table = (frame[["loss", "lr"]].drop_duplicates()
             .merge(ok.groupby(["loss", "lr"], as_index=False).agg(mean=(metric, "mean"), n=(metric, "size")),
                    how="left", on=["loss", "lr"]).fillna({"n": 0}))
    chosen = {}
    for label, rows in table.groupby("loss", sort=False):
        rows = rows[rows["mean"].map(finite)]
        if rows.empty:
            raise RuntimeError(f"lr search: no trial of {label!r} completed with a finite {metric!r}")
        best = rows.sort_values(["mean", "lr"], ascending=[False, True]).iloc[0]
        chosen[str(label)] = float(best["lr"])
    table["chosen"] = [chosen.get(lab) == lr for lab, lr in zip(table["loss"], table["lr"], strict=True)]
    return table.astype({"n": int}), chosen


def compare_table(records: Sequence[Mapping[str, Any]], metric_names: Sequence[str], labels: Sequence[str],
                  confidence: float = 0.95) -> pd.DataFrame:
    """Per metric: mean and t-interval over seeds for each loss label, then the paired difference of each
    later label minus the first (seeds present in both). ``records`` hold ``loss``, ``seed`` and the metrics."""
    rows = []
    frame = pd.DataFrame.from_records(records)
    first = labels[0]
    for metric in metric_names:
        per = {lab: _by_seed(frame, lab, metric) for lab in labels}
        for lab in labels:
            mean, low, high, n = t_interval(list(per[lab].values()), confidence)
            rows.append({"loss": lab, "metric": metric, "mean": mean, "ci_low": low, "ci_high": high, "n": n})
        for lab in labels[1:]:
            seeds = sorted(set(per[lab]) & set(per[first]))
            diffs = [per[lab][s] - per[first][s] for s in seeds]
            mean, low, high, n = t_interval(diffs, confidence)
            name = "diff" if len(labels) == 2 else f"diff:{lab}-{first}"
            rows.append({"loss": name, "metric": metric, "mean": mean, "ci_low": low, "ci_high": high, "n": n})
    return pd.DataFrame(rows, columns=["loss", "metric", "mean", "ci_low", "ci_high", "n"])


def _by_seed(frame: pd.DataFrame, label: str, metric: str) -> dict[int, float]:
    if frame.empty or metric not in frame:
        return {}
    sel = frame[frame["loss"] == label]
    return {int(s): float(v) for s, v in zip(sel["seed"], sel[metric], strict=True) if finite(v)}


def is_compared(name: str) -> bool:
    """A benchmark metric the compare table keeps: ``<bench>/overall``, ``<bench>/section/<S>`` and RM-Bench's
    ``<bench>/easy|normal|hard`` (style against substance: where close-response judgement shows)."""
    parts = name.split("/")
    return name.endswith("/overall") or "/section/" in name or (len(parts) == 2 and parts[1] in ("easy", "normal",
                                                                                                "hard"))


def compare_metric_names(names: Sequence[str], metric: str) -> list[str]:
    """The compared metrics: the validation metric, then per benchmark its overall score, RM-Bench's difficulty
    levels and its sections."""
    bench = [n for n in names if is_compared(n)]
    return [metric, *sorted(bench, key=lambda n: (n.split("/")[0], "/section/" in n, not n.endswith("/overall"), n))]


def plot_compare(table: pd.DataFrame, path: str | Path) -> Path:
    """Bars with 95% CI whiskers: left the loss settings per metric, right the paired difference(s)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metric_names = list(dict.fromkeys(table["metric"]))
    is_diff = table["loss"].str.startswith("diff")
    groups = [list(dict.fromkeys(table.loc[~is_diff, "loss"])), list(dict.fromkeys(table.loc[is_diff, "loss"]))]
    fig = Figure(figsize=(max(8.0, 1.6 * len(metric_names) * 2), 4.8))
    FigureCanvasAgg(fig)
    x = np.arange(len(metric_names))
    titles = ("mean over seeds (95% CI)", "paired difference (95% CI)")
    for col, (labels, title) in enumerate(zip(groups, titles, strict=True)):
        ax = fig.add_subplot(1, 2, col + 1)
        width = 0.8 / max(1, len(labels))
        for i, label in enumerate(labels):
            sub = table[table["loss"] == label].set_index("metric").reindex(metric_names)
            mean = sub["mean"].to_numpy(dtype=float)
            err = np.vstack([mean - sub["ci_low"].to_numpy(dtype=float), sub["ci_high"].to_numpy(dtype=float) - mean])
            ax.bar(x + (i - (len(labels) - 1) / 2) * width, np.nan_to_num(mean), width,
                   yerr=np.nan_to_num(err), capsize=3, label=label)
        if col == 1:
            ax.axhline(0.0, color="black", linewidth=0.8)
        else:
            ax.set_ylim(0.0, 1.05)
        ax.set_xticks(x)
        ax.set_xticklabels([m.replace("/section/", "\n") for m in metric_names], rotation=45, ha="right",
                           fontsize="small")
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
        if labels:
            ax.legend(fontsize="small")
    return save_png(fig, path)


def plain(value: Any) -> Any:
    """numpy scalars → Python (labels, config coercion and JSON want plain types)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def finite(value: Any) -> bool:
    """A number (or numeric string) that is not NaN or infinite."""
    try:
        return value is not None and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


# ---------------------------------------------------------------- paired statistics over pairs and training runs
# The question a comparison answers is "does this loss help, over training runs and prompts", so the difference is
# judged against both sources of variation: the seeds (a training run is a draw; two runs of one loss differ by
# points) and the pairs (the benchmark is a sample of prompts). Holding the trained models fixed and resampling
# pairs only (the conditional interval and McNemar's test below) answers a narrower question, "do these particular
# trained models differ on prompts like these", and is reported as such.

Z_95, Z_80 = 1.959963984540054, 0.8416212335729143  # two-sided 5% level; 80% power
MDE_TARGET = 0.03  # the effect ``seeds_for_mde`` plans for: 3 accuracy points


def _kept_differences(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``b - a`` per pair and seed, rows with a NaN anywhere left out (shapes checked)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"paired scores need equal [pairs, seeds] shapes, got {a.shape} and {b.shape}")
    keep = ~(np.isnan(a).any(axis=1) | np.isnan(b).any(axis=1))
    return b[keep] - a[keep]


def _resample_counts(rng: np.random.Generator, n: int, n_boot: int) -> np.ndarray:
    """``[n_boot, n]`` how often each of ``n`` items is drawn in each resample (n draws with replacement): the
    resampled mean of any per-item vector ``x`` is then ``counts @ x / n``, one matrix product for all resamples."""
    draws = rng.integers(0, n, size=(n_boot, n)) + n * np.arange(n_boot)[:, None]
    return np.bincount(draws.ravel(), minlength=n_boot * n).reshape(n_boot, n).astype(np.float64)


def paired_bootstrap(a: np.ndarray, b: np.ndarray, *, confidence: float = 0.95, target: float = MDE_TARGET
                     ) -> dict[str, float]:
    """The difference ``mean(b) - mean(a)`` over pairs and seeds with an interval over training runs and pairs.

    What a two-level bootstrap estimates (draw the seeds with replacement, a seed's column of ``a`` and ``b``
    together, then the pairs, shared by the drawn seeds since every seed scored the same pairs: the crossed
    "pigeonhole" bootstrap, Owen 2007, Ann. Appl. Stat. 1(2)), computed in closed form instead of by resampling.
    The cell differences ``d[i, j]`` follow the two-way random-effects model ``d = diff + pair_i + seed_j +
    cell_ij``, so ``Var(mean d) = σ²_pair/n + σ²_seed/k + σ²_cell/(n·k)``; the row, column and residual mean
    squares estimate the three (``E s²_rows = σ²_pair + σ²_cell/k``, ``E s²_cols = σ²_seed + σ²_cell/n``).
    Closed form because a resampling bootstrap gets two things wrong here that matter: over k seeds it has
    ``(k-1)/k`` of the unbiased variance with normal tails (at k = 5 a nominal 95% percentile interval covered
    about 85% in simulation), and resampling both levels counts the cell noise twice (Owen 2007), which at
    small seed variance makes the interval about √2 too wide. So: ``se² = s²_rows/n + max(0, s²_cols - s²_cell/n)/k``
    (unbiased), the interval ``diff ± t_ν · se`` with ``ν`` the Welch-Satterthwaite degrees of freedom of the
    pair part (``n-1``) and the seed part (``k-1``). tests/test_evidence.py checks coverage and power by simulation.

    Args:
        a, b: per-pair scores (1/0 correctness or a credit in [0, 1]), shape ``[n_pairs, n_seeds]``, row ``i`` the
            same benchmark pair in both, column ``j`` the same seed. Rows with a NaN anywhere are left out.
        confidence: of the interval.
        target: the effect ``seeds_for_mde`` plans for (default 3 accuracy points).

    Returns:
        ``diff``, ``ci_low``, ``ci_high``, ``se``, ``mde`` (the smallest difference a two-sided 5% test detects
        with 80% power at this ``se``: ``(t_ν,0.975 + t_ν,0.8) · se``), ``n_pairs``, ``n_seeds``, ``p_value``
        (two-sided, ``diff / se`` against ``t_ν``), ``se_seeds`` and ``se_pairs`` (the two parts of ``se``),
        ``df`` (``ν``) and ``seeds_for_mde`` (:func:`seeds_for_mde` at these variances). With one seed the
        seed-to-seed variance is unknown: everything but ``diff`` and the counts is NaN
        (:func:`conditional_bootstrap` still answers for the trained models).
    """
    d = _kept_differences(a, b)
    n, k = d.shape
    out = {"diff": float(d.mean()) if d.size else math.nan, "ci_low": math.nan, "ci_high": math.nan,
           "se": math.nan, "mde": math.nan, "n_pairs": n, "n_seeds": k, "p_value": math.nan,
           "se_seeds": math.nan, "se_pairs": math.nan, "df": math.nan, "seeds_for_mde": math.nan}
    if n < 2 or k < 2:
        return out
    rows, cols = d.mean(axis=1), d.mean(axis=0)
    cell = float(np.square(d - rows[:, None] - cols[None, :] + d.mean()).sum()) / ((n - 1) * (k - 1))
    row_ms, col_ms = float(rows.var(ddof=1)), float(cols.var(ddof=1))
    # Var(mean d) = (σ²_seed + σ²_cell/n)/k + σ²_pair/n: the first part is the seed means' own variance, a clean
    # k-1 degrees of freedom estimate (splitting the cell noise off it would leave a noisy difference whose
    # Satterthwaite df overstates what 2-10 seeds know); the second, the pairs' part, is estimated from n pairs.
    var_seeds, var_pairs = col_ms / k, max(0.0, row_ms - cell / k) / n
    se = math.sqrt(var_seeds + var_pairs)
    df = _satterthwaite(var_seeds, k - 1, var_pairs, n - 1)
    out.update(se=se, se_seeds=math.sqrt(var_seeds), se_pairs=math.sqrt(var_pairs), df=df)
    out.update(_t_summary(out["diff"], se, df, confidence))
    out["seeds_for_mde"] = seeds_for_mde(max(0.0, col_ms - cell / n), var_pairs * n, cell, n, target=target)
    return out


def _satterthwaite(var_a: float, df_a: int, var_b: float, df_b: int) -> float:
    """Welch-Satterthwaite degrees of freedom of ``var_a + var_b`` (each estimated with its own df)."""
    total = var_a + var_b
    if total <= 0.0:
        return float(df_a + df_b)
    return total**2 / (var_a**2 / df_a + var_b**2 / df_b)


def _t_summary(diff: float, se: float, df: float, confidence: float) -> dict[str, float]:
    from scipy import stats

    if se <= 0.0:  # every cell difference equal: no variation seen at all
        return {"ci_low": diff, "ci_high": diff, "mde": 0.0, "p_value": 1.0 if diff == 0 else 0.0}
    half = float(stats.t.ppf(0.5 + confidence / 2, df)) * se
    mde = float(stats.t.ppf(0.975, df) + stats.t.ppf(0.8, df)) * se
    p = float(2 * stats.t.sf(abs(diff) / se, df))
    return {"ci_low": diff - half, "ci_high": diff + half, "mde": mde, "p_value": p}


def seeds_for_mde(seed_variance: float, pair_variance: float, cell_variance: float, n_pairs: int, *,
                  target: float = MDE_TARGET, max_seeds: int = 1000) -> float:
    """Seeds per loss at which :func:`paired_bootstrap`'s MDE (two-sided 5%, 80% power) reaches ``target``.

    With k seeds on the same ``n`` pairs, ``se² = (seed_variance + cell_variance/n)/k + pair_variance/n``, split
    and given degrees of freedom as in :func:`paired_bootstrap` (``σ²_seed``, ``σ²_pair``, ``σ²_cell`` there). ``inf`` when the pairs alone keep the MDE above ``target`` (more pairs are needed, not
    seeds) or it needs more than ``max_seeds``; NaN when a component is unknown."""
    from scipy import stats

    if not all(math.isfinite(v) for v in (seed_variance, pair_variance, cell_variance)):
        return math.nan
    for k in range(2, max_seeds + 1):
        part_seeds, part_pairs = (seed_variance + cell_variance / n_pairs) / k, pair_variance / n_pairs
        df = _satterthwaite(part_seeds, k - 1, part_pairs, n_pairs - 1)
        if float(stats.t.ppf(0.975, df) + stats.t.ppf(0.8, df)) * math.sqrt(part_seeds + part_pairs) <= target:
            return float(k)
    return math.inf


def conditional_bootstrap(a: np.ndarray, b: np.ndarray, *, n_boot: int = 2000, seed: int = 0,
                          confidence: float = 0.95) -> dict[str, float]:
    """Conditional on these trained models: the difference with a percentile bootstrap interval over pairs only.

    The seeds are held fixed (a row keeps all its seeds), so the interval says whether *these* trained models
    differ on prompts like these, not whether the loss helps over training runs (:func:`paired_bootstrap`).

    Args:
        a, b: per-pair scores ``[n_pairs, n_seeds]`` as in :func:`paired_bootstrap`. Rows with NaN are left out.

    Returns:
        ``diff``, ``ci_low``, ``ci_high``, ``se`` (the resamples' standard deviation), ``mde``
        (``(z_0.975 + z_0.8) * se``), ``n_pairs``, ``n_seeds``.
    """
    if n_boot < 2:
        raise ValueError(f"n_boot must be >= 2 (the interval needs resamples), got {n_boot}")
    per_pair = _kept_differences(a, b).mean(axis=1)  # each pair's difference, averaged over its seeds
    n = len(per_pair)
    if n == 0:
        return {"diff": math.nan, "ci_low": math.nan, "ci_high": math.nan, "se": math.nan, "mde": math.nan,
                "n_pairs": 0, "n_seeds": int(np.shape(a)[1])}
    rng = np.random.default_rng(seed)
    means = _resample_counts(rng, n, n_boot) @ per_pair / n
    tail = (1.0 - confidence) / 2
    se = float(means.std(ddof=1))
    return {"diff": float(per_pair.mean()), "ci_low": float(np.quantile(means, tail)),
            "ci_high": float(np.quantile(means, 1.0 - tail)), "se": se, "mde": (Z_95 + Z_80) * se,
            "n_pairs": n, "n_seeds": int(np.shape(a)[1])}


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjustment of a family of p-values (Holm 1979, Scand. J. Statist. 6(2)): the i-th
    smallest becomes ``max_{j<=i} min(1, (m - j + 1) p_(j))``; NaN entries stay NaN and do not count in ``m``."""
    p = np.asarray(p_values, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    finite_at = np.flatnonzero(np.isfinite(p))
    m = len(finite_at)
    if m == 0:
        return out
    order = finite_at[np.argsort(p[finite_at], kind="stable")]
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
    out[order] = np.maximum.accumulate(scaled)
    return out


def holm_by_comparison(table: pd.DataFrame, p_column: str = "p_value", out_column: str = "p_holm") -> pd.DataFrame:
    """``table`` (paired statistics, one row per benchmark × scope × compared loss) with ``out_column``: Holm's
    adjustment of ``p_column`` within each comparison (``loss`` vs ``versus``) across its benchmarks and scopes."""
    if table.empty:
        return table.assign(**{out_column: pd.Series(dtype=float)})
    adjusted = pd.Series(np.nan, index=table.index)
    for _, rows in table.groupby(["loss", "versus"], sort=False):
        adjusted[rows.index] = holm(rows[p_column].to_numpy(dtype=float))
    return table.assign(**{out_column: adjusted})


def mcnemar(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Conditional on these trained models: McNemar's exact test over pairs. ``only_a`` = pairs ``a`` gets right more often than ``b`` (over the seeds),
    ``only_b`` the reverse; under "no difference" each such pair is a fair coin, so the two-sided p-value is the
    binomial tail of ``min(only_a, only_b)``. With one seed this is the textbook test on 1/0 correctness; with
    several, a pair counts once (its seeds are not independent draws). Rows with NaN are left out.

    Args:
        a, b: per-pair scores ``[n_pairs, n_seeds]`` (1/0 correctness, or a credit in [0, 1]).
    """
    from scipy import stats

    a, b = np.atleast_2d(np.asarray(a, dtype=np.float64)), np.atleast_2d(np.asarray(b, dtype=np.float64))
    keep = ~(np.isnan(a).any(axis=1) | np.isnan(b).any(axis=1))
    per_pair = (b[keep] - a[keep]).mean(axis=1)
    only_a, only_b = int((per_pair < 0).sum()), int((per_pair > 0).sum())
    discordant = only_a + only_b
    p = float(stats.binomtest(min(only_a, only_b), discordant, 0.5).pvalue) if discordant else 1.0
    return {"only_a": only_a, "only_b": only_b, "pairs": int(keep.sum()), "p_value": p}


# ---------------------------------------------------------------- accuracy by distance on one shared scale
# Each model's own distances differ (training moves the representations), so per-model bins hold different pairs.
# Binning every pair once, by its distance under one reference model, compares the losses on exactly the same pairs.


def shared_bin_edges(reference_distances: np.ndarray, n_bins: int) -> np.ndarray:
    """Quantile edges ``[n_bins + 1]`` of the reference distances (first = min, last = max; duplicates merged)."""
    d = np.asarray(reference_distances, dtype=np.float64)
    d = d[np.isfinite(d)]
    if len(d) == 0 or n_bins < 1:
        raise ValueError("shared distance bins need at least one finite reference distance and one bin")
    return np.unique(np.quantile(d, np.linspace(0.0, 1.0, n_bins + 1)))


def assign_bins(distances: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin index per pair (0 .. len(edges) - 2; the top edge belongs to the last bin)."""
    d = np.asarray(distances, dtype=np.float64)
    bins = np.searchsorted(edges[1:-1], d, side="right")
    return np.where(np.isfinite(d), bins, -1)  # a pair without a distance belongs to no bin


def shared_bin_table(bins: np.ndarray, edges: np.ndarray, scores: Mapping[str, np.ndarray]) -> pd.DataFrame:
    """Per shared bin and loss: accuracy over the bin's pairs and all seeds, and, for every loss after the first,
    the paper's disagreement analysis against the first: cells (pair × seed) where exactly one of the two is
    right, and the share of those this loss wins.

    ``scores``: ``{loss label: [n_pairs, n_seeds]}`` per-pair correctness in the pair order of ``bins``."""
    labels = list(scores)
    first = np.asarray(scores[labels[0]], dtype=np.float64)
    rows = []
    for k in range(len(edges) - 1):
        sel = bins == k
        for label in labels:
            own = np.asarray(scores[label], dtype=np.float64)[sel]
            row = {"bin": k, "d_low": float(edges[k]), "d_high": float(edges[k + 1]), "n_pairs": int(sel.sum()),
                   "loss": label, "accuracy": float(np.nanmean(own)) if own.size else math.nan,
                   "disagree": math.nan, "won_share": math.nan}
            if label != labels[0]:
                base = first[sel]
                split = np.isin(own, (0.0, 1.0)) & np.isin(base, (0.0, 1.0)) & (own != base)
                row["disagree"] = int(split.sum())
                row["won_share"] = float((own[split] == 1).mean()) if split.any() else math.nan
            rows.append(row)
    return pd.DataFrame(rows, columns=["bin", "d_low", "d_high", "n_pairs", "loss", "accuracy", "disagree",
                                       "won_share"])


def align_pairs(frames: Mapping[tuple[str, int], pd.DataFrame], labels: Sequence[str], seeds: Sequence[int]
                ) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """Per-pair correctness of every (loss label, seed) scoring of one benchmark, aligned by pair id.

    ``frames`` are the benchmark's ``scores.parquet`` tables (``id, section, correct``); a missing (label, seed)
    leaves NaN in its column. An id may repeat (RewardBench 2's Ties rows share one): rows are matched by id and
    occurrence. Returns the pairs (``key`` = ``<id>#<occurrence>``, ``id``, ``section``, in the first table's
    order, keys present in all tables) and ``{label: [n_pairs, n_seeds]}``."""
    keyed = {k: _by_occurrence(f) for k, f in frames.items()}
    present = list(keyed.values())
    if not present:
        return pd.DataFrame(columns=["id", "section"]), {lab: np.zeros((0, len(seeds))) for lab in labels}
    keys = present[0].index
    for f in present[1:]:
        keys = keys[keys.isin(f.index)]
    pairs = present[0].loc[keys, ["id", "section"]].rename_axis("key").reset_index()
    scores = {}
    for lab in labels:
        matrix = np.full((len(keys), len(seeds)), np.nan)
        for j, s in enumerate(seeds):
            if (lab, s) in keyed:
                matrix[:, j] = keyed[(lab, s)].loc[keys, "correct"].to_numpy(dtype=float)
        scores[lab] = matrix
    return pairs, scores


def reference_distances(pairs: pd.DataFrame, reference: pd.DataFrame) -> np.ndarray:
    """The reference model's distance of each of ``pairs`` (from :func:`align_pairs`), matched by id and
    occurrence like the trained models' rows (an id may repeat). ``reference``: its ``scores.parquet`` table."""
    by_key = _by_occurrence(reference)["distance"]
    missing = pairs["key"][~pairs["key"].isin(by_key.index)]
    if len(missing):
        raise ValueError(f"the reference model's scores lack {len(missing)} compared pair(s), e.g. "
                         f"{missing.head(3).tolist()} (id#occurrence): it must score the same benchmark file")
    return by_key.reindex(pairs["key"]).to_numpy(dtype=np.float64)


def _by_occurrence(frame: pd.DataFrame) -> pd.DataFrame:
    ids = frame["id"].astype(str)
    return frame.assign(id=ids).set_index(ids + "#" + ids.groupby(ids).cumcount().astype(str))


def paired_table(pairs: pd.DataFrame, scores: Mapping[str, np.ndarray], *, n_boot: int = 2000, seed: int = 0
                 ) -> pd.DataFrame:
    """For all pairs and each section: every later loss minus the first. Over training runs and pairs
    (:func:`paired_bootstrap`): ``diff``, ``ci_low``, ``ci_high``, ``se``, ``mde``, ``p_value``, ``se_seeds``,
    ``se_pairs``, ``df``, ``seeds_for_mde``. Conditional on these trained models: the pair-only interval
    (``ci_low_conditional``, ``ci_high_conditional``, ``se_conditional``, ``mde_conditional``) and McNemar's test
    (``only_versus``, ``only_loss``, ``p_mcnemar_conditional``). Accuracies are plain means over pairs and seeds
    (not RewardBench's section weighting)."""
    labels = list(scores)
    first = labels[0]
    scopes = [("all", np.ones(len(pairs), dtype=bool))]
    scopes += [(str(s), (pairs["section"] == s).to_numpy()) for s in dict.fromkeys(pairs["section"])]
    rows = []
    for scope, sel in scopes:
        for lab in labels[1:]:
            # seeds missing for either loss (a trial that failed) are left out, not every pair
            both = ~(np.isnan(scores[first]).all(axis=0) | np.isnan(scores[lab]).all(axis=0))
            a, b = scores[first][sel][:, both], scores[lab][sel][:, both]
            runs = paired_bootstrap(a, b)
            fixed = conditional_bootstrap(a, b, n_boot=n_boot, seed=seed)
            test = mcnemar(a, b)
            rows.append({"scope": scope, "loss": lab, "versus": first,
                         "accuracy": float(np.nanmean(b)) if b.size else math.nan,
                         "accuracy_versus": float(np.nanmean(a)) if a.size else math.nan, **runs,
                         **{f"{k}_conditional": fixed[k] for k in ("ci_low", "ci_high", "se", "mde")},
                         "only_versus": test["only_a"], "only_loss": test["only_b"],
                         "p_mcnemar_conditional": test["p_value"]})
    return pd.DataFrame(rows)


def plot_gradient_pairs(points: Mapping[str, np.ndarray], path: str | Path) -> Path:
    """Per-pair score-head gradient norm against the pair's distance (log-log), one colour per loss, with the
    fitted slope in the legend: about 1 means the update grows with the distance (BT), about 0 flat (NormBT)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from pipeline.metrics import loglog_slope

    fig = Figure(figsize=(6.4, 4.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for label, xy in points.items():
        xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        keep = (xy[:, 0] > 0) & (xy[:, 1] > 0)
        slope = loglog_slope(xy[:, 0], xy[:, 1])
        ax.scatter(xy[keep, 0], xy[keep, 1], s=6, alpha=0.4, label=f"{label}: slope {slope:+.2f} (n={keep.sum()})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("pair distance ||h_w - h_l||")
    ax.set_ylabel("score-head gradient norm of the pair's loss term")
    ax.set_title("gradient vs distance (log-log slope)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return save_png(fig, path)
