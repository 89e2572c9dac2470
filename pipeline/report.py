"""The run report: one Markdown file and one single-file HTML page summarising a pipeline run.

:func:`write_report` reads what the stages left in the run directory (their manifests and files) and, for
the training curves, the train stage's MLflow metric history. Sections, in order: summary (stages and their
MLflow runs), model registry (when given), configuration (the resolved ``config.yaml``, collapsed, URIs
redacted), data, training (final validation metrics and curves of loss, accuracy, NormBT mu and the mean
per-pair weight), distance diagnostics (validation accuracy by distance quartile, RewardBench accuracy by
distance bin, the per-pair weight and distance ranges over training), RewardBench (overall, sections,
subsets per benchmark), Best-of-N (table and plot), tune (best config, trials, compare table and plot).
A stage that did not run (or an unreadable file) gives a one-line note instead of its section; the report
never fails because an optional part is missing.

Files written to ``out_dir``: ``report.md`` with its images copied to ``report_files/`` (relative links),
and ``report.html`` with every image embedded (one file to share); the blocks and their rendering are
:mod:`pipeline.document`.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.artifacts import Manifest, save_png
from pipeline.config import PipelineConfig
from pipeline.document import (FILES_DIR, Block, Collapsed, Heading, Image, Text, fmt, frame_table,
                               render_html, render_markdown, table)

SMOOTHING_REPORTS = 4
SMOOTHED = f"pair_loss, mean of {SMOOTHING_REPORTS} reports"
TRAIN_CURVES = ("loss", "pair_loss", "val_loss", "accuracy", "val_accuracy", "mu", "distance_mean", "weight_mean")
WEIGHT_CURVES = ("weight_mean", "weight_min", "weight_max", "distance_mean", "distance_min", "distance_max")


# ------------------------------------------------------------------ reading helpers


def _json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def _frame(path: str | Path) -> Any:
    import pandas as pd

    path = Path(path)
    if path.suffix == ".json":
        data = _json(path)
        return pd.DataFrame(data.get("rows", data) if isinstance(data, dict) else data)
    return pd.read_csv(path) if path.suffix == ".csv" else pd.read_parquet(path)


def _not_run(stage: str) -> list[Block]:
    return [Text(f"{stage}: not run", note=True)]


def _guard(name: str, build: Callable[[], list[Block]]) -> list[Block]:
    """A section that fails to build becomes a note (a report must never fail on a damaged optional part)."""
    try:
        return build()
    except Exception as err:  # noqa: BLE001 - shown to the reader instead
        return [Text(f"{name}: could not be read ({type(err).__name__}: {err})", note=True)]


def _image(path: str | Path | None, alt: str) -> list[Block]:
    if path and Path(path).is_file():
        return [Image(Path(path), alt)]
    return [Text(f"{alt}: no image", note=True)]


def _figure(panels: Sequence[tuple[str, Mapping[str, tuple[list[float], list[float]]]]], path: Path,
            bands: Mapping[str, tuple[str, str]] | None = None) -> Path:
    """One PNG, one axis per panel ``(title, {series: (steps, values)})``; ``bands`` shades min..max."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = 2 if len(panels) > 1 else 1
    rows = math.ceil(len(panels) / cols)
    band_members = {k for pair in (bands or {}).values() for k in pair}
    fig = Figure(figsize=(5.0 * cols, 3.2 * rows))
    FigureCanvasAgg(fig)
    for i, (title, series) in enumerate(panels, 1):
        ax = fig.add_subplot(rows, cols, i)
        for name, (steps, values) in series.items():
            if name in band_members:
                continue
            style = {"marker": "o", "linestyle": "none"} if len(steps) == 1 or name.startswith("val_") else {}
            ax.plot(steps, values, label=name, **style)
            low_high = (bands or {}).get(name)
            if low_high and all(k in series for k in low_high):
                (lo_x, lo), (_, hi) = series[low_high[0]], series[low_high[1]]
                if len(lo) == len(hi):
                    ax.fill_between(lo_x, lo, hi, alpha=0.2, label=f"{low_high[0]}..{low_high[1]}")
        ax.set_title(title, fontsize="medium")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return save_png(fig, path, dpi=100)


