"""RewardBench stage: score preference benchmarks with a reward model; accuracy overall, per section,
per subset and per representation-distance bin.

Model: ``rewardbench.model`` (hub id or ``save_pretrained`` folder) when set, else the ``model`` output
of the ``train`` stage. Scoring goes through :func:`pipeline.scoring.score_conversations` (a Ray Data
actor pool; GPU actors in bf16 when ``train.use_gpu``). Every response ``y`` to prompt ``x`` is scored
as the conversation ``[user: x, assistant: y]``.

Benchmarks (``rewardbench.benchmarks``), each a mapping with ``name`` and exactly one source:

* ``path``: a ``.jsonl`` (optionally ``.gz``), ``.json`` (array) or ``.parquet`` file;
* ``hf`` + ``split`` (+ optional ``config``, ``revision``): ``datasets.load_dataset(hf, name=config,
  split=split, revision=revision)``, e.g. ``{hf: allenai/reward-bench, split: filtered}``;
* ``synthetic``: :class:`pipeline.synthetic.SyntheticSpec` keys; its test split in RewardBench v1 form.

Optional keys: ``format`` (``v1`` | ``v2``; default: ``v2`` when ``chosen`` is a list, else ``v1``) and
``limit`` (first N rows). Rows hold ``prompt``, ``chosen``, ``rejected`` and optionally ``subset`` (default:
the benchmark name) and ``id`` (default: the row number). RewardBench v1 gives one chosen and one
rejected string per row; RewardBench 2 gives lists of strings (Ties: ids ``ref:<p>`` / ``tied:<p>``).

Contract: files under ``<out_dir>/<name>/``

* ``scores.parquet``, one row per example: ``id`` (string), ``subset``, ``section``,
  ``score_chosen``, ``score_rejected``, ``correct``, ``distance``.

  - v1: scores are floats; ``correct = score_chosen > score_rejected`` (bool; a tie is wrong);
    ``distance = ‖h_chosen − h_rejected‖₂`` with ``h`` the score head's input.
  - v2: scores are lists in the data's response order; ``correct`` is the official best-of-k
    credit (:func:`pipeline.metrics.v2_row_credit`: 1 for a clean win, 1/k for a k-way tie at the
    top, else 0; NaN for Ties rows, which are judged per prompt); ``distance = ‖h_chosen[0] − h_r*‖₂``
    where ``r*`` is the highest-scoring rejected response: the one comparison that decides whether
    the row earns credit, i.e. the v2 counterpart of the v1 pair.

* ``metrics.json``: ``format``, ``model``, ``subsets`` (accuracy or v2 score per subset),
  ``sections``, ``overall``, ``counts`` (examples per subset), ``distance_bins`` (records of the table
  below) and ``missing`` (official subsets absent); v2 also ``ties`` (Ties components). Sections:
  v1 with only official subsets uses the official weights (:func:`pipeline.metrics.v1_metrics`);
  other v1 data (e.g. the synthetic benchmark) weights subsets by example count
  (:func:`pipeline.metrics.sections_from_map` over the official and synthetic section maps; unknown
  subsets go to ``Other``); v2 reports each of its subsets as its own section. ``overall`` is the
  unweighted mean of the sections (v1) or subsets (v2). ``tie_rate``: share of examples whose deciding
  comparison is an exact score tie (rewards are fp32, so it should be ~0). NaN is written as ``null``.
* ``accuracy_by_distance.csv`` (:func:`pipeline.metrics.accuracy_by_distance_bin` with
  ``rewardbench.distance_bins`` quantile bins, per section and ``all``; v2 without Ties rows) and
  ``accuracy_by_distance.png`` (written when the table is not empty).

Manifest outputs: ``<name>/scores``, ``<name>/metrics``, ``<name>/distance_bins``,
``<name>/distance_plot`` (when written) for every benchmark, and plain ``scores`` / ``metrics`` for the
first one. Metrics (also logged to MLflow with the files): ``<name>/overall``,
``<name>/section/<Section>``, ``<name>/subset/<subset>``, names with characters other than letters,
digits, ``_ - .`` replaced by ``_``.
"""

from __future__ import annotations

import gzip
import json
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline import metrics, scoring, synthetic
from pipeline.artifacts import write_json
from pipeline.raycluster import ensure_ray
from pipeline.runner import StageContext, StageResult

_SOURCES = ("path", "hf", "synthetic")
_KEYS = ("name", *_SOURCES, "format", "split", "config", "revision", "limit")
_FORMATS = ("v1", "v2")
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
OTHER_SECTION = "Other"


