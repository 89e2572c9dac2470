"""Data stage: Ray Data streams preference pairs into tokenised train/validation Parquet.

Entry: :func:`prepare_preferences` (stage ``data``).

Sources (``data.sources``, each a mapping, optional ``weight`` and ``limit``):

* ``{path: <file, glob or URI>, format?: auto|strings|conversational|hh|sharegpt|helpsteer2|rating}`` —
  JSONL, JSON arrays, Parquet, optionally gzipped, read through pyarrow filesystems (``s3://`` works);
* ``{hf: <hub id>, name?, data_dir?, split?}`` or ``{hf: <save_to_disk folder>}`` — Hugging Face datasets;
* ``{synthetic: {<SyntheticSpec keys>}}`` — the built-in offline benchmark (its own train/validation split).

Every row becomes the canonical record ``{id, prompt, chosen, rejected, source, location, subset, margin}``
(messages as ``{role, content}`` lists) or a quarantine row ``{source, location, reason, detail}``; nothing is
dropped silently. Rows are rendered with the model's chat template (plain template when it has none) by a
tokenizer loaded once per Ray actor; over-length pairs are truncated (keeping the first token and the end of
the response) or dropped into quarantine, per ``data.overlength``. Train/validation is assigned by a salted
hash of the row id: stable across runs and worker counts.

Outputs (manifest names → files in the stage folder):

* ``train``, ``validation`` — Parquet folders: ``id, source, location, subset, margin, chosen_ids,
  rejected_ids, chosen_len, rejected_len, chosen_scored, rejected_scored, truncated``
  (``*_scored`` is the index of the scored token: 0 for encoders; for decoders the last token that is not the
  pad token, as transformers pools: when EOS doubles as pad, the token before a trailing EOS);
* ``quarantine`` — Parquet folder: ``source, location, reason, detail``;
* ``stats`` — ``stats.json``: rows per split and source, quarantine counts per reason and per source,
  truncation counts and token lengths.
"""

from __future__ import annotations

import glob
import re
import hashlib
import io
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from pipeline import formats, modeling, synthetic
from pipeline.artifacts import write_json
from pipeline.raycluster import ensure_ray
from pipeline.runner import StageContext, StageResult

_SOURCE_KEYS = {"path", "hf", "synthetic", "format", "name", "data_dir", "split", "weight", "limit"}
_TOKEN_COLUMNS = ("chosen_ids", "rejected_ids", "chosen_len", "rejected_len", "chosen_scored", "rejected_scored",
                  "truncated")
_ROW_COLUMNS = ("ok", "id", "prompt", "chosen", "rejected", "source", "location", "subset", "margin", "split",
                "reason", "detail")


@dataclass(frozen=True, kw_only=True)
class Source:
    """One entry of ``data.sources``, validated."""

    kind: str  # path | hf | synthetic
    target: Any
    label: str
    fmt: str = formats.AUTO
    name: str | None = None
    data_dir: str | None = None
    split: str | None = None
    weight: float = 1.0
    limit: int | None = None


def parse_source(entry: Mapping[str, Any], index: int) -> Source:
    """Validate one ``data.sources`` mapping; errors name the entry and the key."""
    where = f"data.sources[{index}]"
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where}: expected a mapping like {{path: pairs.jsonl}}, got {entry!r}")
    unknown = set(entry) - _SOURCE_KEYS
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; valid: {sorted(_SOURCE_KEYS)}")
    kinds = [k for k in ("path", "hf", "synthetic") if k in entry]
    if len(kinds) != 1:
        raise ValueError(f"{where}: needs exactly one of path, hf, synthetic (got {kinds or 'none'})")
    kind = kinds[0]
    fmt = entry.get("format", formats.AUTO)
    if fmt not in (formats.AUTO, *formats.FORMATS):
        raise ValueError(f"{where}: format {fmt!r} is not one of auto, {', '.join(formats.FORMATS)}")
    weight = float(entry.get("weight", 1.0))
    if weight <= 0:
        raise ValueError(f"{where}: weight must be > 0")
    target = entry[kind] if kind != "synthetic" else synthetic.SyntheticSpec.from_mapping(entry[kind] or {})
    label = "synthetic" if kind == "synthetic" else str(entry[kind])
    return Source(kind=kind, target=target, label=label, fmt=fmt, name=entry.get("name"),
                  data_dir=entry.get("data_dir"), split=entry.get("split"), weight=weight, limit=entry.get("limit"))