def metric_history(tracking_uri: str, run_id: str, keys: Sequence[str]) -> dict[str, tuple[list[float], list[float]]]:
    """``{key: (steps, values)}`` from an MLflow run's metric history (keys with no history are left out)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    out = {}
    for key in keys:
        history = sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
        if history:
            out[key] = ([m.step for m in history], [m.value for m in history])
    return out


# ------------------------------------------------------------------ sections


def _summary(run_dir: Path, cfg: PipelineConfig, manifests: Mapping[str, Manifest]) -> list[Block]:
    rows = []
    for stage in [*cfg.run.stages, *(s for s in manifests if s not in cfg.run.stages)]:
        m = manifests.get(stage)
        if m is None:
            rows.append((stage, "this report" if stage == "register" else "not run", "", "", ""))
        else:
            took = f"{m.finished_at - m.started_at:.1f} s" if m.finished_at and m.started_at else ""
            rows.append((stage, "done", took, m.hash, m.mlflow_run_id or ""))
    from pipeline.outcome import outcome

    shows = outcome(manifests, cfg.tune.metric)
    return [Text(f"Run {cfg.run.name} in {run_dir}; report written {time.strftime('%Y-%m-%d %H:%M:%S')}."),
            *([Text(f"This run shows: {shows}")] if shows else []),
            table(("stage", "status", "duration", "hash", "MLflow run"), rows)]


def _registry(record: Mapping[str, Any] | None) -> list[Block]:
    if record is None:
        return [Text("registry: no record given", note=True)]
    if not record.get("registered"):
        return [Text(f"Model not registered: {record.get('reason', 'unknown reason')}.", note=True),
                table(("field", "value"), [(k, record.get(k)) for k in ("model_dir", "score_metric", "score")])]
    keys = ("registered_model", "version", "uri", "aliases", "score_metric", "score", "decision", "decision_reason",
            "previous_champion_version", "previous_champion_score", "logged_model_uri", "run_id")
    return [table(("field", "value"), [(k, record.get(k)) for k in keys if k in record])]


def _config(run_dir: Path, cfg: PipelineConfig) -> list[Block]:
    from pipeline.config import to_yaml
    from pipeline.tracking import redact

    path = Path(run_dir) / "config.yaml"
    text, where = (path.read_text(), str(path)) if path.is_file() else (to_yaml(cfg), "in-memory config")
    return [Collapsed(f"Resolved configuration ({where})", redact(text), "yaml")]


def _data(manifests: Mapping[str, Manifest]) -> list[Block]:
    m = manifests.get("data")
    if m is None or "stats" not in m.outputs:
        return _not_run("data stage")
    stats = _json(m.outputs["stats"])
    rows = stats.get("rows", {})
    quarantine = stats.get("quarantine", {})
    blocks: list[Block] = [
        Heading("Rows per split", 3),
        table(("split", "rows"), [(k, rows.get(k)) for k in ("train", "validation") if k in rows]),
    ]
    if rows.get("by_source"):
        blocks += [Heading("Rows per source", 3), table(("source", "rows"), rows["by_source"].items())]
    blocks += [Heading("Quarantine", 3), Text(f"{quarantine.get('total', 0)} row(s) quarantined.")]
    if quarantine.get("by_reason"):
        blocks.append(table(("reason", "rows"), sorted(quarantine["by_reason"].items(), key=lambda kv: -kv[1])))
    tokens = stats.get("tokens", {})
    mean = tokens.get("mean")
    blocks.append(Text(f"Truncated pairs: {stats.get('truncated', 'n/a')}; tokens per side: mean "
                       f"{f'{mean:.1f}' if isinstance(mean, (int, float)) else 'n/a'}, max {fmt(tokens.get('max'))}."))
    return blocks


def _train_final(m: Manifest) -> dict[str, Any]:
    if "metrics" not in m.outputs or not Path(m.outputs["metrics"]).is_file():
        return dict(m.metrics)
    return dict(_json(m.outputs["metrics"]).get("final", {})) or dict(m.metrics)


def _history_or_note(cfg: PipelineConfig, m: Manifest, tracking_uri: str | None, keys: Sequence[str]
                     ) -> tuple[dict[str, tuple[list[float], list[float]]], list[Block]]:
    if not cfg.tracking.enabled:
        return {}, [Text("Curves skipped: tracking is disabled (they come from the train run's MLflow metric "
                         "history).", note=True)]
    if not m.mlflow_run_id:
        return {}, [Text("Curves skipped: the train stage has no MLflow run id.", note=True)]
    from pipeline.tracking import resolve_tracking_uri

    try:
        history = metric_history(tracking_uri or resolve_tracking_uri(cfg), m.mlflow_run_id, keys)
    except Exception as err:  # noqa: BLE001 - a report survives an unreachable tracking server
        return {}, [Text(f"Curves skipped: could not read MLflow metric history ({type(err).__name__}: {err}).",
                         note=True)]
    if not history:
        return {}, [Text("Curves skipped: no metric history in the train run.", note=True)]
    return history, []


def _training(cfg: PipelineConfig, manifests: Mapping[str, Manifest], files: Path, tracking_uri: str | None
              ) -> list[Block]:
    m = manifests.get("train")
    if m is None:
        return _not_run("train stage")
    final = _train_final(m)
    shown = {k: v for k, v in final.items() if (k.startswith("val_") and "_dq" not in k) or k == "step"}
    blocks: list[Block] = [Heading("Final validation metrics", 3),
                           table(("metric", "value"), sorted(shown.items())) if shown
                           else Text("no final metrics recorded", note=True),
                           Heading("Training curves", 3)]
    history, notes = _history_or_note(cfg, m, tracking_uri, TRAIN_CURVES)
    if notes:
        return blocks + notes
    if "pair_loss" in history:
        history[SMOOTHED] = running_mean(*history["pair_loss"], window=SMOOTHING_REPORTS)
    # The plain BT loss shows learning; NormBT's weighted loss jumps with the weights (μ/d on close pairs not yet
    # separated), so it shares a panel with them rather than hiding the plain loss's fall.
    layout = [("plain BT loss (pair_loss, unweighted)", ("pair_loss", SMOOTHED, "val_loss")),
              ("accuracy", ("accuracy", "val_accuracy")),
              ("NormBT mu (EMA of mean pair distance)", ("mu", "distance_mean")),
              (f"training loss ({cfg.loss.name}) and mean per-pair weight", ("loss", "weight_mean"))]
    panels = [(title, {k: history[k] for k in keys if k in history}) for title, keys in layout]
    panels = [p for p in panels if p[1]]
    path = _figure(panels, files / "training_curves.png")
    return blocks + [Image(path, "training curves")]


def running_mean(steps: list[float], values: list[float], window: int) -> tuple[list[float], list[float]]:
    """Each report's value replaced by the mean of it and the ``window - 1`` reports before it (fewer at the
    start): the trend of a per-batch loss that moves with each batch's pairs."""
    spans = [values[max(0, i - window + 1):i + 1] for i in range(len(values))]
    return list(steps), [sum(span) / len(span) for span in spans]


