#!/usr/bin/env python
"""Run the NormBT reward-model pipeline.

    python run_pipeline.py [--config FILE] [--run-dir DIR] [--stages a,b] [key=value ...]

Defaults: ``configs/default.yaml`` (offline, minutes on 2 CPU cores) and ``runs/<run.name>``.
A rerun skips finished stages and resumes a failed one.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML file (default: configs/default.yaml)")
    parser.add_argument("--run-dir", default=None, help="run directory (default: <run.root>/<run.name>)")
    parser.add_argument("--stages", default=None, help="comma-separated subset of stages, in order")
    parser.add_argument("--describe", action="store_true", help="print every config key with its doc and exit")
    parser.add_argument("overrides", nargs="*", help="section.key=value (value parsed as YAML)")
    args = parser.parse_args(argv)

    from pipeline.config import ConfigError, describe, load_config
    from pipeline.runner import PipelineError, run_dir_of, run_pipeline

    if args.describe:
        print(describe())
        return 0
    try:
        cfg = load_config(args.config, args.overrides)
        stages = tuple(s.strip() for s in args.stages.split(",") if s.strip()) if args.stages else None
        run_pipeline(cfg, run_dir=args.run_dir, stages=stages)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except PipelineError as err:
        resume = " ".join(["python run_pipeline.py", *sys.argv[1:]]) if argv is None else "the same command"
        print(f"error: {err}\nfix the cause and rerun `{resume}`: finished stages are skipped and the failed "
              f"one resumes (run dir: {run_dir_of(cfg, args.run_dir)})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return 130
    finally:
        from pipeline.raycluster import shutdown_if_started

        shutdown_if_started()
    return 0


if __name__ == "__main__":
    sys.exit(main())
