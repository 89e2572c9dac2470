"""The analysis of a finished loss comparison: from each trial's metrics and per-pair scores to the tables, plots,
stage metrics and log lines. Pure (no Ray, no model): the tune stage scores the trials and the reference model,
hands the results here, and writes what comes back.

Files (names as the tune stage's manifest lists them): ``compare.csv`` / ``compare.png`` (means over seeds and the
seed-paired difference, :func:`pipeline.compare.compare_table`, with each setting's ``lr``), ``paired_stats.csv`` (per benchmark, all pairs and
each section, every later setting against the first: over training runs and pairs
:func:`pipeline.compare.paired_bootstrap`, Holm-adjusted across the comparison's benchmarks and sections;
conditional on these trained models the pair-only interval and McNemar's test), ``shared_bins.csv`` with
``shared_bin_edges.json`` (every pair binned once by the reference model's distance), ``length_controls.csv``
(length-only judging beside each setting's accuracy) and ``gradient_slopes.png``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.artifacts import write_json
from pipeline.compare import (MDE_TARGET, align_pairs, assign_bins, compare_metric_names, compare_table, finite,
                              holm_by_comparison, paired_table, plot_compare, plot_gradient_pairs,
                              reference_distances, shared_bin_edges, shared_bin_table)

GRAD_SLOPE = "grad/distance_slope"  # the train loop's final metric: log-log slope of gradient norm on distance

#: ``{benchmark: {(loss label, seed): scores.parquet table}}``
ScoreFiles = Mapping[str, Mapping[tuple[str, int], pd.DataFrame]]


@dataclass(frozen=True)
class Reference:
    """One benchmark scored by the reference model: its per-pair table (``id``, ``distance``, ...) and the
    length controls of the benchmark's texts (``{section | "all": {"n", "longer_wins", "shorter_wins"}}``)."""

    scores: pd.DataFrame
    length_controls: Mapping[str, Mapping[str, float]]


@dataclass(frozen=True)
class SeedSummary:
    """The seed-level table of a comparison and what the stage reports of it."""

    table: pd.DataFrame  # compare.csv
    metric_names: list[str]  # the compared metrics, in table order
    winner: str  # the label with the highest mean validation metric (first label on ties)
    means: dict[str, float]  # mean validation metric per label
    metrics: dict[str, float]  # compare/<loss>/<metric>_{mean,ci_low,ci_high}
    lines: list[str]  # log lines of the differences


def seed_summary(records: Sequence[Mapping[str, Any]], labels: Sequence[str], metric: str,
                 bench_names: Sequence[str], lrs: Mapping[str, float]) -> SeedSummary:
    """Means and t-intervals over seeds per label, the seed-paired differences, and the winner on ``metric``.
    ``records``: one per trial with ``loss``, ``seed`` and its metrics; ``bench_names``: the benchmark metric
    keys the trials reported (``<bench>/overall``, ``<bench>/section/<S>``); ``lrs``: each label's learning
    rate, the table's ``lr`` column (empty on the difference rows)."""
    names = compare_metric_names(list(dict.fromkeys(bench_names)), metric) + [GRAD_SLOPE]
    table = compare_table(records, names, labels)
    table["lr"] = table["loss"].map(dict(lrs))
    means = {lab: float(table[(table["loss"] == lab) & (table["metric"] == metric)]["mean"].iloc[0])
             for lab in labels}
    scored = [lab for lab in labels if finite(means[lab])]
    if not scored:
        raise RuntimeError(f"no compare trial completed with a finite {metric!r}")
    winner = max(scored, key=lambda lab: (means[lab], -labels.index(lab)))
    metrics: dict[str, float] = {}
    for row in table.itertuples():
        for field in ("mean", "ci_low", "ci_high"):
            if finite(getattr(row, field)):  # one seed: no interval
                metrics[f"compare/{row.loss}/{row.metric}_{field}"] = float(getattr(row, field))
    lines = [f"  compare {row.loss} {row.metric}: {row.mean:+.4f} [{row.ci_low:+.4f}, {row.ci_high:+.4f}] (n={row.n})"
             for row in table[table["loss"].str.startswith("diff")].itertuples()]
    return SeedSummary(table=table, metric_names=names, winner=winner, means=means, metrics=metrics, lines=lines)


def write_seed_outputs(summary: SeedSummary, gradient_points: Mapping[str, Sequence[np.ndarray]], out_dir: Path
                       ) -> dict[str, Path]:
    """``compare.csv``, ``compare.png`` and ``gradient_slopes.png`` into ``out_dir``."""
    table_path = out_dir / "compare.csv"
    summary.table.to_csv(table_path, index=False)
    plot_path = plot_compare(summary.table[summary.table["metric"] != GRAD_SLOPE], out_dir / "compare.png")
    gradient_plot = plot_gradient_pairs({lab: np.concatenate(p) for lab, p in gradient_points.items() if p},
                                        out_dir / "gradient_slopes.png")
    return {"compare_table": table_path, "compare_plot": plot_path, "gradient_plot": gradient_plot}