def _distance(cfg: PipelineConfig, manifests: Mapping[str, Manifest], files: Path, tracking_uri: str | None
              ) -> list[Block]:
    blocks: list[Block] = [Heading("Validation accuracy by distance quartile (train stage)", 3)]
    train = manifests.get("train")
    if train is None:
        blocks += _not_run("train stage")
    else:
        final = _train_final(train)
        quartiles = [(f"Q{q}", final.get(f"val_accuracy_dq{q}")) for q in range(1, 5)
                     if f"val_accuracy_dq{q}" in final]
        blocks.append(table(("distance quartile (low to high)", "accuracy"), quartiles) if quartiles
                      else Text("no quartile metrics recorded", note=True))
    blocks.append(Heading("RewardBench accuracy by distance bin", 3))
    bench = manifests.get("rewardbench")
    if bench is None:
        blocks += _not_run("rewardbench stage")
    else:
        for name in _benchmarks(bench):
            blocks.append(Text(f"Benchmark {name}:"))
            blocks += _guard(f"{name} distance bins", lambda name=name: _distance_bins(bench, name))
    blocks.append(Heading("Per-pair NormBT weights and distances over training", 3))
    if train is not None:
        history, notes = _history_or_note(cfg, train, tracking_uri, WEIGHT_CURVES)
        if notes:
            blocks += notes
        else:
            panels = [("per-pair weight w = mu / (d + eps)",
                       {k: history[k] for k in ("weight_mean", "weight_min", "weight_max") if k in history}),
                      ("per-pair distance d",
                       {k: history[k] for k in ("distance_mean", "distance_min", "distance_max") if k in history})]
            panels = [p for p in panels if p[1]]
            if panels:
                bands = {"weight_mean": ("weight_min", "weight_max"), "distance_mean": ("distance_min", "distance_max")}
                blocks.append(Image(_figure(panels, files / "weights.png", bands), "per-pair weights"))
            else:
                blocks.append(Text("no per-pair weights logged (Bradley-Terry loss has none)", note=True))
    else:
        blocks += _not_run("train stage")
    return blocks


def _benchmarks(bench: Manifest) -> list[str]:
    names = [k[: -len("/metrics")] for k in bench.outputs if k.endswith("/metrics")]
    return names or (["rewardbench"] if "metrics" in bench.outputs else [])


