"""Where the time of a Tune trial (or of the train stage) goes: its fixed cost, phase by phase.

    python benchmarks/trial_overhead.py [--runs 3] [--steps 10] [--launcher in_process|ray_train] [--stage tune]
    python benchmarks/trial_overhead.py --stage train   # the train stage's Ray Train run instead

Runs the data stage once, then:

* ``--stage tune`` (default): the tune stage as a search runs it, ``--runs`` trials of ``--steps`` steps (a
  default trial is 10, with its mid-trial validation for ASHA) one after another, with ``tune.trial_launcher`` =
  ``--launcher``; ASHA's grace period is set past the trial length, so every trial runs to its end. A trial's
  wall time is from the previous trial's end (its final validation) to its own: everything a search pays per
  trial, Tune's scheduling between trials included. The first trial's also includes Tune's start.
* ``--stage train``: ``--runs`` train-stage runs, each a new ``TorchTrainer`` in one Ray session.

Printed per run, from the run's final metrics ``phase/*`` (rank 0): process start (or, in a reused actor, the
trial's start) to the loop, engine (tokenizer, model, ``deepspeed.initialize``), steps, data waits, the
validation passes in the loop (ASHA's rungs), the rest of the loop (reports), the final validation, the final
checkpoint + export; ``other``: the wall time minus those (Ray Train's controller and worker-group start, Tune
between trials, teardown); the fixed cost (everything but steps and data waits) as a share of the wall time,
and that share without the validation passes (what start-up and teardown cost). Then the median over the runs
after the first (the first also pays for cold caches and starts). CPU and core count are printed with the
numbers; compare ratios, not absolute times, across machines.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WORKER_PHASES = ("process_s", "engine_s", "steps_s", "data_wait_s", "mid_validation_s", "loop_other_s",
                 "validation_s", "checkpoint_s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--stage", choices=("tune", "train"), default="tune")
    parser.add_argument("--launcher", choices=("in_process", "ray_train"), default="in_process")
    parser.add_argument("--config", default=None)
    args = parser.parse_args()

    from pipeline import runner
    from pipeline.config import load_config
    from pipeline.raycluster import ensure_ray

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    print(f"CPU: {cpu}, {os.cpu_count()} cores; {args.stage} stage"
          + (f", tune.trial_launcher={args.launcher}" if args.stage == "tune" else ""))
    with tempfile.TemporaryDirectory() as tmp:
        base = [f"run.root={tmp}"]
        started = time.time()
        ensure_ray(load_config(args.config, base))
        print(f"Ray start: {time.time() - started:.1f}s")
        runner.run_pipeline(load_config(args.config, base), stages=("data",), log=lambda _: None)
        runs = _tune_runs(args, base, tmp) if args.stage == "tune" else _train_runs(args, base)
    rows = []
    for i, (final, wall) in enumerate(runs):
        row = {p: float(final.get(f"phase/{p}", float("nan"))) for p in WORKER_PHASES}
        row["wall_s"] = wall
        row["other_s"] = wall - sum(row[p] for p in WORKER_PHASES)
        row["fixed_share"] = 1.0 - (row["steps_s"] + row["data_wait_s"]) / wall
        # the validation passes measure the trial (ASHA's rungs, the final metric): compute on the validation
        # split, not start-up; shown apart so the start-up share is visible on its own
        row["startup_share"] = row["fixed_share"] - (row["mid_validation_s"] + row["validation_s"]) / wall
        rows.append(row)
        print(f"run {i + 1}: " + ", ".join(f"{k} {v:.1f}" for k, v in row.items() if not k.endswith("_share"))
              + f", fixed cost {row['fixed_share']:.0%} of the wall time ({row['startup_share']:.0%} without the "
              f"validation passes)")
    later = rows[1:] or rows
    print(f"median of runs 2..{len(rows)}:")
    for key in (*WORKER_PHASES, "other_s", "wall_s"):
        print(f"  {key:20s} {statistics.median(r[key] for r in later):6.1f}")
    print(f"  fixed cost share     {statistics.median(r['fixed_share'] for r in later):6.0%}")
    print(f"  without validation   {statistics.median(r['startup_share'] for r in later):6.0%}")


def _train_runs(args, base: list[str]) -> list[tuple[dict, float]]:
    """Consecutive train-stage runs; each one's final metrics and the stage's wall time."""
    from pipeline import runner
    from pipeline.config import load_config

    out = []
    for i in range(args.runs):
        cfg = load_config(args.config, [*base, "tracking.enabled=false", f"train.max_steps={args.steps}",
                                        f"train.seed={i}"])  # a new hash: the train stage runs again
        started = time.time()
        manifest = runner.run_pipeline(cfg, stages=("data", "train"), log=lambda _: None)["train"]
        out.append((json.loads(Path(manifest.outputs["metrics"]).read_text())["final"], time.time() - started))
    return out


def _tune_runs(args, base: list[str], root: str) -> list[tuple[dict, float]]:
    """One search of ``--runs`` trials; each trial's last result (what its final report gave Tune) and its wall
    time: from the previous trial's end (the stage's start for the first) to its own end."""
    from pipeline import runner
    from pipeline.config import load_config

    cfg = load_config(args.config, [*base, f"tune.num_samples={args.runs}", "tune.grace_period=1000",
                                    f"tune.trial_overrides={{train.max_steps: {args.steps}}}",
                                    f"tune.trial_launcher={args.launcher}", "tune.max_concurrent_trials=1"])
    started = time.time()
    runner.run_pipeline(cfg, stages=("data", "tune"), log=lambda _: None)
    results = [json.loads(path.read_text().splitlines()[-1])
               for path in Path(root).glob("**/ray_storage/tune/*/result.json")]
    finals = sorted(results, key=lambda m: m["phase/end_unix"])
    ends = [started] + [m["phase/end_unix"] for m in finals]
    return [(m, ends[i + 1] - ends[i]) for i, m in enumerate(finals)]


if __name__ == "__main__":
    main()