def _schemas() -> tuple[Any, Any]:
    import pyarrow as pa

    ids = pa.list_(pa.int64())
    split = pa.schema([("id", pa.string()), ("source", pa.string()), ("location", pa.string()),
                       ("subset", pa.string()), ("margin", pa.float64()), ("chosen_ids", ids), ("rejected_ids", ids),
                       ("chosen_len", pa.int64()), ("rejected_len", pa.int64()), ("chosen_scored", pa.int64()),
                       ("rejected_scored", pa.int64()), ("truncated", pa.bool_())])
    quarantine = pa.schema([(c, pa.string()) for c in ("source", "location", "reason", "detail")])
    return split, quarantine


_SPLIT_SCHEMA, _QUARANTINE_SCHEMA = _schemas()


# ----------------------------------------------------------------- reading + normalising (Ray tasks)


def _row(record: Mapping[str, Any] | None, bad: Mapping[str, Any] | None, split: str | None = None) -> dict:
    """One uniform row for both outcomes, so good and bad rows share a dataset until they are split."""
    if record is not None:
        return {"ok": True, "id": str(record["id"]), "prompt": list(record["prompt"]), "chosen": list(record["chosen"]),
                "rejected": list(record["rejected"]), "source": record["source"], "location": record["location"],
                "subset": record.get("subset"), "margin": record.get("margin"), "split": split,
                "reason": None, "detail": None}
    return {"ok": False, "id": None, "prompt": [], "chosen": [], "rejected": [], "source": bad["source"],
            "location": bad["location"], "subset": None, "margin": None, "split": None,
            "reason": bad["reason"], "detail": bad["detail"]}


def _file_rows(data: bytes, path: str) -> list[tuple[str, Any]]:
    """``(location, raw row)`` pairs of one file; Parquet by index, JSON/JSONL by line."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        return list(formats.iter_indexed_rows(pq.read_table(io.BytesIO(data)).to_pylist(), path))
    return list(formats.iter_file_rows(data, path))


def _normalise_file(item: dict, *, fmt: str, label: str, strict: bool) -> list[dict]:
    rows = _file_rows(item["bytes"], item["path"])
    records, bad = formats.normalise_batch(rows, fmt=fmt, source=label, strict=strict)
    return [_row(r, None) for r in records] + [_row(None, b) for b in bad]


def _normalise_indexed(batch: dict[str, np.ndarray], *, fmt: str, label: str, strict: bool) -> dict[str, list]:
    columns = [c for c in batch if c != "__index"]
    raws = [{c: _plain(batch[c][i]) for c in columns} for i in range(len(batch["__index"]))]
    located = [(formats.location_for_index(label, int(i)), raw) for i, raw in zip(batch["__index"], raws, strict=True)]
    records, bad = formats.normalise_batch(located, fmt=fmt, source=label, strict=strict)
    return _columns([_row(r, None) for r in records] + [_row(None, b) for b in bad])


def _plain(value: Any) -> Any:
    """numpy containers from Arrow → plain Python, so format detection sees lists and dicts."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    # Arrow→numpy turns an all-null object column into NaN; nulls must stay None.
    return None if isinstance(value, float) and value != value else value


def _columns(rows: list[dict]) -> dict[str, list]:
    return {c: [r[c] for r in rows] for c in _ROW_COLUMNS}


def _expand_paths(pattern: str) -> list[str]:
    if "://" in pattern:
        return [pattern]  # pyarrow filesystems resolve remote URIs (and their globs) inside Ray
    matches = sorted(glob.glob(str(Path(pattern).expanduser()), recursive=True))
    if not matches:
        raise FileNotFoundError(f"data source {pattern!r}: no such file")
    return matches


def read_source(ray: Any, source: Source, strict: bool) -> Any:
    """A Ray dataset of uniform rows (see :func:`_row`) for one source."""
    kw = {"fmt": source.fmt, "label": source.label, "strict": strict}
    if source.kind == "path":
        ds = ray.data.read_binary_files(_expand_paths(source.target), include_paths=True)
        return ds.flat_map(_normalise_file, fn_kwargs=kw, num_cpus=0.5)
    if source.kind == "hf":
        hf = _load_hf(source)
        hf = hf.add_column("__index", list(range(len(hf))))
        return ray.data.from_huggingface(hf).map_batches(_normalise_indexed, fn_kwargs=kw, num_cpus=0.5,
                                                         batch_format="numpy")
    spec = source.target
    rows = [_row(r, None, split) for split in ("train", "validation") for r in synthetic.generate(spec, split)]
    return ray.data.from_items(rows)