def _bench_file(bench: Manifest, name: str, key: str) -> str | None:
    return bench.outputs.get(f"{name}/{key}") or (bench.outputs.get(key) if name == "rewardbench" else None)


def _distance_bins(bench: Manifest, name: str) -> list[Block]:
    import pandas as pd

    csv = _bench_file(bench, name, "distance_bins")
    if csv and Path(csv).is_file():
        frame = pd.read_csv(csv)
    else:
        frame = pd.DataFrame(_json(_bench_file(bench, name, "metrics")).get("distance_bins", []))
    if frame.empty:
        return [Text("no distance bins", note=True)]
    plot = _bench_file(bench, name, "distance_plot")
    return frame_table(frame) + (_image(plot, f"{name} accuracy by distance bin") if plot else [])


def _rewardbench(manifests: Mapping[str, Manifest]) -> list[Block]:
    bench = manifests.get("rewardbench")
    if bench is None:
        return _not_run("rewardbench stage")
    blocks: list[Block] = []
    for name in _benchmarks(bench):
        blocks.append(Heading(f"Benchmark {name}", 3))
        blocks += _guard(f"{name} metrics", lambda name=name: _bench_tables(_json(_bench_file(bench, name, "metrics"))))
    return blocks or [Text("rewardbench stage: no benchmark metrics", note=True)]


def _bench_tables(metrics: Mapping[str, Any]) -> list[Block]:
    counts = metrics.get("counts", {})
    blocks: list[Block] = [Text(f"Overall: {fmt(metrics.get('overall'))} (format {metrics.get('format', '?')}, "
                                f"model {metrics.get('model', '?')}).")]
    if metrics.get("sections"):
        blocks += [Heading("Sections", 4), table(("section", "score"), metrics["sections"].items())]
    if metrics.get("subsets"):
        blocks += [Heading("Subsets", 4),
                   table(("subset", "score", "examples"),
                         [(s, v, counts.get(s)) for s, v in metrics["subsets"].items()])]
    if metrics.get("details"):
        blocks += [Heading("Details", 4), table(("metric", "score"), metrics["details"].items())]
    for group, matrix in metrics.get("matrices", {}).items():  # RM-Bench: chosen style (rows) x rejected style
        styles = metrics.get("styles") or [str(i) for i in range(len(matrix))]
        blocks += [Heading(f"{group}: accuracy by chosen style (rows) x rejected style (columns)", 4),
                   table(("chosen style / rejected style", *styles), [(s, *row) for s, row in zip(styles, matrix, strict=True)])]
    if metrics.get("ties"):
        blocks += [Heading("Ties components", 4), table(("component", "value"), metrics["ties"].items())]
    if metrics.get("response_model"):
        blocks.append(Text(f"Response model: {metrics['response_model']}."))
    quarantine = metrics.get("quarantine") or {}
    if quarantine.get("total"):
        blocks.append(Text(f"{quarantine['total']} rows quarantined (not scored): {quarantine.get('by_reason')}.",
                           note=True))
    if metrics.get("missing"):
        blocks.append(Text(f"Official subsets absent: {', '.join(map(str, metrics['missing']))}.", note=True))
    return blocks


def _best_of_n(manifests: Mapping[str, Manifest]) -> list[Block]:
    m = manifests.get("best_of_n")
    if m is None:
        return _not_run("best_of_n stage")
    blocks: list[Block] = []
    if "bon/beats_random" in m.metrics:
        from pipeline.bon_math import verdict

        line = verdict(m.metrics)
        blocks.append(Text(line[:1].upper() + line[1:] + "."))
    if "results" in m.outputs:
        blocks += _guard("Best-of-N results", lambda: frame_table(_frame(m.outputs["results"])))
    blocks.append(Text("gold_mean: expected gold score of the proxy-best of n (95% bootstrap CI); kl: the analytic "
                       "bound log n - (n-1)/n nats.", note=True))
    return blocks + _image(m.outputs.get("plot"), "Best-of-N gold and proxy reward against sqrt(KL)")


def _tune(manifests: Mapping[str, Manifest]) -> list[Block]:
    m = manifests.get("tune")
    if m is None:
        return _not_run("tune stage")
    out = m.outputs
    blocks: list[Block] = []
    if "best_config" in out:
        blocks.append(Heading("Best configuration", 3))
        blocks += _guard("best config", lambda: [table(("key", "value"), sorted(_json(out["best_config"]).items()))])
    if "trials" in out:
        blocks.append(Heading("Trials", 3))
        blocks += _guard("trials", lambda: frame_table(_narrow(_frame(out["trials"])), limit=20))
    if "compare_table" in out or "compare_plot" in out:
        blocks.append(Heading("Loss comparison", 3))
        if "compare_table" in out:
            blocks += _guard("compare table", lambda: frame_table(_frame(out["compare_table"])))
        if "compare_plot" in out:
            blocks += _image(out["compare_plot"], "loss comparison")
        blocks += _pair_evidence(out)
    else:
        blocks.append(Text("compare: not run (tune.mode is not 'compare')", note=True))
    return blocks or [Text("tune stage: no outputs", note=True)]


