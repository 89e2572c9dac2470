#!/usr/bin/env python
"""Run the NormBT reward-model pipeline, or serve a trained reward model.

    python run_pipeline.py [--config FILE] [--run-dir DIR] [--stages a,b] [key=value ...]
    python run_pipeline.py serve [--config FILE] [--model M] [--host H] [--port P] [key=value ...]
    python run_pipeline.py score --model M --input F --output scores.parquet [--format FMT] [key=value ...]

Defaults: ``configs/default.yaml`` (offline, minutes on 2 CPU cores) and ``runs/<run.name>``.
A rerun skips finished stages and resumes a failed one. ``serve`` deploys the registry's champion (or ``--model``:
models:/name@alias, a run directory, a save_pretrained folder) on Ray Serve until Ctrl-C (see pipeline/serving.py);
``score`` scores a file of conversations or pairs with it on Ray Data (see pipeline/batch_scoring.py).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["serve"]:
        return serve(args[1:])
    if args[:1] == ["score"]:
        return score(args[1:])
    return run(argv)


def serve(argv: list[str]) -> int:
    """``run_pipeline.py serve``: deploy the reward model and block until Ctrl-C or SIGTERM."""
    import time

    parser = argparse.ArgumentParser(prog="run_pipeline.py serve", description=serve.__doc__)
    parser.add_argument("--config", default=None)
    parser.add_argument("--model", default=None, help="models:/name@alias, models:/name/<version|latest>, a run "
                                                      "directory or a save_pretrained folder")
    parser.add_argument("--host", default=None, help="address to bind (default serve.host, 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port (default serve.port, 8000)")
    parser.add_argument("overrides", nargs="*", help="section.key=value (value parsed as YAML)")
    args = parser.parse_args(argv)
    from pipeline import serving
    from pipeline.config import ConfigError, load_config
    from pipeline.raycluster import shutdown_if_started

    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        cfg = load_config(args.config, args.overrides)
        url = serving.start(cfg, model=args.model, host=args.host, port=args.port)
        print(f"serving at {url}: POST /get_reward, POST /v1/score/evaluation, POST /score, GET /health, "
              f"GET /metadata (Ctrl-C stops)", flush=True)
        while True:
            time.sleep(3600)
    except (ConfigError, FileNotFoundError, serving.ServeRunningElsewhere) as err:
        print(f"serve: {err}", file=sys.stderr)
        return 2
    except Terminated:
        return 143
    except KeyboardInterrupt:
        return 0
    finally:
        serving.stop()
        shutdown_if_started()
        signal.signal(signal.SIGTERM, previous)


def score(argv: list[str]) -> int:
    """``run_pipeline.py score``: rewards of a file's conversations or preference pairs, on Ray Data."""
    parser = argparse.ArgumentParser(prog="run_pipeline.py score", description=score.__doc__)
    parser.add_argument("--config", default=None)
    parser.add_argument("--model", default=None, help="as for serve (default serve.model, else the champion)")
    parser.add_argument("--input", required=True, help="a JSONL/JSON/Parquet file, glob or folder")
    parser.add_argument("--output", required=True, help="the Parquet file to write")
    parser.add_argument("--format", default="auto", help="the pairs' format (default: detected per row)")
    parser.add_argument("overrides", nargs="*", help="section.key=value (value parsed as YAML)")
    args = parser.parse_args(argv)
    from pipeline import batch_scoring, serving
    from pipeline.config import ConfigError, load_config
    from pipeline.raycluster import ensure_ray, shutdown_if_started

    try:
        cfg = load_config(args.config, args.overrides)
        folder, _ = serving.resolve_model(cfg, args.model)
        ensure_ray(cfg)
        summary = batch_scoring.score_file(cfg, folder, args.input, args.output, fmt=args.format)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"score: {err}", file=sys.stderr)
        return 2
    finally:
        shutdown_if_started()
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(summary["reasons"].items())) or "none"
    print(f"scored {summary['conversations']} conversations and {summary['pairs']} pairs into {summary['output']}; "
          f"quarantined {summary['quarantined']} rows ({reasons}) into {summary['quarantine']}", flush=True)
    return 0


