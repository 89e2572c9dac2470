"""Tokenisation throughput of the data stage vs a single-process ``datasets.map`` baseline, same rows.

    python benchmarks/data_throughput.py [--model embedded:minilm] [--max-length 512] [--repeat 3] [--wait-steps 40]

Both sides render every pair with the model's chat template (or the plain template) and tokenise chosen and
rejected; the stage side is ``stages.data.prepare_preferences`` end to end (read, normalise, quarantine,
tokenise, split, sort, write Parquet), so its number includes work the baseline does not do. Prints pairs/s and
the ratio measured in the same run, every repeat (the stage's first run in a Ray session also pays for its worker
processes importing transformers and loading the tokenizer; later runs reuse them), then the stage's pairs/s with
one and with two tokenising tasks at a time (``data.max_actors``: 1 and 2 CPUs' worth). Data: the real
RewardBench v1 + HH-RLHF files in ``../shared/data``.

Then the data-wait figure: the train stage (2 workers, ZeRO-2, the default settings) runs ``--wait-steps`` steps on
the stage's output streamed from Parquet (``read_parquet``, as for a split too big to send in memory), and the
script prints the loop's ``data_wait_fraction``: the share of (wait + step) time spent waiting for the next global
batch. Target < 5%.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline import formats, modeling  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.stage import StageContext  # noqa: E402
from pipeline.tracking import RunLogger  # noqa: E402

FILES = ["rewardbench_v1/rewardbench_v1_filtered.jsonl", "hh_rlhf/harmless-base_test.jsonl.gz",
         "hh_rlhf/helpful_train_sample.jsonl", "hh_rlhf/harmless_train_sample.jsonl"]


def baseline(paths: list[Path], model: str, max_length: int) -> tuple[int, float]:
    """Single process: normalise with the same parser, then ``datasets.Dataset.map`` tokenises."""
    import datasets

    records = []
    for path in paths:
        good, _ = formats.normalise_file_bytes(path.read_bytes(), str(path), source=str(path))
        records += good
    tok = modeling.load_tokenizer(model)
    start = time.perf_counter()
    ds = datasets.Dataset.from_list([{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]}
                                     for r in records])

    def tokenise(row):
        return {side + "_ids": modeling.truncate_ids(modeling.encode_messages(tok, row["prompt"] + row[side]),
                                                      max_length) for side in ("chosen", "rejected")}

    ds.map(tokenise, remove_columns=ds.column_names, load_from_cache_file=False, keep_in_memory=True)
    return len(records), time.perf_counter() - start


def stage(paths: list[Path], model: str, max_length: int, tasks: int = 2) -> tuple[int, float]:
    from stages.data import prepare_preferences

    sources = "[" + ", ".join(f"{{path: '{p}'}}" for p in paths) + "]"
    cfg = load_config(None, [f"data.sources={sources}", f"model.name_or_path={model}",
                             f"data.max_length={max_length}", f"data.max_actors={tasks}", "data.num_cpus=1"])
    with tempfile.TemporaryDirectory() as tmp:
        ctx = StageContext(cfg=cfg, run_dir=Path(tmp), out_dir=Path(tmp), upstream={}, tracker=RunLogger(None, None),
                           log=lambda _: None)
        start = time.perf_counter()
        result = prepare_preferences(ctx)
        seconds = time.perf_counter() - start
    return result.metrics["rows_train"] + result.metrics["rows_validation"], seconds


def data_wait(paths: list[Path], model: str, max_length: int, steps: int) -> dict:
    """Data stage + train stage through the runner, the train splits streamed from Parquet; the final metrics."""
    import json

    from pipeline import runner

    sources = "[" + ", ".join(f"{{path: '{p}'}}" for p in paths) + "]"
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, [f"data.sources={sources}", f"model.name_or_path={model}",
                                 f"data.max_length={max_length}", f"run.root={tmp}", "tracking.enabled=false",
                                 f"train.max_steps={steps}", "train.in_memory_rows=0"])
        manifests = runner.run_pipeline(cfg, stages=("data", "train"), log=lambda _: None)
        return json.loads(Path(manifests["train"].outputs["metrics"]).read_text())["final"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="embedded:minilm")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3, help="alternating runs per side")
    parser.add_argument("--wait-steps", type=int, default=40, help="train steps for the data-wait figure (0: skip)")
    args = parser.parse_args()
    shared = Path(os.environ.get("NORMBT_SHARED_DATA", REPO.parent / "shared" / "data"))
    paths = [shared / f for f in FILES]
    from pipeline.config import PipelineConfig
    from pipeline.raycluster import ensure_ray

    ensure_ray(PipelineConfig())  # Ray start-up is not part of the stage's throughput
    import platform

    print(f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; model {args.model}")
    for i in range(args.repeat):  # alternate, so drift hits both sides alike
        base = baseline(paths, args.model, args.max_length)
        ours = stage(paths, args.model, args.max_length)
        print(f"run {i + 1}: baseline datasets.map {base[0] / base[1]:7.1f} pairs/s ({base[0]} pairs, {base[1]:.1f}s); "
              f"data stage {ours[0] / ours[1]:7.1f} pairs/s ({ours[0]} pairs, {ours[1]:.1f}s); "
              f"ratio {(ours[0] / ours[1]) / (base[0] / base[1]):.2f}x")
    for tasks in (1, 2):
        runs = [stage(paths, args.model, args.max_length, tasks) for _ in range(2)]
        print(f"data stage, {tasks} tokenising task(s) at a time: "
              f"{', '.join(f'{n / t:.1f}' for n, t in runs)} pairs/s")
    if args.wait_steps:
        final = data_wait(paths, args.model, args.max_length, args.wait_steps)
        print(f"train stage, {final['step']} steps streamed from Parquet: data_wait_fraction "
              f"{final['data_wait_fraction']:.4f} (target < 0.05)")


if __name__ == "__main__":
    main()