def _pair_evidence(out: Mapping[str, str]) -> list[Block]:
    """The compare run's lr search, pair-level tables and the gradient plot (stages/tune.py names them)."""
    parts = [("lr_search", "Learning rate per loss setting (validation only)",
              "Each setting trained at every listed lr; its seeds then trained at the chosen one."),
             ("paired_stats", "Paired over training runs and pairs (interval, MDE, Holm; conditional McNemar)",
              "diff: accuracy of the loss minus the first loss over the same pairs and seeds; ci_low/ci_high, se, "
              "mde (smallest difference detectable at 80% power), p_value and p_holm count seed-to-seed and pair "
              "variation; seeds_for_mde: seeds per loss for a 3-point MDE. The *_conditional columns and McNemar "
              "hold these trained models fixed."),
             ("shared_bins", "Accuracy by distance bin, bins shared by every loss",
              "Bins from the reference model's distances; won_share: among cells where this loss and the first "
              "disagree, the share this loss gets right."),
             ("length_controls", "Length controls",
              "What picking the longer (shorter) response scores on the same pairs, beside each loss's accuracy.")]
    blocks: list[Block] = []
    for key, title, note in parts:
        if key in out:
            blocks += [Heading(title, 4), *_guard(title, lambda k=key: frame_table(_frame(out[k]), limit=40)),
                       Text(note, note=True)]
    return blocks + _image(out.get("gradient_plot"), "score-head gradient norm against pair distance")


def _narrow(frame: Any, max_columns: int = 12) -> Any:
    """Trials tables are wide: drop paths and ids (checkpoint, MLflow run) and empty columns."""
    keep = [c for c in frame.columns if c not in ("checkpoint", "mlflow_run_id") and not frame[c].isna().all()
            and not (frame[c].astype(str).str.strip() == "").all()]
    return frame[keep[:max_columns]]


# ------------------------------------------------------------------ entry


def build_blocks(run_dir: Path, cfg: PipelineConfig, manifests: Mapping[str, Manifest], out_dir: Path, *,
                 registry: Mapping[str, Any] | None = None, tracking_uri: str | None = None) -> list[Block]:
    files = Path(out_dir) / FILES_DIR
    sections: list[tuple[str, Callable[[], list[Block]]]] = [
        ("Summary", lambda: _summary(run_dir, cfg, manifests)),
        ("Model registry", lambda: _registry(registry)),
        ("Configuration", lambda: _config(run_dir, cfg)),
        ("Data", lambda: _data(manifests)),
        ("Training", lambda: _training(cfg, manifests, files, tracking_uri)),
        ("Distance diagnostics", lambda: _distance(cfg, manifests, files, tracking_uri)),
        ("RewardBench", lambda: _rewardbench(manifests)),
        ("Best-of-N", lambda: _best_of_n(manifests)),
        ("Tune and loss comparison", lambda: _tune(manifests)),
    ]
    blocks: list[Block] = [Heading(f"NormBT pipeline report: {cfg.run.name}", 1)]
    for title, build in sections:
        blocks.append(Heading(title))
        blocks += _guard(title, build)
    return blocks


def write_report(run_dir: Path, cfg: PipelineConfig, manifests: dict[str, Manifest], out_dir: Path, *,
                 registry: Mapping[str, Any] | None = None, tracking_uri: str | None = None) -> tuple[Path, Path]:
    """Write ``report.md`` (+ ``report_files/``) and ``report.html`` (images inline) to ``out_dir``.

    ``registry``: the register stage's record (shown as a section); ``tracking_uri``: where the train
    run's metric history lives (default :func:`pipeline.tracking.resolve_tracking_uri`)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out_dir / FILES_DIR, ignore_errors=True)  # no stale images from an earlier report
    blocks = build_blocks(Path(run_dir), cfg, manifests, out_dir, registry=registry, tracking_uri=tracking_uri)
    md_path, html_path = out_dir / "report.md", out_dir / "report.html"
    md_path.write_text(render_markdown(blocks, out_dir))
    html_path.write_text(render_html(blocks, f"NormBT report: {cfg.run.name}"))
    return md_path, html_path