def pair_evidence(score_files: ScoreFiles, references: Mapping[str, Reference], labels: Sequence[str],
                  seeds: Sequence[int], *, n_boot: int, seed: int, distance_bins: int
                  ) -> dict[str, Any]:
    """Pair-level evidence per benchmark: the paired statistics (Holm across the comparison's benchmarks and
    sections), the shared-reference distance bins with the disagreement analysis, and the length controls.

    Returns ``{"paired_stats", "shared_bins", "length_controls"}`` (tables, a ``benchmark`` column each) and
    ``"edges"`` (``{benchmark: bin edges}``)."""
    paired, binned, lengths, edges_out = [], [], [], {}
    for name, files in score_files.items():
        if not files:
            continue
        pairs, scores = align_pairs(files, labels, seeds)
        if pairs.empty:
            continue
        paired.append(paired_table(pairs, scores, n_boot=n_boot, seed=seed).assign(benchmark=name))
        reference = references[name]
        distance = reference_distances(pairs, reference.scores)
        edges = shared_bin_edges(distance, distance_bins)
        edges_out[name] = edges.tolist()
        binned.append(shared_bin_table(assign_bins(distance, edges), edges, scores).assign(benchmark=name))
        lengths += length_rows(name, pairs, scores, reference.length_controls)
    return {"paired_stats": holm_by_comparison(_concat(paired)) if paired else _concat([]),
            "shared_bins": _concat(binned), "length_controls": _concat([pd.DataFrame(lengths)] if lengths else []),
            "edges": edges_out}


def length_rows(benchmark: str, pairs: pd.DataFrame, scores: Mapping[str, np.ndarray],
                controls: Mapping[str, Mapping[str, float]]) -> list[dict[str, Any]]:
    """Per section (and ``all``): what length-only judging scores beside each setting's plain accuracy."""
    rows = []
    for section, control in controls.items():
        sel = np.ones(len(pairs), bool) if section == "all" else (pairs["section"] == section).to_numpy()
        row = {"benchmark": benchmark, "section": section, "n": control["n"],
               "longer_wins": control["longer_wins"], "shorter_wins": control["shorter_wins"]}
        row.update({f"accuracy:{lab}": float(np.nanmean(scores[lab][sel])) if sel.any() else math.nan
                    for lab in scores})
        rows.append(row)
    return rows


def write_pair_evidence(evidence: Mapping[str, Any], out_dir: Path, reference_model: str) -> dict[str, Path]:
    """The evidence of :func:`pair_evidence` as ``paired_stats.csv``, ``shared_bins.csv``,
    ``length_controls.csv`` and ``shared_bin_edges.json`` in ``out_dir``."""
    files = {"paired_stats": out_dir / "paired_stats.csv", "shared_bins": out_dir / "shared_bins.csv",
             "length_controls": out_dir / "length_controls.csv",
             "shared_bin_edges": out_dir / "shared_bin_edges.json"}
    for key in ("paired_stats", "shared_bins", "length_controls"):
        evidence[key].to_csv(files[key], index=False)
    write_json(files["shared_bin_edges"], {"reference_model": reference_model, "edges": evidence["edges"]})
    return files


def paired_summary(stats: pd.DataFrame) -> tuple[dict[str, float], list[str]]:
    """Stage metrics (``compare/paired/<benchmark>/<loss>/<field>``) and log lines of the paired statistics
    over all pairs of each benchmark."""
    out: dict[str, float] = {}
    lines = []
    for row in stats[stats["scope"] == "all"].itertuples() if "scope" in stats else []:
        prefix = f"compare/paired/{row.benchmark}/{row.loss}"
        for field in ("diff", "ci_low", "ci_high", "mde", "p_value", "p_holm", "seeds_for_mde"):
            if finite(getattr(row, field)):
                out[f"{prefix}/{field}"] = float(getattr(row, field))
        lines.append(
            f"  paired over {row.n_pairs} {row.benchmark} pairs × {row.n_seeds} seeds: {row.loss} − {row.versus} "
            f"{row.diff:+.4f}; over training runs [{row.ci_low:+.4f}, {row.ci_high:+.4f}], MDE {row.mde:.4f}, "
            f"p {row.p_value:.3g} (Holm {row.p_holm:.3g}), {row.seeds_for_mde:g} seeds per loss for a "
            f"{MDE_TARGET:.2f} MDE; conditional on these trained models [{row.ci_low_conditional:+.4f}, "
            f"{row.ci_high_conditional:+.4f}], McNemar p {row.p_mcnemar_conditional:.3g} "
            f"(pairs won {row.only_loss} vs {row.only_versus})")
    return out, lines


def _concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame({"benchmark": []})  # a header, no rows