def _load_hf(source: Source) -> Any:
    import datasets

    target = str(source.target)
    if Path(target).is_dir() and (Path(target) / "dataset_info.json").exists() or \
            (Path(target) / "dataset_dict.json").exists():
        ds = datasets.load_from_disk(target)
        return ds[source.split or "train"] if isinstance(ds, datasets.DatasetDict) else ds
    return datasets.load_dataset(target, name=source.name, data_dir=source.data_dir, split=source.split or "train")


def _apply_weight_and_limit(ds: Any, source: Source) -> Any:
    """``limit`` caps good rows; ``weight`` < 1 keeps a hash-chosen fraction, > 1 repeats rows (ids suffixed)."""
    if source.limit is not None:
        good = ds.filter(lambda r: r["ok"]).limit(int(source.limit))
        ds = good.union(ds.filter(lambda r: not r["ok"]))
    if source.weight == 1.0:
        return ds
    weight = source.weight

    def reweight(row: dict) -> list[dict]:
        if not row["ok"]:
            return [row]
        copies = int(weight) + (_unit_hash(row["id"], "weight") < weight - int(weight))
        return [row if k == 0 else {**row, "id": f"{row['id']}#w{k}"} for k in range(copies)]

    return ds.flat_map(reweight)


def _unit_hash(key: str, salt: Any) -> float:
    digest = hashlib.sha256(f"{salt}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


# ----------------------------------------------------------------- tokenising (Ray actors)


class Tokenise:
    """``map_batches`` callable: loads the tokenizer once per actor, renders each side with the chat template."""

    def __init__(self, model_name: str, revision: str | None, trust_remote_code: bool, max_length: int,
                 overlength: str, scored_first: bool, validation_fraction: float, split_seed: int,
                 template_date: str) -> None:
        self.tok = modeling.load_tokenizer(model_name, revision=revision, trust_remote_code=trust_remote_code,
                                           template_date=template_date)
        self.max_length, self.overlength, self.scored_first = max_length, overlength, scored_first
        self.validation_fraction, self.split_seed = validation_fraction, split_seed

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {k: [] for k in (*_ROW_COLUMNS, *_TOKEN_COLUMNS)}
        for i in range(len(batch["ok"])):
            row = {k: _plain(batch[k][i]) for k in _ROW_COLUMNS}
            self._tokenise_row(row)
            for k in out:
                out[k].append(row.get(k))
        return out

    def _tokenise_row(self, row: dict) -> None:
        row.update(truncated=False, chosen_ids=[], rejected_ids=[], chosen_len=0, rejected_len=0,
                   chosen_scored=0, rejected_scored=0)
        if not row["ok"]:
            return
        ids = {side: modeling.encode_messages(self.tok, row["prompt"] + row[side]) for side in ("chosen", "rejected")}
        too_long = [side for side, seq in ids.items() if len(seq) > self.max_length]
        if too_long and self.overlength == "drop":
            row.update(ok=False, reason=formats.OVER_LENGTH,
                       detail=f"{'/'.join(too_long)} has {max(len(ids[s]) for s in too_long)} tokens "
                              f"> data.max_length={self.max_length}")
            return
        row["truncated"] = bool(too_long)
        for side in ids:
            kept = modeling.truncate_ids(ids[side], self.max_length, "left")
            row[f"{side}_ids"], row[f"{side}_len"] = kept, len(kept)
            row[f"{side}_scored"] = 0 if self.scored_first else modeling.scored_index(kept, self.tok.pad_token_id)
        if row["split"] is None:
            held_out = _unit_hash(row["id"], self.split_seed) < self.validation_fraction
            row["split"] = "validation" if held_out else "train"



# ----------------------------------------------------------------- the stage


def prepare_preferences(ctx: StageContext) -> StageResult:
    cfg = ctx.cfg
    sources = [parse_source(entry, i) for i, entry in enumerate(cfg.data.sources)]
    ray = ensure_ray(cfg)
    datasets = [_apply_weight_and_limit(read_source(ray, s, cfg.data.strict), s) for s in sources]
    rows = datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]
    scored_first = _scores_first_token(cfg)
    tokenised = rows.map_batches(
        Tokenise, fn_constructor_kwargs=dict(
            model_name=cfg.model.name_or_path, revision=cfg.model.revision,
            trust_remote_code=cfg.model.trust_remote_code, max_length=cfg.data.max_length,
            overlength=cfg.data.overlength, scored_first=scored_first,
            validation_fraction=cfg.data.validation_fraction, split_seed=cfg.data.split_seed,
            template_date=cfg.data.template_date),
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=2), num_cpus=cfg.data.num_cpus,
        batch_size=cfg.data.batch_size, batch_format="numpy")
    try:
        # One pass over the sources; the three outputs are filters of this materialised result.
        table = tokenised.materialize()
    except Exception as err:  # strict mode surfaces the first bad row as a clear error
        raise _unwrap_bad_row(err) from None
    outputs = _write_outputs(table, ctx.out_dir)
    stats = _stats(table, sources)
    stats["template_date"] = cfg.data.template_date  # the calendar the chat template saw (saved with the tokenizer too)
    outputs["stats"] = str(write_json(ctx.out_dir / "stats.json", stats))
    ctx.tracker.log_artifact(outputs["stats"])
    ctx.log(f"  data: train {stats['rows']['train']}, validation {stats['rows']['validation']}, "
            f"quarantined {stats['quarantine']['total']} {dict(stats['quarantine']['by_reason'])}")
    metrics = {"rows_train": stats["rows"]["train"], "rows_validation": stats["rows"]["validation"],
               "quarantined": stats["quarantine"]["total"],
               **{f"quarantine_{k}": v for k, v in stats["quarantine"]["by_reason"].items()}}
    return StageResult(outputs=outputs, metrics=metrics)


