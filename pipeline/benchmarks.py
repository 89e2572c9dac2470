"""Preference benchmarks (RewardBench v1/v2, RM-Bench, JudgeBench, RMB, HH-RLHF test files and the built-in synthetic
test split):
reading, scoring with a reward model, metrics. Used by the RewardBench stage, by the tune stage's compare mode and by
the data stage's decontamination count. The file contract is the RewardBench stage's (``stages/rewardbench.py``);
the three other benchmarks' schemas and scoring live in :mod:`pipeline.judge_benchmarks`.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline import formats, judge_benchmarks, metrics, readers, scoring, synthetic
from pipeline.artifacts import write_json
from pipeline.config import BenchmarkConfig
from pipeline.stage import StageContext

OTHER_SECTION = "Other"
#: Formats whose rows hold lists of responses per side (scores are lists); the others hold one string per side.
LIST_FORMATS = ("v2", "rm_bench")
#: Formats read through :mod:`pipeline.judge_benchmarks` (bad rows quarantined with a counted reason).
JUDGE_FORMATS = {"rm_bench": judge_benchmarks.parse_rm_bench, "judgebench": judge_benchmarks.parse_judgebench,
                 "rmb": judge_benchmarks.parse_rmb}
#: Quarantine reason of an HH pair whose responses are more than one turn each.
MULTI_TURN_RESPONSE = "multi_turn_response"
_FILE_SUFFIXES = (".json", ".jsonl", ".parquet", ".json.gz", ".jsonl.gz")


# ------------------------------------------------------------------ loading


def bench_files(path: str) -> list[str]:
    """The files a benchmark ``path`` names: a file, a glob, or a folder (its ``.json``, ``.jsonl``, ``.parquet``
    files, optionally ``.gz``, at any depth, in sorted order)."""
    folder = Path(path).expanduser()
    if "://" not in path and folder.is_dir():
        files = sorted(str(f) for f in folder.rglob("*") if f.is_file() and f.name.lower().endswith(_FILE_SUFFIXES))
        if not files:
            raise FileNotFoundError(f"{path!r}: folder holds no .json/.jsonl/.parquet file")
        return files
    return readers.expand_paths(path)


def located_rows(bench: BenchmarkConfig, *, strict: bool = True) -> list[tuple[str, Any]]:
    """``(location, raw row)`` of a benchmark in source order, cut to ``limit``. ``strict``: a row that is not a
    JSON object raises naming file and line; otherwise it comes back as a quarantine record in its place."""
    if bench.kind == "synthetic":
        located = [(f"synthetic#{i}", row) for i, row in enumerate(synthetic.test_rows_rewardbench(bench.synthetic))]
    elif bench.kind == "hf":
        split = f"{bench.split}[:{bench.limit}]" if bench.limit else bench.split
        rows = readers.load_hf(bench.hf, name=bench.config, split=split, revision=bench.revision).to_list()
        located = [(f"{bench.hf}[{bench.split}]#{i}", row) for i, row in enumerate(rows)]
    else:
        located = [pair for file in bench_files(bench.path) for pair in readers.read_path(file, strict=strict)]
    located = located[: bench.limit] if bench.limit else located
    if not located:
        raise ValueError(f"benchmark {bench.name!r}: no rows in {getattr(bench, bench.kind)}")
    return located


def read_rows(bench: BenchmarkConfig) -> list[dict[str, Any]]:
    """Raw rows of a benchmark, in source order, cut to ``limit``; a bad file row raises naming file and line."""
    return [row for _, row in located_rows(bench)]


def load_examples(bench: BenchmarkConfig) -> tuple[str, pd.DataFrame, list[dict[str, str]]]:
    """``(format, examples, quarantine records)``. Examples: ``prompt`` (str), ``chosen`` / ``rejected`` (str,
    or lists of str for :data:`LIST_FORMATS`), ``subset``, ``id`` (str), ``context`` (the messages before the
    response) and the format's own columns (JudgeBench: ``label``, ``response_model``). v1/v2 rows of the wrong
    type raise naming the row and field; RM-Bench, JudgeBench and RMB rows that cannot be scored, and v2 rows
    whose counts disagree with their lists, are quarantined."""
    if bench.format in JUDGE_FORMATS:
        records, quarantine = JUDGE_FORMATS[bench.format](located_rows(bench, strict=False))
        if not records:
            raise ValueError(f"benchmark {bench.name!r} ({bench.format}): every row quarantined "
                             f"{judge_benchmarks.quarantine_counts(quarantine)['by_reason']}; first: "
                             f"{quarantine[0] if quarantine else None}")
        frame = pd.DataFrame.from_records(records).drop(columns="location")
        if bench.format == "judgebench":  # before scoring, not after: the summary would refuse the mix anyway
            judge_benchmarks.check_one_response_model(frame["response_model"], bench.name)
        return bench.format, frame, quarantine
    if bench.format == "hh":  # scored as v1 pairs, each with its conversation before the responses
        return "v1", *hh_examples(located_rows(bench, strict=False), bench.name)
    located = located_rows(bench)
    fmt = bench.format or detect_format([row for _, row in located])
    quarantine: list[dict[str, str]] = []
    if fmt == "v2":
        located, quarantine = judge_benchmarks.check_v2_rows(located)
        if not located:
            raise ValueError(f"benchmark {bench.name!r} (v2): every row quarantined "
                             f"{judge_benchmarks.quarantine_counts(quarantine)['by_reason']}")
    return fmt, examples_frame([row for _, row in located], fmt, bench.name), quarantine


def hh_examples(located: Sequence[tuple[str, Any]], name: str) -> tuple[pd.DataFrame, list[dict[str, str]]]:
    """Anthropic HH-RLHF rows (``chosen`` / ``rejected``: two whole transcripts, as in its test files) as v1
    examples: the turns both share are the ``context``, the last assistant turns the responses (the data stage's
    reading, :func:`pipeline.formats.normalise_row`). A row that reading rejects, and a pair whose responses span
    more than one turn (the transcripts part before their last turn), are quarantined with the reason."""
    records, quarantine = [], []
    for i, (location, row) in enumerate(located):
        if formats.is_quarantine(row):  # not a JSON object: the reader's own record
            quarantine.append({k: row[k] for k in ("location", "reason", "detail")})
            continue
        pairs, bad = formats.normalise_row(row, fmt=formats.HH, source=name, location=location)
        quarantine.extend({k: b[k] for k in ("location", "reason", "detail")} for b in bad)
        for pair in pairs:
            if len(pair["chosen"]) != 1 or len(pair["rejected"]) != 1:
                quarantine.append({"location": location, "reason": MULTI_TURN_RESPONSE, "detail": (
                    f"the chosen / rejected responses are {len(pair['chosen'])} / {len(pair['rejected'])} turns "
                    f"(the transcripts part before their last turn, or end in several assistant turns); a "
                    f"benchmark pair scores one response each")})
                continue
            records.append({"prompt": pair["prompt"][-1]["content"], "chosen": pair["chosen"][0]["content"],
                            "rejected": pair["rejected"][0]["content"], "subset": name, "id": str(i),
                            "context": pair["prompt"]})
    if not records:
        raise ValueError(f"benchmark {name!r} (hh): every row quarantined "
                         f"{judge_benchmarks.quarantine_counts(quarantine)['by_reason']}")
    return pd.DataFrame.from_records(records), quarantine


def prompt_keys(benches: Sequence[BenchmarkConfig]) -> set[str]:
    """:func:`pipeline.formats.prompt_key` of every benchmark prompt (the conversation before the scored
    response), for the data stage's decontamination count."""
    keys = set()
    for bench in benches:
        _, examples, _ = load_examples(bench)
        keys.update(formats.prompt_key(list(c)) for c in contexts(examples))
    return keys