@dataclass(frozen=True, kw_only=True)
class Benchmark:
    name: str
    source: str  # one of _SOURCES
    location: Any  # file path, hub id, or SyntheticSpec mapping
    format: str | None = None  # None: detected from the first row
    split: str | None = None
    config: str | None = None
    revision: str | None = None
    limit: int | None = None


# ------------------------------------------------------------------ configuration


def parse_benchmark(spec: Mapping[str, Any]) -> Benchmark:
    """A checked :class:`Benchmark`; every mistake names the offending key."""
    if not isinstance(spec, Mapping):
        raise TypeError(f"rewardbench.benchmarks: each entry must be a mapping, got {spec!r}")
    unknown = [k for k in spec if k not in _KEYS]
    if unknown:
        raise ValueError(f"rewardbench.benchmarks: unknown key(s) {unknown} in {dict(spec)}; "
                         f"allowed: {list(_KEYS)}")
    sources = [k for k in _SOURCES if k in spec]
    if len(sources) != 1:
        raise ValueError(f"rewardbench.benchmarks: {dict(spec)} needs exactly one of {list(_SOURCES)}")
    source = sources[0]
    name = str(spec.get("name") or _default_name(source, spec[source]))
    if not _NAME.match(name):
        raise ValueError(f"rewardbench.benchmarks: name {name!r} may only use letters, digits, '_', '-', '.'")
    fmt = spec.get("format")
    if fmt is not None and fmt not in _FORMATS:
        raise ValueError(f"rewardbench.benchmarks[{name}]: format={fmt!r}, expected one of {list(_FORMATS)}")
    for key in ("split", "config", "revision"):
        if key in spec and source != "hf":
            raise ValueError(f"rewardbench.benchmarks[{name}]: key {key!r} applies to hf benchmarks only")
    if source == "hf" and not spec.get("split"):
        raise ValueError(f"rewardbench.benchmarks[{name}]: hf benchmarks need 'split' "
                         "(allenai/reward-bench: filtered; allenai/reward-bench-2: test)")
    limit = spec.get("limit")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"rewardbench.benchmarks[{name}]: limit must be a positive integer, got {limit!r}")
    location = _synthetic_spec(name, spec[source]) if source == "synthetic" else str(spec[source])
    return Benchmark(name=name, source=source, location=location, format=fmt, split=spec.get("split"),
                     config=spec.get("config"), revision=spec.get("revision"), limit=limit)


def _synthetic_spec(name: str, value: Any) -> dict[str, Any]:
    """The synthetic mapping, checked now (a typo fails before Ray starts, naming the key)."""
    value = {} if value is None else value
    if not isinstance(value, Mapping):
        raise TypeError(f"rewardbench.benchmarks[{name}]: synthetic must be a mapping of SyntheticSpec keys")
    synthetic.SyntheticSpec.from_mapping(value)
    return dict(value)


def _default_name(source: str, location: Any) -> str:
    if source == "synthetic":
        return "synthetic"
    stem = Path(str(location)).name.split(".")[0]
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", stem) or source


def parse_benchmarks(specs: Sequence[Mapping[str, Any]]) -> list[Benchmark]:
    if not specs:
        raise ValueError("rewardbench.benchmarks is empty: list at least one benchmark")
    benches = [parse_benchmark(s) for s in specs]
    names = [b.name for b in benches]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"rewardbench.benchmarks: duplicate name(s) {duplicates}; "
                         "give each a distinct 'name'")
    return benches


def resolve_model(ctx: StageContext) -> str:
    """``rewardbench.model`` if set, else the train stage's exported model folder."""
    if ctx.cfg.rewardbench.model:
        return ctx.cfg.rewardbench.model
    train = ctx.upstream.get("train")
    if train is None:
        raise ValueError("rewardbench: no model to score; set rewardbench.model=<hub id or folder>, "
                         "or run the train stage first (e.g. --stages data,train,rewardbench)")
    return train.output("model")


# ------------------------------------------------------------------ loading


def read_rows(bench: Benchmark) -> list[dict[str, Any]]:
    """Raw rows of a benchmark, in source order, cut to ``limit``."""
    if bench.source == "synthetic":
        rows = synthetic.test_rows_rewardbench(synthetic.SyntheticSpec.from_mapping(bench.location))
    elif bench.source == "hf":
        rows = _read_hub(bench)
    else:
        rows = _read_file(Path(bench.location).expanduser())
    rows = rows[: bench.limit] if bench.limit else rows
    if not rows:
        raise ValueError(f"benchmark {bench.name!r}: no rows in {bench.location}")
    return rows


