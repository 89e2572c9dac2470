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
    return ",".join(f"{k.removeprefix('loss.')}={_plain(v)}" for k, v in setting.items()) or "base"


def compare_grid(cfg: PipelineConfig) -> list[dict[str, Any]]:
    """The compare trials in grid order: ``{"loss": label, "seed": s, "setting": {...}, "overrides": {...}}``."""
    settings = [dict(s) for s in cfg.tune.losses]
    if len(settings) < 2:
        raise ValueError("tune.losses: compare mode needs at least two loss settings")
    labels = [loss_label(s) for s in settings]
    labels = [f"{lab}#{i}" if labels.count(lab) > 1 else lab for i, lab in enumerate(labels)]
    grid = []
    for label, setting in zip(labels, settings, strict=True):
        for i in range(cfg.tune.seeds):
            seed = cfg.train.seed + i
            grid.append({"loss": label, "seed": seed, "setting": setting,
                         "overrides": {**setting, "train.seed": seed, "model.seed": seed}})
    return grid


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
    return {int(s): float(v) for s, v in zip(sel["seed"], sel[metric], strict=True) if _finite(v)}


def compare_metric_names(names: Sequence[str], metric: str) -> list[str]:
    """The compared metrics: the validation metric, then per benchmark its overall score and its sections."""
    bench = [n for n in names if n.endswith("/overall") or "/section/" in n]
    return [metric, *sorted(bench, key=lambda n: (n.split("/")[0], "/section/" in n, n))]


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


def _plain(value: Any) -> Any:
    """numpy scalars → Python (labels and JSON want plain types)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _finite(value: Any) -> bool:
    try:
        return value is not None and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False