def _scores_first_token(cfg: Any) -> bool:
    """Encoders score their first token (CLS, through the pooler), decoders their last."""
    name = cfg.model.name_or_path
    if modeling.tiny_arch(name):
        return modeling.tiny_arch(name) == "bert"
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(modeling.resolve_model_path(name), revision=cfg.model.revision,
                                        trust_remote_code=cfg.model.trust_remote_code)
    return modeling.is_encoder(config)


def _unwrap_bad_row(err: Exception) -> Exception:
    """Ray wraps a worker's exception (and may lose its chain in pickling): find the BadRow message."""
    cause: BaseException | None = err
    while cause is not None and not isinstance(cause, formats.BadRow):
        cause = getattr(cause, "cause", None) or cause.__cause__
    if cause is not None:
        return ValueError(f"data.strict: bad row at {cause}")
    found = re.search(r"BadRow: (.+)", str(err))
    return ValueError(f"data.strict: bad row at {found.group(1).strip()}") if found else err


def _write_parquet(ds: Any, path: Path, schema: Any) -> None:
    """One Parquet folder per output; an empty result still gets a (schema-only) file, so readers never
    mistake "no rows" for "stage not run"."""
    ds.repartition(1).write_parquet(str(path))
    if not path.is_dir() or not any(path.glob("*.parquet")):
        import pyarrow.parquet as pq

        path.mkdir(parents=True, exist_ok=True)
        pq.write_table(schema.empty_table(), path / "empty.parquet")


def _write_outputs(table: Any, out_dir: Path) -> dict[str, str]:
    outputs = {}
    keep = ["id", "source", "location", "subset", "margin", *_TOKEN_COLUMNS]
    for split in ("train", "validation"):
        path = out_dir / split
        part = table.filter(lambda r, s=split: r["ok"] and r["split"] == s).select_columns(keep)
        _write_parquet(part, path, _SPLIT_SCHEMA)
        outputs[split] = str(path)
    bad = table.filter(lambda r: not r["ok"]).select_columns(["source", "location", "reason", "detail"])
    path = out_dir / "quarantine"
    _write_parquet(bad, path, _QUARANTINE_SCHEMA)
    outputs["quarantine"] = str(path)
    return outputs



def _stats(table: Any, sources: list[Source]) -> dict[str, Any]:
    # Only small columns reach the driver.
    df = table.select_columns(["ok", "split", "source", "reason", "truncated", "chosen_len", "rejected_len"]).to_pandas()
    good, bad = df[df["ok"]], df[~df["ok"]]
    lengths = np.concatenate([good["chosen_len"].to_numpy(), good["rejected_len"].to_numpy()])
    return {
        "rows": {"train": int((good["split"] == "train").sum()), "validation": int((good["split"] == "validation").sum()),
                 "by_source": {s.label: int((good["source"] == s.label).sum()) for s in sources}},
        "quarantine": {"total": int(len(bad)), "by_reason": dict(Counter(bad["reason"])),
                       "by_source": {src: dict(Counter(g["reason"])) for src, g in bad.groupby("source")}},
        "truncated": int(good["truncated"].sum()),
        "tokens": {"mean": float(lengths.mean()) if len(lengths) else 0.0,
                   "max": int(lengths.max()) if len(lengths) else 0},
    }


def read_split(path: str) -> Any:
    """Pandas view of a written split (tests, benchmarks)."""
    import pandas as pd

    return pd.read_parquet(path)