def _read_hub(bench: Benchmark) -> list[dict[str, Any]]:
    import datasets

    split = f"{bench.split}[:{bench.limit}]" if bench.limit else bench.split
    ds = datasets.load_dataset(bench.location, name=bench.config, split=split, revision=bench.revision)
    return ds.to_list()


def _read_file(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"benchmark file not found: {path}")
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes[-1:] == [".parquet"]:
        return pd.read_parquet(path).to_dict("records")
    raw = path.read_bytes()
    text = (gzip.decompress(raw) if suffixes[-1:] == [".gz"] else raw).decode("utf-8")
    if ".jsonl" in suffixes:
        return [_json_line(line, path, i) for i, line in enumerate(text.splitlines(), 1) if line.strip()]
    if ".json" in suffixes:
        rows = json.loads(text)
        if not isinstance(rows, list):
            raise ValueError(f"{path}: expected a JSON array of rows, got {type(rows).__name__}")
        return rows
    raise ValueError(f"{path}: unsupported benchmark file type (use .jsonl, .jsonl.gz, .json or .parquet)")


def _json_line(line: str, path: Path, number: int) -> dict[str, Any]:
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{number}: not valid JSON ({err})") from None


def detect_format(rows: Sequence[Mapping[str, Any]]) -> str:
    """``v2`` when the first row's ``chosen`` is a list of responses, else ``v1``."""
    return "v2" if _is_list(rows[0].get("chosen")) else "v1"


def _is_list(value: Any) -> bool:
    return isinstance(value, (list, tuple, np.ndarray))


def examples_frame(rows: Sequence[Mapping[str, Any]], fmt: str, name: str) -> pd.DataFrame:
    """Checked examples: ``prompt`` (str), ``chosen`` / ``rejected`` (str for v1, list of str for v2),
    ``subset`` (str), ``id`` (str). Errors name the benchmark, row and field."""
    records = []
    for i, row in enumerate(rows):
        where = f"benchmark {name!r} row {i}"
        records.append({
            "prompt": _text(row, "prompt", where),
            "chosen": _responses(row, "chosen", where) if fmt == "v2" else _text(row, "chosen", where),
            "rejected": _responses(row, "rejected", where) if fmt == "v2" else _text(row, "rejected", where),
            "subset": str(row.get("subset") or name),
            "id": str(row["id"]) if row.get("id") is not None else str(i),
        })
    return pd.DataFrame.from_records(records, columns=["prompt", "chosen", "rejected", "subset", "id"])


def _text(row: Mapping[str, Any], field: str, where: str) -> str:
    if field not in row:
        raise ValueError(f"{where}: missing field {field!r} (has: {', '.join(map(str, row))})")
    value = row[field]
    if not isinstance(value, str):
        hint = " (lists of responses mean RewardBench 2: set format: v2)" if _is_list(value) else ""
        raise TypeError(f"{where}: field {field!r} must be a string, got {type(value).__name__}{hint}")
    return value


def _responses(row: Mapping[str, Any], field: str, where: str) -> list[str]:
    if field not in row:
        raise ValueError(f"{where}: missing field {field!r} (has: {', '.join(map(str, row))})")
    value = row[field]
    if not _is_list(value) or len(value) == 0 or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{where}: field {field!r} must be a non-empty list of strings (RewardBench 2)")
    return list(value)


# ------------------------------------------------------------------ explode / regroup


def conversations(examples: pd.DataFrame, fmt: str) -> pd.DataFrame:
    """One row per response: ``row`` (example position), ``side`` (chosen|rejected), ``k`` (index in
    the side's list; 0 for v1) and ``messages = [user: prompt, assistant: response]``."""
    records = []
    for row, (prompt, chosen, rejected) in enumerate(zip(examples["prompt"], examples["chosen"],
                                                         examples["rejected"], strict=True)):
        for side, value in (("chosen", chosen), ("rejected", rejected)):
            for k, text in enumerate(value if fmt == "v2" else [value]):
                records.append({"row": row, "side": side, "k": k, "messages": [
                    {"role": "user", "content": prompt}, {"role": "assistant", "content": text}]})
    return pd.DataFrame.from_records(records, columns=["row", "side", "k", "messages"])


