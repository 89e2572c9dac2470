"""Throughput of RewardBench scoring: the stage's path against a naive loop, same model, rows, batch size.

* stage:  :func:`pipeline.scoring.score_conversations` (Ray Data actor pool, rows sorted by approximate
  length, each batch split into similar-length sub-batches). Timed from the call to the returned
  DataFrame: actor start, model load, Ray Data overhead included. Excluded, as paid once per Ray
  session (a pipeline run pays them before its rewardbench stage): ``ray.init``, and Ray Data's first
  execution in the session, which starts its system actors (timed separately and printed, with the
  speed-up it would leave if it were charged to the stage).
* naive:  one process, conversations in file order (row 0 chosen, row 0 rejected, row 1 chosen, ...),
  batches of ``--batch-size`` padded to the batch maximum; model load included.

Both tokenise through ``encode_messages`` + ``truncate_ids`` and run ``forward_rewards`` in fp32, so the
scores must agree (printed as max |Δscore|). Pairs/s = benchmark rows / seconds (two responses each).
The naive loop uses torch's default thread count in this process; Ray gives each actor
``--cpus-per-actor`` threads (OMP_NUM_THREADS), so compare ``--num-actors`` × ``--cpus-per-actor`` with
the machine's cores.

    .venv/bin/python benchmarks/score_throughput.py [--limit N] [--num-actors K]

By default the stage gets one actor per core (``cpus // --cpus-per-actor``), the same hardware as the naive
loop's threads.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pandas as pd
import torch

from pipeline import modeling, raycluster, scoring
from pipeline.config import REPO_ROOT, load_config
from stages import rewardbench

DEFAULT_DATA = Path(os.environ.get("NORMBT_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path,
                   default=DEFAULT_DATA / "rewardbench_v1" / "rewardbench_v1_filtered.jsonl")
    p.add_argument("--limit", type=int, default=None,
                   help="N benchmark rows spread evenly over the file (default: all 2985)")
    p.add_argument("--model", default="embedded:minilm", help="backbone built as a reward model and saved")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-actors", type=int, default=None,
                   help="stage actors (default: one per core, cpus // --cpus-per-actor)")
    p.add_argument("--cpus-per-actor", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=1, help="alternate naive / stage runs this many times")
    return p.parse_args()


def save_model(name: str, folder: Path) -> str:
    tok = modeling.load_tokenizer(name)
    return str(modeling.save_reward_model(modeling.build_reward_model(name, tok, seed=0), tok, folder))


def load_conversations(path: Path, limit: int | None) -> tuple[int, pd.DataFrame]:
    """``(rows, conversations)``; ``limit`` keeps rows evenly spread over the file (in file order), so
    every subset's lengths are represented, unlike the first N rows (all from the long chat subsets)."""
    rows = rewardbench.read_rows(rewardbench.parse_benchmark({"name": "bench", "path": str(path)}))
    if limit and limit < len(rows):
        rows = [rows[i] for i in np.unique(np.linspace(0, len(rows) - 1, limit).round().astype(int))]
    fmt = rewardbench.detect_format(rows)
    examples = rewardbench.examples_frame(rows, fmt, "bench")
    return len(examples), rewardbench.conversations(examples, fmt)


def naive(convs: pd.DataFrame, model_dir: str, batch_size: int, max_length: int) -> tuple[np.ndarray, int]:
    """Scores in file order, and the padded token count (batch size × batch maximum, summed)."""
    model, tok = modeling.load_exported(model_dir)
    scores, padded = [], 0
    messages = convs["messages"].tolist()
    for start in range(0, len(messages), batch_size):
        ids = [modeling.truncate_ids(modeling.encode_messages(tok, m), max_length, "left")
               for m in messages[start: start + batch_size]]
        input_ids, mask = modeling.pad_batch(ids, tok.pad_token_id)
        padded += input_ids.numel()
        with torch.inference_mode():
            rewards, _ = modeling.forward_rewards(model, input_ids, mask)
        scores.append(rewards.double().numpy())
    return np.concatenate(scores), padded


def stage_padding(frame: pd.DataFrame, batch_size: int) -> int:
    """Padded tokens of the stage's batching, replayed from the scored lengths."""
    lengths = frame["length"].to_numpy()
    padded = 0
    for chunk in scoring.length_sorted_batches(frame, batch_size):
        for group in scoring.length_groups(lengths[chunk], scoring.FORWARD_OVERHEAD_TOKENS["cpu"],
                                           scoring.MAX_TOKENS_PER_FORWARD["cpu"]):
            padded += len(group) * int(lengths[chunk][group].max())
    return padded


def _runs(seconds: list[float]) -> str:
    return ", ".join(f"{x:.1f}" for x in seconds)


def main() -> None:
    args = parse_args()
    if args.num_actors is None:
        args.num_actors = max(1, int(os.cpu_count() // args.cpus_per_actor))
    load_before = os.getloadavg()[0]
    n_pairs, convs = load_conversations(args.data, args.limit)
    ray = raycluster.ensure_ray(load_config(None))
    started = time.perf_counter()
    ray.data.range(1).map_batches(lambda batch: batch).materialize()
    session_s = time.perf_counter() - started
    naive_s, stage_s = [], []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_model(args.model, Path(tmp) / "rm")
        for _ in range(args.repeats):  # alternate, so both paths see the same machine load
            started = time.perf_counter()
            naive_scores, naive_padded = naive(convs, model_dir, args.batch_size, args.max_length)
            naive_s.append(time.perf_counter() - started)
            started = time.perf_counter()
            scored = scoring.score_conversations(convs, model_dir, max_length=args.max_length,
                                                 batch_size=args.batch_size, num_actors=args.num_actors,
                                                 cpus_per_actor=args.cpus_per_actor)
            stage_s.append(time.perf_counter() - started)
    raycluster.shutdown_if_started()
    real, stage_padded = int(scored["length"].sum()), stage_padding(scored, args.batch_size)
    naive_t, stage_t = statistics.median(naive_s), statistics.median(stage_s)
    print(f"rows {n_pairs} pairs = {len(convs)} responses, model {args.model}, "
          f"max_length {args.max_length}, batch {args.batch_size}; torch threads in driver "
          f"{torch.get_num_threads()}; stage: {args.num_actors} actor(s) x {args.cpus_per_actor} CPU")
    print(f"tokens: real {real}, naive padded {naive_padded} ({naive_padded / real:.2f}x), "
          f"stage padded {stage_padded} ({stage_padded / real:.2f}x)")
    print(f"naive: {naive_t:.1f} s  {n_pairs / naive_t:.2f} pairs/s   (runs: {_runs(naive_s)})")
    print(f"stage: {stage_t:.1f} s  {n_pairs / stage_t:.2f} pairs/s   (runs: {_runs(stage_s)})")
    print(f"speed-up stage/naive: {naive_t / stage_t:.2f}x   "
          f"max |score diff| {np.abs(naive_scores - scored['score']).max():.2e}")
    print(f"Ray Data session start-up (once per session, not timed): {session_s:.1f} s; charged to the "
          f"stage it would leave {naive_t / (stage_t + session_s):.2f}x")
    print(f"1-min load average before / after: {load_before:.1f} / {os.getloadavg()[0]:.1f} "
          f"({os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
