"""Where the time of one Ray Train run goes: the fixed cost of a Tune trial or of the train stage, phase by phase.

    python benchmarks/trial_overhead.py [--runs 3] [--steps 10] [--config configs/default.yaml]

Runs the data stage once, then ``--runs`` training runs of ``--steps`` steps (a default Tune trial is 10) through
the train stage, each a new ``TorchTrainer`` in one Ray session, as consecutive trials are. Printed per run:

* driver: joining/starting Ray (first run only), the whole ``trainer.fit()``, export on the driver;
* worker (rank 0, from the run's final metrics ``phase/*``): process start to the loop (interpreter, imports, Ray
  Train's worker set-up), engine (tokenizer, model, ``deepspeed.initialize``), steps, data waits, the rest of the
  loop (reports), final validation, final checkpoint + export;
* Ray Train's own share: ``fit`` minus the worker's phases (controller, worker-group start before the process
  exists, report round trips, teardown);
* the fixed cost (everything but steps and data waits) as a share of the run's wall time.

Then the median over the runs after the first (the first also pays for cold caches). CPU and core count are printed
with the numbers; compare ratios, not absolute times, across machines.
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

WORKER_PHASES = ("process_s", "engine_s", "steps_s", "data_wait_s", "loop_other_s", "validation_s", "checkpoint_s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--config", default=None)
    args = parser.parse_args()

    from pipeline import runner
    from pipeline.config import load_config
    from pipeline.raycluster import ensure_ray

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    print(f"CPU: {cpu}, {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as tmp:
        base = [f"run.root={tmp}", "tracking.enabled=false", f"train.max_steps={args.steps}"]
        started = time.time()
        ensure_ray(load_config(args.config, base))
        print(f"Ray start: {time.time() - started:.1f}s")
        runner.run_pipeline(load_config(args.config, base), stages=("data",), log=lambda _: None)
        rows = []
        for i in range(args.runs):
            cfg = load_config(args.config, [*base, f"train.seed={i}"])  # a new hash: the train stage runs again
            started = time.time()
            manifest = runner.run_pipeline(cfg, stages=("data", "train"), log=lambda _: None)["train"]
            wall = time.time() - started
            final = json.loads(Path(manifest.outputs["metrics"]).read_text())["final"]
            row = {p: float(final.get(f"phase/{p}", float("nan"))) for p in WORKER_PHASES}
            row["stage_wall_s"] = wall
            row["ray_train_other_s"] = wall - sum(row[p] for p in WORKER_PHASES)
            row["fixed_share"] = 1.0 - (row["steps_s"] + row["data_wait_s"]) / wall
            rows.append(row)
            print(f"run {i + 1}: " + ", ".join(f"{k} {v:.1f}" for k, v in row.items() if k != "fixed_share")
                  + f", fixed cost {row['fixed_share']:.0%} of the wall time")
    later = rows[1:] or rows
    print(f"median of runs 2..{len(rows)}:")
    for key in (*WORKER_PHASES, "ray_train_other_s", "stage_wall_s"):
        print(f"  {key:20s} {statistics.median(r[key] for r in later):6.1f}")
    print(f"  fixed cost share     {statistics.median(r['fixed_share'] for r in later):6.0%}")


if __name__ == "__main__":
    main()