def regroup(examples: pd.DataFrame, scored: pd.DataFrame, fmt: str) -> pd.DataFrame:
    """Per-example table (``id, subset, score_chosen, score_rejected, correct, distance``) from the
    per-response ``scored`` table (``row, side, k, score, hidden``); see the module contract."""
    per_side = _collect(scored, len(examples))
    chosen, rejected = per_side["chosen"], per_side["rejected"]
    frame = pd.DataFrame({"id": examples["id"].to_numpy(), "subset": examples["subset"].to_numpy()})
    if fmt == "v1":
        frame["score_chosen"] = [s[0] for s, _ in chosen]
        frame["score_rejected"] = [s[0] for s, _ in rejected]
        frame["correct"] = metrics.pair_correct(frame["score_chosen"], frame["score_rejected"])
        frame["distance"] = [_distance(hc[0], hr[0])
                             for (_, hc), (_, hr) in zip(chosen, rejected, strict=True)]
        return frame
    frame["score_chosen"] = [list(s) for s, _ in chosen]
    frame["score_rejected"] = [list(s) for s, _ in rejected]
    frame["correct"] = metrics.v2_row_results(frame).to_numpy()
    # Distance partner: the top-scoring rejected response, the one comparison that decides the credit.
    frame["distance"] = [_distance(hc[0], hr[int(np.argmax(sr))])
                         for (_, hc), (sr, hr) in zip(chosen, rejected, strict=True)]
    return frame


def _collect(scored: pd.DataFrame, n_rows: int) -> dict[str, list[tuple[list[float], list[np.ndarray]]]]:
    """``{side: [(scores by k, hidden by k) for each row]}``; every row must have both sides."""
    ordered = scored.sort_values(["row", "side", "k"], kind="stable")
    out: dict[str, list[tuple[list[float], list[np.ndarray]]]] = {
        side: [([], []) for _ in range(n_rows)] for side in ("chosen", "rejected")}
    for row, side, score, hidden in zip(ordered["row"], ordered["side"], ordered["score"], ordered["hidden"],
                                        strict=True):
        out[side][int(row)][0].append(float(score))
        out[side][int(row)][1].append(np.asarray(hidden, dtype=np.float32))
    empty = [i for i in range(n_rows) if not out["chosen"][i][0] or not out["rejected"][i][0]]
    if empty:
        raise RuntimeError(f"scores missing for example rows {empty[:10]} (chosen or rejected side)")
    return out


def _distance(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b.astype(np.float64)))


# ------------------------------------------------------------------ metrics


def section_of(subset: str) -> str:
    """Official v1 section, else the synthetic benchmark's, else ``Other``."""
    official = metrics.V1_SECTION_OF_SUBSET.get(subset)
    return official or synthetic.SECTION_OF_SUBSET.get(subset) or OTHER_SECTION


def sections(frame: pd.DataFrame, fmt: str) -> pd.Series:
    """The ``section`` column: :func:`section_of` the subset for v1; the subset itself for v2."""
    return frame["subset"].astype(str) if fmt == "v2" else frame["subset"].map(section_of)


def tie_rate(frame: pd.DataFrame, fmt: str) -> float:
    """Share of examples whose deciding comparison is an exact tie in score (chosen vs rejected; v2: the best
    chosen vs the best rejected). Ties count as wrong, so a high rate flags a precision problem (bf16 rewards)."""
    if fmt == "v1":
        tied = frame["score_chosen"].to_numpy(dtype=float) == frame["score_rejected"].to_numpy(dtype=float)
    else:
        tied = np.array([max(c) == max(r) for c, r in zip(frame["score_chosen"], frame["score_rejected"],
                                                          strict=True)])
    return float(tied.mean()) if len(tied) else math.nan


def summarise(frame: pd.DataFrame, fmt: str) -> dict[str, Any]:
    """``{"subsets", "sections", "overall", "counts", "missing", "tie_rate"[, "ties"]}`` (module contract)."""
    counts = metrics.subset_counts(frame)
    ties = tie_rate(frame, fmt)
    if fmt == "v2":
        result = metrics.v2_metrics(frame)
        return {"subsets": result["subsets"], "sections": dict(result["subsets"]),
                "overall": result["overall"], "counts": counts, "missing": result["missing"],
                "ties": result["ties"], "tie_rate": ties}
    if set(counts) <= set(metrics.V1_SECTION_OF_SUBSET):
        result = metrics.v1_metrics(frame)  # official RewardBench weights
        return {**{k: result[k] for k in ("subsets", "sections", "overall", "missing")}, "counts": counts,
                "tie_rate": ties}
    subsets = metrics.v1_subset_accuracy(frame)
    sections = metrics.sections_from_map(subsets, {s: section_of(s) for s in counts}, counts)
    return {"subsets": subsets, "sections": sections, "overall": metrics.overall_score(sections),
            "counts": counts, "missing": {}, "tie_rate": ties}


