"""Data stage: Ray Data streams preference pairs into tokenised train/validation Parquet.

Entry: :func:`prepare_preferences` (stage ``data``).

Sources (``data.sources``, typed in :class:`pipeline.config.SourceConfig`): files (JSONL, JSON arrays, Parquet,
optionally gzipped, through pyarrow filesystems: ``s3://`` works), Hugging Face datasets, or the built-in
synthetic benchmark. Every row becomes canonical records ``{id, prompt, chosen, rejected, source, location,
subset, margin}`` (messages as ``{role, content}`` lists; a row of k ranked responses gives several) or quarantine
rows ``{source, location, reason, detail}``; nothing is dropped silently. Formats are detected from each row's keys
(:mod:`pipeline.formats`) or named, and a column mapping reads any other pairwise schema; a mapping that fits no
row of its source stops the stage naming the missing column and the source.

Order and determinism: rows are read and normalised in source order (``limit`` keeps the same rows on every
rerun); the tokenised pairs are then sorted by a seeded hash of each pair (``data.shuffle_seed``): a global
shuffle that depends neither on the number of actors nor on Ray Data's scheduling, so two runs of the stage write
the same splits in the same order, and training reads a random order even from a file sorted by source.

Tokenising: one tokenizer call per batch (:func:`pipeline.modeling.encode_batch`: the model's chat template at the
fixed ``data.template_date``, else the plain template), in a Ray Data actor pool that loads the tokenizer once per
actor; over-length pairs are truncated (keeping the first token and the end) or quarantined, per
``data.overlength``.

Split: a salted hash of the normalised prompt (:func:`pipeline.formats.prompt_key`: the conversation before the
final response) puts every pair of a prompt, weighted copies included, on one side; the synthetic source keeps
its own split. ``stats.json`` counts the prompts found on both sides (0 by construction for hashed sources) and the
train prompts that also occur in the configured benchmarks (``data.decontaminate`` quarantines those pairs as
``contaminated``). With ``loss.use_margin`` a pair without a margin stops the stage (``data.missing_margin:
error``) or trains with margin 0, counted (``zero``).

Outputs (manifest names → files in the stage folder):

* ``train``, ``validation`` — Parquet folders: ``id, source, location, subset, margin, chosen_ids,
  rejected_ids, chosen_len, rejected_len, chosen_scored, rejected_scored, truncated``
  (``*_scored`` is the index of the scored token: 0 for encoders; for decoders the last token that is not the
  pad token, as transformers pools: when EOS doubles as pad, the token before a trailing EOS);
* ``quarantine`` — Parquet folder: ``source, location, reason, detail``;
* ``stats`` — ``stats.json``: rows per split and source, quarantine counts per reason and per source, prompts on
  both sides, contamination, margins (and per subset: a Unified-Feedback sub-source's scale), pairing per source
  (pairs made, rows that gave them, rows with no response rated below the best), truncation, token lengths, the
  template date;
* ``datasets`` — ``datasets.json``: what MLflow records as the stage's dataset inputs (one per source and per
  split: name, source, digest, schema, row counts); the train stage logs the same ones into its run.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import benchmarks, formats, modeling, readers, synthetic
from pipeline.artifacts import write_json
from pipeline.config import PipelineConfig, SourceConfig, plain
from pipeline.raycluster import ensure_ray
from pipeline.stage import StageContext, StageResult

_TOKEN_COLUMNS = ("chosen_ids", "rejected_ids", "chosen_len", "rejected_len", "chosen_scored", "rejected_scored",
                  "truncated")
_ROW_COLUMNS = ("ok", "id", "messages", "source", "location", "subset", "margin", "split", "reason", "detail")
_EXTRA_COLUMNS = ("prompt_key", "order", "margin_missing")
_SPLIT_COLUMNS = ["id", "source", "location", "subset", "margin", *_TOKEN_COLUMNS]
_QUARANTINE_COLUMNS = ["source", "location", "reason", "detail"]


def _schemas() -> tuple[Any, Any]:
    import pyarrow as pa

    ids = pa.list_(pa.int64())
    split = pa.schema([("id", pa.string()), ("source", pa.string()), ("location", pa.string()),
                       ("subset", pa.string()), ("margin", pa.float64()), ("chosen_ids", ids), ("rejected_ids", ids),
                       ("chosen_len", pa.int64()), ("rejected_len", pa.int64()), ("chosen_scored", pa.int64()),
                       ("rejected_scored", pa.int64()), ("truncated", pa.bool_())])
    quarantine = pa.schema([(c, pa.string()) for c in _QUARANTINE_COLUMNS])
    return split, quarantine


_SPLIT_SCHEMA, _QUARANTINE_SCHEMA = _schemas()


def _tokenised_schema() -> Any:
    """What the tokeniser hands back for every row (good or bad), typed, so blocks always concatenate."""
    import pyarrow as pa

    extra = [("ok", pa.bool_()), ("split", pa.string()), ("reason", pa.string()), ("detail", pa.string()),
             ("prompt_key", pa.string()), ("order", pa.string()), ("margin_missing", pa.bool_())]
    return pa.schema([*_SPLIT_SCHEMA, *extra])


_TOKENISED_SCHEMA = _tokenised_schema()


# ----------------------------------------------------------------- reading + normalising (Ray tasks)


def _row(record: Mapping[str, Any] | None, bad: Mapping[str, Any] | None, split: str | None = None) -> dict:
    """One uniform row for both outcomes, so good and bad rows share a dataset until they are split. The
    conversation travels as one JSON string ``[prompt, chosen, rejected]``: Arrow moves a string far faster than
    nested lists of message structs, and only the tokeniser reads it."""
    if record is not None:
        messages = json.dumps([record["prompt"], record["chosen"], record["rejected"]], ensure_ascii=False)
        return {"ok": True, "id": str(record["id"]), "messages": messages, "source": record["source"],
                "location": record["location"], "subset": record.get("subset"), "margin": record.get("margin"),
                "split": split, "reason": None, "detail": None}
    return {"ok": False, "id": None, "messages": "", "source": bad["source"], "location": bad["location"],
            "subset": None, "margin": None, "split": None, "reason": bad["reason"], "detail": bad["detail"]}


def _rows(records: list[dict], bad: list[dict]) -> list[dict]:
    return [_row(r, None) for r in records] + [_row(None, b) for b in bad]


def _normalise_file(item: dict, *, fmt: str, label: str, strict: bool, options: formats.RowOptions) -> list[dict]:
    located = readers.file_rows(item["bytes"], item["path"])
    return _rows(*formats.normalise_batch(located, fmt=fmt, source=label, strict=strict, options=options))


def _normalise_indexed(batch: dict[str, np.ndarray], *, fmt: str, label: str, strict: bool,
                       options: formats.RowOptions) -> dict[str, list]:
    columns = [c for c in batch if c != "__index"]
    raws = [{c: _plain(batch[c][i]) for c in columns} for i in range(len(batch["__index"]))]
    located = [(formats.location_for_index(label, int(i)), raw) for i, raw in zip(batch["__index"], raws, strict=True)]
    rows = _rows(*formats.normalise_batch(located, fmt=fmt, source=label, strict=strict, options=options))
    return {c: [r[c] for r in rows] for c in _ROW_COLUMNS}


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


def row_options(source: SourceConfig) -> formats.RowOptions:
    return formats.RowOptions(follow=source.follow, aspect=source.aspect, pairs=source.pairs, ties=source.ties,
                              columns=plain(source.columns) if source.columns is not None else None,
                              margin_scale=source.margin_scale)


def read_source(ray: Any, source: SourceConfig, strict: bool) -> Any:
    """A Ray dataset of uniform rows (see :func:`_row`) for one source, in source order."""
    kw = {"fmt": source.row_format, "label": source.label, "strict": strict, "options": row_options(source)}
    if source.kind == "path":
        ds = ray.data.read_binary_files(readers.expand_paths(source.path), include_paths=True)
        return ds.flat_map(_normalise_file, fn_kwargs=kw, num_cpus=0.5)
    if source.kind == "hf":
        hf = readers.load_hf(source.hf, name=source.name, data_dir=source.data_dir, split=source.split,
                             revision=source.revision)
        hf = hf.add_column("__index", list(range(len(hf))))
        return ray.data.from_huggingface(hf).map_batches(_normalise_indexed, fn_kwargs=kw, num_cpus=0.5,
                                                         batch_format="numpy")
    rows = [_row(r, None, split) for split in ("train", "validation") for r in synthetic.generate(source.synthetic, split)]
    return ray.data.from_items(rows)


def _apply_weight_and_limit(ds: Any, source: SourceConfig) -> Any:
    """``limit`` keeps the first good rows in source order; ``weight`` < 1 keeps a hash-chosen share, > 1 repeats
    rows (ids suffixed ``#wk``; a copy has its original's prompt, hence its side of the split)."""
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
        if copies == 0:  # left out by the weight: counted with its reason, like every row not trained on
            return [{**row, "ok": False, "messages": "", "reason": formats.SUBSAMPLED,
                     "detail": f"weight {weight} keeps a hash-chosen {weight:.0%} of the source"}]
        return [row if k == 0 else {**row, "id": f"{row['id']}#w{k}"} for k in range(copies)]

    return ds.flat_map(reweight)


def _unit_hash(key: str, salt: Any) -> float:
    digest = hashlib.sha256(f"{salt}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


# ----------------------------------------------------------------- tokenising (Ray actors)


@functools.lru_cache(maxsize=4)
def _tokenizer(name: str, revision: str | None, trust_remote_code: bool, template_date: str) -> Any:
    """One tokenizer per Ray worker process and model (workers are reused across tasks, and across runs of the
    stage in one Ray session: an actor pool would start fresh processes and import transformers every time)."""
    return modeling.load_tokenizer(name, revision=revision, trust_remote_code=trust_remote_code,
                                   template_date=template_date)


def tokenise(batch: dict[str, np.ndarray], *, cfg: PipelineConfig, scored_first: bool) -> Any:
    """``map_batches`` task: :class:`Tokenise` with this worker's cached tokenizer."""
    m = cfg.model
    return Tokenise(_tokenizer(m.name_or_path, m.revision, m.trust_remote_code, cfg.data.template_date), cfg,
                    scored_first)(batch)


class Tokenise:
    """One batch of uniform rows → the typed tokenised table: one tokenizer call for the batch."""

    def __init__(self, tok: Any, cfg: PipelineConfig, scored_first: bool) -> None:
        self.tok, self.data, self.scored_first = tok, cfg.data, scored_first
        self.use_margin = cfg.loss.use_margin

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        columns = [batch[k].tolist() for k in _ROW_COLUMNS]  # one conversion per column, not per value
        rows = [{k: None if v != v else v for k, v in zip(_ROW_COLUMNS, values, strict=True)}  # NaN: Arrow's null
                for values in zip(*columns, strict=True)]
        good = [r for r in rows if r["ok"]]
        for r in good:
            r["prompt"], r["chosen"], r["rejected"] = json.loads(r["messages"])
        ids = self._encode(good)
        good = [r for r in good if r["ok"]]
        for r in rows:
            r.update(truncated=False, chosen_ids=[], rejected_ids=[], chosen_len=0, rejected_len=0, chosen_scored=0,
                     rejected_scored=0, prompt_key="", order="", margin_missing=False)
        for k, r in enumerate(good):
            self._tokenised(r, {"chosen": ids[2 * k], "rejected": ids[2 * k + 1]})
        import pyarrow as pa

        return pa.table({c: [r[c] for r in rows] for c in _TOKENISED_SCHEMA.names}, schema=_TOKENISED_SCHEMA)

    def _encode(self, rows: list[dict]) -> list[list[int]]:
        """Token ids of both sides of every row, one tokenizer call; if the chat template refuses a conversation
        (e.g. a system turn a template does not support), row by row, quarantining the refused rows."""
        conversations = [r["prompt"] + r[side] for r in rows for side in ("chosen", "rejected")]
        try:
            return modeling.encode_batch(self.tok, conversations)
        except Exception:  # noqa: BLE001 - which row failed is found below
            pass
        ids = []
        for r in rows:
            try:
                ids += modeling.encode_batch(self.tok, [r["prompt"] + r[side] for side in ("chosen", "rejected")])
            except Exception as err:  # noqa: BLE001 - the template's own message names the problem
                r.update(ok=False, reason=formats.BROKEN_TRANSCRIPT,
                         detail=f"the chat template refused the conversation: {type(err).__name__}: {err}")
        return ids

    def _tokenised(self, row: dict, ids: dict[str, list[int]]) -> None:
        data = self.data
        too_long = [side for side, seq in ids.items() if len(seq) > data.max_length]
        if too_long and data.overlength == "drop":
            row.update(ok=False, reason=formats.OVER_LENGTH,
                       detail=f"{'/'.join(too_long)} has {max(len(ids[s]) for s in too_long)} tokens "
                              f"> data.max_length={data.max_length}")
            return
        row["truncated"] = bool(too_long)
        for side in ids:
            kept = modeling.truncate_ids(ids[side], data.max_length, "left")
            row[f"{side}_ids"], row[f"{side}_len"] = kept, len(kept)
            row[f"{side}_scored"] = 0 if self.scored_first else modeling.scored_index(kept, self.tok.pad_token_id)
        row["prompt_key"] = formats.prompt_key(row["prompt"])
        if row["split"] is None:  # the synthetic source brings its own
            held_out = _unit_hash(row["prompt_key"], data.split_seed) < data.validation_fraction
            row["split"] = "validation" if held_out else "train"
        row["order"] = hashlib.sha256(f"{data.shuffle_seed}\x00{row['source']}\x00{row['location']}\x00"
                                      f"{row['id']}".encode()).hexdigest()
        if self.use_margin and row["margin"] is None:
            row["margin_missing"] = True
            if data.missing_margin == "zero":
                row["margin"] = 0.0


# ----------------------------------------------------------------- the stage


def prepare_preferences(ctx: StageContext) -> StageResult:
    cfg = ctx.cfg
    ray = ensure_ray(cfg)
    with _in_source_order(ray):
        datasets = [_apply_weight_and_limit(read_source(ray, s, cfg.data.strict), s) for s in cfg.data.sources]
        rows = datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]
        tokenised = rows.map_batches(
            tokenise, fn_kwargs={"cfg": cfg, "scored_first": _scores_first_token(cfg)}, num_cpus=cfg.data.num_cpus,
            compute=ray.data.TaskPoolStrategy(size=max(1, cfg.data.max_actors)), batch_size=cfg.data.batch_size,
            batch_format="numpy")
        try:
            table = _collect(ray, tokenised)  # one pass over the sources; everything after it works on this table
        except Exception as err:  # strict mode surfaces the first bad row as a clear error
            raise _unwrap_bad_row(err) from None
    _check_column_mappings(_summary(table), cfg.data.sources)
    _check_margins(_summary(table), cfg)
    table, moved = _one_side_per_prompt(table)
    bench_keys, unread = _benchmark_prompts(cfg)
    contaminated = {**_contamination(_summary(table), bench_keys), **({"not_counted": unread} if unread else {})}
    if cfg.data.decontaminate and contaminated["train_pairs"]:
        table = _quarantine_contaminated(table, bench_keys)
    outputs = _write_outputs(table, ctx.out_dir)
    summary = _summary(table)
    stats = _stats(summary, cfg, contaminated, moved)
    outputs["stats"] = str(write_json(ctx.out_dir / "stats.json", stats))
    records = dataset_records(summary, cfg.data.sources, outputs)
    outputs["datasets"] = str(write_json(ctx.out_dir / "datasets.json", records))
    ctx.tracker.log_artifact(outputs["stats"])
    ctx.tracker.log_datasets(records)
    ctx.log(f"  data: train {stats['rows']['train']}, validation {stats['rows']['validation']}, "
            f"quarantined {stats['quarantine']['total']} {dict(stats['quarantine']['by_reason'])}, "
            f"prompts on both sides {stats['split']['prompts_on_both_sides']}, "
            f"train pairs with a benchmark prompt {contaminated['train_pairs']}")
    metrics = {"rows_train": stats["rows"]["train"], "rows_validation": stats["rows"]["validation"],
               "quarantined": stats["quarantine"]["total"],
               **{f"quarantine_{k}": v for k, v in stats["quarantine"]["by_reason"].items()}}
    return StageResult(outputs=outputs, metrics=metrics)


def _collect(ray: Any, dataset: Any) -> Any:
    """The tokenised rows as one Arrow table on the driver (no message texts: ids, tokens, metadata). Splitting,
    sorting and writing it here costs a fraction of a second where three more Ray Data passes cost 10 s."""
    import pyarrow as pa

    # Streamed through the driver's iterator (whole blocks, in order): the blocks are pulled as they are produced.
    blocks = list(dataset.iter_batches(batch_size=None, batch_format="pyarrow"))
    return pa.concat_tables(blocks, promote_options="default") if blocks else _TOKENISED_SCHEMA.empty_table()


@contextlib.contextmanager
def _in_source_order(ray: Any) -> Iterator[None]:
    """Ray Data keeps the source order for the stage's pipelines (``limit`` then keeps the same rows every time),
    and cuts blocks of about 1 MB, so one large file is tokenised by every actor rather than by one."""
    context = ray.data.DataContext.get_current()
    previous = context.execution_options.preserve_order, context.target_max_block_size
    context.execution_options.preserve_order, context.target_max_block_size = True, 1 << 20
    try:
        yield
    finally:
        context.execution_options.preserve_order, context.target_max_block_size = previous


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


def _summary(table: Any) -> Any:
    """The small columns of every row as pandas (checks, stats, dataset records)."""
    return table.select(["ok", "id", "split", "source", "location", "subset", "margin", "reason", "detail", "truncated",
                         "chosen_len", "rejected_len", "prompt_key", "margin_missing"]).to_pandas()


def _check_column_mappings(summary: Any, sources: tuple[SourceConfig, ...]) -> None:
    """A column mapping that fits none of its source's rows is a config mistake, not bad data: stop, naming it."""
    for i, source in enumerate(sources):
        if source.columns is None:
            continue
        rows = summary[summary["source"] == source.label]
        if len(rows) and not rows["ok"].any() and (rows["reason"] == formats.MISSING_FIELD).all():
            first = rows.iloc[0]
            raise ValueError(f"data.sources[{i}].columns does not fit {source.label}: {first['detail']} "
                             f"(first row: {first['location']})")


def _check_margins(summary: Any, cfg: PipelineConfig) -> None:
    missing = summary[summary["ok"] & summary["margin_missing"]]
    if cfg.loss.use_margin and cfg.data.missing_margin == "error" and len(missing):
        counts = dict(Counter(missing["source"]))
        raise ValueError(f"loss.use_margin=true but {len(missing)} pair(s) have no margin ({counts}); use "
                         f"sources that carry margins, or data.missing_margin=zero to train them with margin 0")


def _benchmark_prompts(cfg: PipelineConfig) -> tuple[frozenset[str], str]:
    """The configured benchmarks' prompt keys, and why they could not be read (e.g. a hub benchmark offline):
    then the count is missing from stats.json, said so, unless data.decontaminate needs it (an error)."""
    try:
        return frozenset(benchmarks.prompt_keys(cfg.rewardbench.benchmarks)), ""
    except Exception as err:  # noqa: BLE001 - reported in stats.json, or raised when it matters
        if cfg.data.decontaminate:
            raise ValueError(f"data.decontaminate: the benchmarks could not be read ({type(err).__name__}: "
                             f"{err})") from err
        return frozenset(), f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


def _contamination(summary: Any, bench_keys: frozenset[str]) -> dict[str, int]:
    train = summary[summary["ok"] & (summary["split"] == "train")]
    hits = train["prompt_key"].isin(bench_keys)
    return {"benchmark_prompts": len(bench_keys), "train_pairs": int(hits.sum()),
            "train_prompts": int(train.loc[hits, "prompt_key"].nunique())}


def _one_side_per_prompt(table: Any) -> tuple[Any, int]:
    """A source that brings its own split (the synthetic one) may put one prompt on both sides: its validation
    pairs whose prompt also has train pairs move to train, counted, so validation never shares a prompt with
    training. Hashed sources are unaffected (one side per prompt by construction)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    ok, split = table["ok"], pc.fill_null(table["split"], "")  # a quarantined row has no split (null)
    train_keys = pc.filter(table["prompt_key"], pc.and_(ok, pc.equal(split, "train"))).unique()
    move = pc.and_(pc.and_(ok, pc.equal(split, "validation")), pc.is_in(table["prompt_key"], value_set=train_keys))
    moved = int(pc.sum(move).as_py() or 0)
    if not moved:
        return table, 0
    column = pc.if_else(move, pa.scalar("train"), split)
    return table.set_column(table.schema.get_field_index("split"), "split", column), moved


def _quarantine_contaminated(table: Any, keys: frozenset[str]) -> Any:
    """Train pairs whose prompt occurs in a benchmark become quarantine rows (``data.decontaminate``)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    hit = pc.and_(pc.and_(table["ok"], pc.equal(pc.fill_null(table["split"], ""), "train")),  # null split: bad row
                  pc.is_in(table["prompt_key"], value_set=pa.array(sorted(keys), pa.string())))
    detail = "the prompt occurs in a configured benchmark (data.decontaminate)"
    for name, value in (("ok", pc.and_(table["ok"], pc.invert(hit))),
                        ("reason", pc.if_else(hit, pa.scalar(formats.CONTAMINATED), table["reason"].cast(pa.string()))),
                        ("detail", pc.if_else(hit, pa.scalar(detail), table["detail"].cast(pa.string())))):
        table = table.set_column(table.schema.get_field_index(name), name, value)
    return table


def _write_parquet(table: Any, path: Path, schema: Any) -> None:
    """One Parquet file per output folder, with the declared schema (an empty result is a schema-only file, so
    readers never mistake "no rows" for "stage not run")."""
    import pyarrow.parquet as pq

    path.mkdir(parents=True, exist_ok=True)
    for old in path.glob("*.parquet"):
        old.unlink()
    pq.write_table(table.select(schema.names).cast(schema), path / "part-0.parquet")


def _write_outputs(table: Any, out_dir: Path) -> dict[str, str]:
    """Train and validation in the seeded global order (sorted by each pair's hash), quarantine in source order."""
    import pyarrow.compute as pc

    outputs = {}
    for split in ("train", "validation"):
        part = table.filter(pc.and_(table["ok"], pc.equal(pc.fill_null(table["split"], ""), split)))
        part = part.take(pc.sort_indices(part, sort_keys=[("order", "ascending")]))
        _write_parquet(part, out_dir / split, _SPLIT_SCHEMA)
        outputs[split] = str(out_dir / split)
    _write_parquet(table.filter(pc.invert(table["ok"])), out_dir / "quarantine", _QUARANTINE_SCHEMA)
    outputs["quarantine"] = str(out_dir / "quarantine")
    return outputs


def _stats(summary: Any, cfg: PipelineConfig, contaminated: dict[str, Any], moved: int) -> dict[str, Any]:
    good, bad = summary[summary["ok"]], summary[~summary["ok"]]
    lengths = np.concatenate([good["chosen_len"].to_numpy(), good["rejected_len"].to_numpy()])
    sides = good.groupby("prompt_key")["split"].nunique()
    return {
        "rows": {"train": int((good["split"] == "train").sum()), "validation": int((good["split"] == "validation").sum()),
                 "by_source": {s.label: {split: int(((good["source"] == s.label) & (good["split"] == split)).sum())
                                         for split in ("train", "validation")} for s in cfg.data.sources}},
        "quarantine": {"total": int(len(bad)), "by_reason": dict(Counter(bad["reason"])),
                       "by_source": {src: dict(Counter(g["reason"])) for src, g in bad.groupby("source")}},
        "split": {"by": "normalised prompt hash (the synthetic source keeps its own split)",
                  "prompts": int(len(sides)), "prompts_on_both_sides": int((sides > 1).sum()),
                  "validation_pairs_moved_to_train": moved},
        "contamination": {**contaminated, "decontaminated": bool(cfg.data.decontaminate)},
        "margins": {"use_margin": cfg.loss.use_margin, "missing": int(good["margin_missing"].sum()),
                    "policy": cfg.data.missing_margin, "by_subset": _margins_by_subset(good)},
        "pairing": {s.label: _pairing(summary[summary["source"] == s.label], s) for s in cfg.data.sources},
        "truncated": int(good["truncated"].sum()),
        "tokens": {"mean": float(lengths.mean()) if len(lengths) else 0.0,
                   "max": int(lengths.max()) if len(lengths) else 0},
        "template_date": cfg.data.template_date,  # the calendar the chat template saw (saved with the tokenizer too)
    }


def _margins_by_subset(good: Any) -> dict[str, dict[str, Any]]:
    """Pairs, pairs with a margin and the largest margin per subset (a Unified-Feedback row's subset is its
    sub-source, so this shows the scale each sub-source's margins landed on)."""
    out = {}
    for subset, rows in good[good["subset"].notna()].groupby("subset"):
        margins = rows["margin"].dropna()  # missing_margin=zero has already filled its zeros in: they count here
        out[str(subset)] = {"pairs": int(len(rows)), "with_margin": int(len(margins)),
                            "max": float(margins.max()) if len(margins) else None}
    return out


def _pairing(rows: Any, source: SourceConfig) -> dict[str, Any]:
    """How one source's rows became pairs: a row of k responses gives several (``pairs``), or none when no response
    is rated below the best (``rows_without_lower_rated``, also a quarantine reason). Weighted copies not counted."""
    good = rows[rows["ok"]]
    originals = good[~good["id"].str.contains(r"#w\d+$", regex=True)]
    return {"policy": source.pairs, "aspect": source.aspect, "pairs": int(len(originals)),
            "rows_with_pairs": int(originals["location"].nunique()),
            "rows_without_lower_rated": int((rows["reason"] == formats.NO_LOWER_RATED).sum())}


def dataset_records(summary: Any, sources: tuple[SourceConfig, ...], outputs: Mapping[str, str]) -> list[dict]:
    """MLflow dataset inputs: each source (what was read) and each split (what training reads); the digest is a
    hash of the pair ids in order, so the same data always has the same digest."""
    records = []
    good = summary[summary["ok"]]
    for source in sources:
        rows = summary[summary["source"] == source.label]
        kept = good[good["source"] == source.label]
        records.append({"name": Path(source.label).name or source.label, "source": source.label,
                        "source_type": {"path": "local" if "://" not in str(source.path) else "uri",
                                        "hf": "huggingface", "synthetic": "code"}[source.kind],
                        "digest": _digest(kept["id"]), "context": "source",
                        "schema": {"format": source.row_format, "columns": plain(source.columns)},
                        "profile": {"rows_read": int(len(rows)), "pairs": int(len(kept)),
                                    "train": int((kept["split"] == "train").sum()),
                                    "validation": int((kept["split"] == "validation").sum()),
                                    "quarantined": int(len(rows) - len(kept))}})
    for split in ("train", "validation"):
        part = good[good["split"] == split]
        records.append({"name": split, "source": outputs[split], "source_type": "local",
                        "digest": _digest(part.sort_values("id")["id"]), "context": split,
                        "schema": {"columns": _SPLIT_COLUMNS}, "profile": {"pairs": int(len(part))}})
    return records


def _digest(ids: Any) -> str:
    return hashlib.sha256("\n".join(map(str, ids)).encode()).hexdigest()[:32]  # MLflow takes at most 36


def read_split(path: str) -> Any:
    """Pandas view of a written split (tests, benchmarks)."""
    import pandas as pd

    return pd.read_parquet(path)