def contexts(examples: pd.DataFrame) -> list[list[dict[str, str]]]:
    """Per example, the messages before the response: the ``context`` column, else one user turn ``prompt``."""
    if "context" in examples:
        return [list(c) for c in examples["context"]]
    return [[{"role": "user", "content": p}] for p in examples["prompt"]]


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
    the side's list; 0 for one-response formats) and ``messages = context + [assistant: response]`` (context: one
    user turn ``prompt`` unless the format gives a conversation, e.g. RMB)."""
    records = []
    for row, (context, chosen, rejected) in enumerate(zip(contexts(examples), examples["chosen"],
                                                          examples["rejected"], strict=True)):
        for side, value in (("chosen", chosen), ("rejected", rejected)):
            for k, text in enumerate(value if fmt in LIST_FORMATS else [value]):
                records.append({"row": row, "side": side, "k": k,
                                "messages": [*context, {"role": "assistant", "content": text}]})
    return pd.DataFrame.from_records(records, columns=["row", "side", "k", "messages"])


def regroup(examples: pd.DataFrame, scored: pd.DataFrame, fmt: str) -> pd.DataFrame:
    """Per-example table (``id, subset, score_chosen, score_rejected, correct, distance`` and the format's own
    columns) from the per-response ``scored`` table (``row, side, k, score, hidden``); see the module contract."""
    per_side = _collect(scored, len(examples))
    chosen, rejected = per_side["chosen"], per_side["rejected"]
    frame = pd.DataFrame({"id": examples["id"].to_numpy(), "subset": examples["subset"].to_numpy()})
    for extra in ("label", "response_model"):
        if extra in examples:
            frame[extra] = examples[extra].to_numpy()
    if fmt not in LIST_FORMATS:
        frame["score_chosen"] = [s[0] for s, _ in chosen]
        frame["score_rejected"] = [s[0] for s, _ in rejected]
        frame["correct"] = (judge_benchmarks.judgebench_correct(frame) if fmt == "judgebench"
                            else metrics.pair_correct(frame["score_chosen"], frame["score_rejected"]))
        frame["distance"] = [_distance(hc[0], hr[0])
                             for (_, hc), (_, hr) in zip(chosen, rejected, strict=True)]
        return frame
    frame["score_chosen"] = [list(s) for s, _ in chosen]
    frame["score_rejected"] = [list(s) for s, _ in rejected]
    if fmt == "rm_bench":
        frame["correct"] = [judge_benchmarks.rm_bench_row_credit(c, r)
                            for c, r in zip(frame["score_chosen"], frame["score_rejected"], strict=True)]
        # Same-style pairs (the matrix diagonal): the distance between answers that differ in content only.
        frame["distance"] = [float(np.mean([_distance(a, b) for a, b in zip(hc, hr, strict=True)]))
                             for (_, hc), (_, hr) in zip(chosen, rejected, strict=True)]
        return frame
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
    """The ``section`` column: :func:`section_of` the subset for v1; the subset itself for v2; RM-Bench: the
    domain group (safety-refuse and safety-response are one safety section); JudgeBench: the source group
    (``mmlu-pro``, ``livebench-*``, ``livecodebench``); RMB: the goal (Helpfulness / Harmlessness)."""
    subset = frame["subset"].astype(str)
    if fmt == "v2":
        return subset
    if fmt == "rm_bench":
        return subset.map(judge_benchmarks.rm_bench_group)
    if fmt == "judgebench":
        return subset.map(judge_benchmarks.judgebench_group)
    if fmt == "rmb":
        return subset.map(judge_benchmarks.rmb_goal)
    return subset.map(section_of)


def tie_rate(frame: pd.DataFrame, fmt: str) -> float:
    """Share of examples whose deciding comparison is an exact tie in score (chosen vs rejected; v2: the best
    chosen vs the best rejected; RM-Bench: the share of a row's 9 comparisons that tie, averaged). Ties count as
    wrong, so a high rate flags a precision problem (bf16 rewards)."""
    if fmt == "rm_bench":
        tied = np.array([np.mean(np.equal.outer(np.asarray(c, float), np.asarray(r, float)))
                         for c, r in zip(frame["score_chosen"], frame["score_rejected"], strict=True)])
    elif fmt not in LIST_FORMATS:
        tied = frame["score_chosen"].to_numpy(dtype=float) == frame["score_rejected"].to_numpy(dtype=float)
    else:
        tied = np.array([max(c) == max(r) for c, r in zip(frame["score_chosen"], frame["score_rejected"],
                                                          strict=True)])
    return float(tied.mean()) if len(tied) else math.nan


def summarise(frame: pd.DataFrame, fmt: str) -> dict[str, Any]:
    """``{"subsets", "sections", "overall", "counts", "missing", "tie_rate"[, "ties"]}`` (module contract)."""
    counts = metrics.subset_counts(frame)
    ties = tie_rate(frame, fmt)
    if fmt in JUDGE_FORMATS:
        scorer = {"rm_bench": judge_benchmarks.rm_bench_summary, "judgebench": judge_benchmarks.judgebench_summary,
                  "rmb": judge_benchmarks.rmb_summary}[fmt]
        return {**scorer(frame), "counts": counts, "tie_rate": ties}
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
    """Accuracy by distance bin per section; other formats than v1 use their ``correct`` credit (RM-Bench: a
    row's share of its 9 comparisons), v2 Ties rows (no credit) left out."""
    if fmt == "v1":
        columns = ["section", "score_chosen", "score_rejected", "distance"]
        return metrics.accuracy_by_distance_bin(frame[columns], n_bins, by="section")
    judged = frame.loc[frame["correct"].notna(), ["section", "correct", "distance"]]
    return metrics.accuracy_by_distance_bin(judged, n_bins, by="section")


def length_credit(chosen: Any, rejected: Any, fmt: str, longer: bool) -> float:
    """Credit of the length-only judge that picks the longer (or shorter) response, in characters.

    One response per side (v1, JudgeBench, RMB): 1 when the chosen response is strictly longer (shorter), 0.5 on
    equal length, else 0. RM-Bench: that credit averaged over the 3x3 chosen x rejected comparisons, as the
    benchmark scores. v2 (one or more chosen, several rejected): the judge picks the longest (shortest) response;
    its credit is the share of the chosen among the responses tied for that pick."""
    if fmt not in LIST_FORMATS:
        a, b = len(chosen), len(rejected)
        return 0.5 if a == b else float(a > b if longer else a < b)
    if fmt == "rm_bench":
        return float(np.mean([length_credit(c, r, "v1", longer) for c in chosen for r in rejected]))
    lengths_c, lengths_r = [len(t) for t in chosen], [len(t) for t in rejected]
    pick = max(lengths_c + lengths_r) if longer else min(lengths_c + lengths_r)
    return lengths_c.count(pick) / (lengths_c + lengths_r).count(pick)


def length_controls(examples: pd.DataFrame, frame: pd.DataFrame, fmt: str) -> dict[str, dict[str, float]]:
    """``{section | "all": {"longer_wins", "shorter_wins", "n"}}``: what judging by length alone scores on the
    same examples (plain means over the section's examples; rows without credit, v2 Ties, left out). A reward
    model's section score near ``longer_wins`` may be a length preference rather than a judgement."""
    judged = frame["correct"].notna().to_numpy()
    longer = np.array([length_credit(c, r, fmt, True) for c, r in zip(examples["chosen"], examples["rejected"],
                                                                      strict=True)])
    shorter = np.array([length_credit(c, r, fmt, False) for c, r in zip(examples["chosen"], examples["rejected"],
                                                                        strict=True)])
    groups = {"all": judged, **{str(s): judged & (frame["section"] == s).to_numpy()
                               for s in dict.fromkeys(frame["section"])}}
    return {name: {"longer_wins": float(longer[sel].mean()) if sel.any() else math.nan,
                   "shorter_wins": float(shorter[sel].mean()) if sel.any() else math.nan, "n": int(sel.sum())}
            for name, sel in groups.items()}


def metric_keys(name: str, summary: Mapping[str, Any]) -> dict[str, float]:
    """Flat ``<name>/overall``, ``<name>/section/<S>``, ``<name>/subset/<s>``, ``<name>/<detail>`` (e.g. RM-Bench
    ``hard``, ``chat/easy``) and ``<name>/quarantined`` metrics."""
    flat = {f"{name}/overall": float(summary["overall"]), f"{name}/tie_rate": float(summary["tie_rate"])}
    flat.update({f"{name}/{'/'.join(map(_safe, k.split('/')))}": float(v) for k, v in summary.get("details", {}).items()})
    if "quarantine" in summary:
        flat[f"{name}/quarantined"] = float(summary["quarantine"]["total"])
    flat.update({f"{name}/section/{_safe(s)}": float(v) for s, v in summary["sections"].items()})
    flat.update({f"{name}/subset/{_safe(s)}": float(v) for s, v in summary["subsets"].items()})
    for section, control in summary.get("length_controls", {}).items():
        suffix = "" if section == "all" else f"/{_safe(section)}"
        flat[f"{name}/length_control/longer_wins{suffix}"] = float(control["longer_wins"])
        flat[f"{name}/length_control/shorter_wins{suffix}"] = float(control["shorter_wins"])
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


# ------------------------------------------------------------------ scoring one benchmark


def score_benchmark(bench: BenchmarkConfig, model_path: str, ctx: StageContext
                    ) -> tuple[dict[str, str], dict[str, float]]:
    """Score one benchmark, write its files and log them as artifacts; ``(outputs, metrics)`` keyed by the
    benchmark name (the caller logs the metrics)."""
    rb = ctx.cfg.rewardbench
    started = time.time()
    fmt, examples, quarantine = load_examples(bench)
    convs = conversations(examples, fmt)
    scored = scoring.score_conversations(
        convs, model_path, max_length=rb.max_length, truncation_side=rb.truncation_side,
        batch_size=rb.batch_size, num_actors=rb.num_actors, cpus_per_actor=rb.cpus_per_actor,
        use_gpu=ctx.cfg.train.use_gpu)
    frame = regroup(examples, scored, fmt)
    frame["section"] = sections(frame, fmt)
    summary = {**summarise(frame, fmt), "length_controls": length_controls(examples, frame, fmt),
               "quarantine": judge_benchmarks.quarantine_counts(quarantine)}
    table = distance_table(frame, fmt, rb.distance_bins)
    files = _write(ctx.out_dir / bench.name, frame, table, {
        "format": fmt, "model": model_path, **summary, "distance_bins": table.to_dict("records")}, quarantine)
    for path in files.values():
        ctx.tracker.log_artifact(path, artifact_path=bench.name)
    flat = metric_keys(bench.name, summary)  # logged by the caller (the runner logs a stage's metrics once)
    lengths = summary["length_controls"]["all"]
    ctx.log(f"rewardbench[{bench.name}]: {len(examples)} examples ({fmt}), {len(convs)} responses in "
            f"{time.time() - started:.1f}s, {len(quarantine)} rows quarantined; overall {summary['overall']:.4f}, ties {summary['tie_rate']:.4f}; "
            f"length alone: longer wins {lengths['longer_wins']:.4f}, shorter wins {lengths['shorter_wins']:.4f}")
    return {f"{bench.name}/{key}": str(path) for key, path in files.items()}, flat


def _write(folder: Path, frame: pd.DataFrame, table: pd.DataFrame, payload: dict[str, Any],
           quarantine: Sequence[Mapping[str, str]] = ()) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    columns = ["id", "subset", "section", "score_chosen", "score_rejected", "correct", "distance"]
    columns += [c for c in ("label", "response_model") if c in frame]
    files = {"scores": folder / "scores.parquet", "metrics": folder / "metrics.json",
             "distance_bins": folder / "accuracy_by_distance.csv"}
    frame[columns].to_parquet(files["scores"], index=False)
    write_json(files["metrics"], _json_safe(payload))
    table.to_csv(files["distance_bins"], index=False)
    if quarantine:
        files["quarantine"] = write_json(folder / "quarantine.json", list(quarantine))
    if not table.empty:
        files["distance_plot"] = metrics.plot_accuracy_by_distance(table, folder / "accuracy_by_distance.png")
    return files