def distance_table(frame: pd.DataFrame, fmt: str, n_bins: int) -> pd.DataFrame:
    """Accuracy by distance bin per section; v2 rows use their credit, Ties rows (no credit) left out."""
    if fmt == "v1":
        columns = ["section", "score_chosen", "score_rejected", "distance"]
        return metrics.accuracy_by_distance_bin(frame[columns], n_bins, by="section")
    judged = frame.loc[frame["correct"].notna(), ["section", "correct", "distance"]]
    return metrics.accuracy_by_distance_bin(judged, n_bins, by="section")


def metric_keys(name: str, summary: Mapping[str, Any]) -> dict[str, float]:
    """Flat ``<name>/overall``, ``<name>/section/<S>``, ``<name>/subset/<s>`` metrics."""
    flat = {f"{name}/overall": float(summary["overall"]), f"{name}/tie_rate": float(summary["tie_rate"])}
    flat.update({f"{name}/section/{_safe(s)}": float(v) for s, v in summary["sections"].items()})
    flat.update({f"{name}/subset/{_safe(s)}": float(v) for s, v in summary["subsets"].items()})
    return flat


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text))


def _json_safe(value: Any) -> Any:
    """NaN/inf -> None and numpy scalars -> Python, so metrics.json is strict JSON."""
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ------------------------------------------------------------------ the stage


def score_benchmark(bench: Benchmark, model_path: str, ctx: StageContext
                    ) -> tuple[dict[str, str], dict[str, float]]:
    """Score one benchmark, write its files and log them as artifacts; ``(outputs, metrics)`` keyed by the
    benchmark name (the caller logs the metrics)."""
    rb = ctx.cfg.rewardbench
    started = time.time()
    rows = read_rows(bench)
    fmt = bench.format or detect_format(rows)
    examples = examples_frame(rows, fmt, bench.name)
    convs = conversations(examples, fmt)
    scored = scoring.score_conversations(
        convs, model_path, max_length=rb.max_length, truncation_side=rb.truncation_side,
        batch_size=rb.batch_size, num_actors=rb.num_actors, cpus_per_actor=rb.cpus_per_actor,
        use_gpu=ctx.cfg.train.use_gpu)
    frame = regroup(examples, scored, fmt)
    frame["section"] = sections(frame, fmt)
    summary = summarise(frame, fmt)
    table = distance_table(frame, fmt, rb.distance_bins)
    files = _write(ctx.out_dir / bench.name, frame, table, {
        "format": fmt, "model": model_path, **summary, "distance_bins": table.to_dict("records")})
    for path in files.values():
        ctx.tracker.log_artifact(path, artifact_path=bench.name)
    flat = metric_keys(bench.name, summary)  # logged by the caller (the runner logs a stage's metrics once)
    ctx.log(f"rewardbench[{bench.name}]: {len(examples)} examples ({fmt}), {len(convs)} responses in "
            f"{time.time() - started:.1f}s; overall {summary['overall']:.4f}, ties {summary['tie_rate']:.4f}")
    return {f"{bench.name}/{key}": str(path) for key, path in files.items()}, flat


def _write(folder: Path, frame: pd.DataFrame, table: pd.DataFrame, payload: dict[str, Any]
           ) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    columns = ["id", "subset", "section", "score_chosen", "score_rejected", "correct", "distance"]
    files = {"scores": folder / "scores.parquet", "metrics": folder / "metrics.json",
             "distance_bins": folder / "accuracy_by_distance.csv"}
    frame[columns].to_parquet(files["scores"], index=False)
    write_json(files["metrics"], _json_safe(payload))
    table.to_csv(files["distance_bins"], index=False)
    if not table.empty:
        files["distance_plot"] = metrics.plot_accuracy_by_distance(table, folder / "accuracy_by_distance.png")
    return files


def score_rewardbench(ctx: StageContext) -> StageResult:
    """Stage entry: score every configured benchmark (see the module docstring for the contract)."""
    benches = parse_benchmarks(ctx.cfg.rewardbench.benchmarks)
    model_path = resolve_model(ctx)
    ensure_ray(ctx.cfg)
    outputs: dict[str, str] = {}
    stage_metrics: dict[str, float] = {}
    for bench in benches:
        files, flat = score_benchmark(bench, model_path, ctx)
        outputs.update(files)
        stage_metrics.update(flat)
    first = benches[0].name
    outputs["scores"], outputs["metrics"] = outputs[f"{first}/scores"], outputs[f"{first}/metrics"]
    return StageResult(outputs=outputs, metrics=stage_metrics)

