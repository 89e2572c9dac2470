"""Score a file of conversations or preference pairs with a reward model, on Ray Data.

``python run_pipeline.py score --model M --input F --output scores.parquet [--format FMT]``: ``M`` is what
``serve`` takes (``models:/...``, a run directory or a ``save_pretrained`` folder); ``F`` a file, glob or folder of
JSONL, JSON or Parquet. A row with ``messages`` is one conversation; any other row is a preference pair in a format
the data stage reads (detected per row, or ``--format``; a row of k rated responses gives several pairs). Every
conversation is encoded exactly as training and the RewardBench stage encode it (the model's chat template at its
template date, cut to ``rewardbench.max_length`` keeping the first token and the end) and scored with the score
head in fp32 by :func:`pipeline.scoring.score_conversations`, under ``rewardbench.batch_size``,
``rewardbench.num_actors`` and ``rewardbench.cpus_per_actor``.

Output, one row per conversation or pair in file order: ``location`` (``file:line`` or ``file#index``), ``kind``
(``conversation`` | ``pair``), ``id``, ``reward`` (a conversation's), ``chosen_reward``, ``rejected_reward`` and
``margin`` = chosen − rejected (a pair's), ``tokens`` (the longest side's scored length). Bad rows are not scored:
they go to ``<output>.quarantine.jsonl`` with their reason and location, counted in the summary, as in the data
stage.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline import formats, readers, scoring
from pipeline.config import PipelineConfig

_PAIR_KEYS = ("chosen", "rejected")


def read_items(pattern: str, fmt: str = formats.AUTO) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(items, quarantined)``: each item ``{location, kind, id, sides}`` with ``sides`` the conversations to
    score (one for a conversation, chosen then rejected for a pair)."""
    items, quarantined = [], []
    for path in _files(pattern):
        for location, row in readers.file_rows(Path(path).read_bytes(), path):
            if formats.is_quarantine(row):
                quarantined.append(row)
            elif isinstance(row, dict) and "messages" in row and not any(k in row for k in _PAIR_KEYS):
                messages, bad = formats.normalise_conversation(row, source=path, location=location)
                if bad:
                    quarantined.append(bad)
                else:
                    items.append({"location": location, "kind": "conversation", "id": str(row.get("id", location)),
                                  "sides": [messages]})
            else:
                records, bad = formats.normalise_row(row, fmt=fmt, source=path, location=location)
                quarantined += bad
                items += [{"location": location, "kind": "pair", "id": r["id"],
                           "sides": [r["prompt"] + r["chosen"], r["prompt"] + r["rejected"]]} for r in records]
    return items, quarantined


def _files(pattern: str) -> list[str]:
    path = Path(pattern).expanduser()
    if path.is_dir():
        found = sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in (".jsonl", ".json", ".parquet", ".gz"))
        if not found:
            raise FileNotFoundError(f"{pattern}: no .jsonl, .json or .parquet file in this folder")
        return found
    return readers.expand_paths(pattern)


def score_file(cfg: PipelineConfig, model_folder: str, pattern: str, output: str, *, fmt: str = formats.AUTO,
               use_ray: bool = True) -> dict[str, Any]:
    """Score ``pattern`` with ``model_folder`` and write ``output`` (Parquet) and its quarantine file; returns the
    summary (counts, quarantine reasons, paths)."""
    items, quarantined = read_items(pattern, fmt)
    rows = [{"item": i, "side": s, "messages": side} for i, item in enumerate(items)
            for s, side in enumerate(item["sides"])]
    rb = cfg.rewardbench
    score = scoring.score_conversations if use_ray else scoring.score_locally
    scored = score(rows, model_folder, max_length=rb.max_length, truncation_side=rb.truncation_side,
                   batch_size=rb.batch_size, num_actors=rb.num_actors, cpus_per_actor=rb.cpus_per_actor,
                   use_gpu=cfg.train.use_gpu) if rows else pd.DataFrame(columns=["item", "side", "score", "length"])
    frame = _table(items, scored)
    out = Path(output).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(out, index=False)
    quarantine_path = out.with_name(out.name + ".quarantine.jsonl")
    quarantine_path.write_text("".join(json.dumps(q) + "\n" for q in quarantined))
    return {"scored": len(frame), "conversations": int((frame["kind"] == "conversation").sum()),
            "pairs": int((frame["kind"] == "pair").sum()), "quarantined": len(quarantined),
            "reasons": dict(Counter(q["reason"] for q in quarantined)), "output": str(out),
            "quarantine": str(quarantine_path)}


def _table(items: list[dict[str, Any]], scored: pd.DataFrame) -> pd.DataFrame:
    by_side = {(int(r.item), int(r.side)): (float(r.score), int(r.length)) for r in scored.itertuples()}
    records = []
    for i, item in enumerate(items):
        sides = [by_side[(i, s)] for s in range(len(item["sides"]))]
        pair = item["kind"] == "pair"
        records.append({"location": item["location"], "kind": item["kind"], "id": item["id"],
                        "reward": math.nan if pair else sides[0][0],
                        "chosen_reward": sides[0][0] if pair else math.nan,
                        "rejected_reward": sides[1][0] if pair else math.nan,
                        "margin": sides[0][0] - sides[1][0] if pair else math.nan,
                        "tokens": max(length for _, length in sides)})
    columns = ["location", "kind", "id", "reward", "chosen_reward", "rejected_reward", "margin", "tokens"]
    return pd.DataFrame(records, columns=columns)