class Terminated(KeyboardInterrupt):
    """SIGTERM (what Slurm, systemd and Kubernetes send first), raised where Ctrl-C would be: the same path
    out (Tune and Ray Train stop, the stage stays unfinished, Ray is shut down), then exit 143 (128 + 15)."""


def _on_sigterm(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the shutdown short
    raise Terminated()


def run(argv: list[str] | None = None) -> int:
    """The pipeline, with SIGTERM handled as Ctrl-C while it runs (the previous handler is put back after)."""
    import threading

    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        return _run(argv)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _run(argv)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML file (default: configs/default.yaml)")
    parser.add_argument("--run-dir", default=None, help="run directory (default: <run.root>/<run.name>)")
    parser.add_argument("--stages", default=None, help="comma-separated subset of stages, in order")
    parser.add_argument("--describe", action="store_true", help="print every config key with its doc and exit")
    parser.add_argument("--verbose", action="store_true", help="the libraries' own lines too: Ray Train's reports, Tune's trial "
                        "tables, transformers' load reports (run.log_level=INFO)")
    parser.add_argument("--plan", action="store_true", help="print the memory plan per GPU and exit (1 if it cannot fit)")
    parser.add_argument("--json", action="store_true", help="with --plan: print it as JSON")
    parser.add_argument("overrides", nargs="*", help="section.key=value (value parsed as YAML)")
    args = parser.parse_args(argv)

    from pipeline.config import ConfigError, describe, load_config
    from pipeline.runner import PipelineError, run_dir_of, run_pipeline

    if args.describe:
        print(describe())
        return 0
    if args.plan:
        return plan(args)
    try:
        cfg = load_config(args.config, [*args.overrides, *(["run.log_level=INFO"] if args.verbose else [])])
        stages = tuple(s.strip() for s in args.stages.split(",") if s.strip()) if args.stages else None
        from pipeline.raycluster import quiet_this_process

        quiet_this_process(cfg)
        run_pipeline(cfg, run_dir=args.run_dir, stages=stages)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except PipelineError as err:
        resume = " ".join(["python run_pipeline.py", *sys.argv[1:]]) if argv is None else "the same command"
        print(f"error: {err}\nfix the cause and rerun `{resume}`: finished stages are skipped and the failed "
              f"one resumes (run dir: {run_dir_of(cfg, args.run_dir)})", file=sys.stderr)
        return 1
    except OSError as err:  # a full disk outside a stage (config.yaml, a manifest): said as plainly
        from pipeline.runner import disk_full

        full = disk_full(err, run_dir_of(cfg, args.run_dir))
        if full is None:
            raise
        print(f"error: {full}\nfree space and rerun the same command: finished stages are skipped",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:
        # Tune turns a signal into an early return and the stage raises its own KeyboardInterrupt: the type of
        # ``err`` does not say which signal came, the handler does.
        terminated = isinstance(err, Terminated) or signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
        print(f"{'terminated (SIGTERM)' if terminated else 'interrupted'}: rerun the same command to resume",
              file=sys.stderr)
        return 143 if terminated else 130
    finally:
        from pipeline.raycluster import shutdown_if_started

        shutdown_if_started()
    return 0


def plan(args: argparse.Namespace) -> int:
    """``--plan``: the memory plan (pipeline/memory_plan.py) of the config, from the model's config alone."""
    import json

    from pipeline import memory_plan
    from pipeline.config import ConfigError, load_config

    try:
        result = memory_plan.plan(load_config(args.config, args.overrides))
    except (ConfigError, memory_plan.PlanError) as err:
        print(f"plan: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result.to_json(), indent=2) if args.json else memory_plan.render(result))
    return 1 if result.fits is False else 0


if __name__ == "__main__":
    sys.exit(main())
