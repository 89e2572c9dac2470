#!/usr/bin/env python
"""Run the NormBT reward-model pipeline, or serve a trained reward model.

    python run_pipeline.py [--config FILE] [--run-dir DIR] [--stages a,b] [key=value ...]
    python run_pipeline.py serve [--config FILE] [--model M] [--host H] [--port P] [key=value ...]

Defaults: ``configs/default.yaml`` (offline, minutes on 2 CPU cores) and ``runs/<run.name>``.
A rerun skips finished stages and resumes a failed one. ``serve`` deploys the registry's champion (or ``--model``:
models:/name@alias, a run directory, a save_pretrained folder) on Ray Serve until Ctrl-C (see pipeline/serving.py).
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
    return run(argv)


def serve(argv: list[str]) -> int:
    """``run_pipeline.py serve``: deploy the reward model and block until Ctrl-C."""
    import time

    parser = argparse.ArgumentParser(prog="run_pipeline.py serve", description=serve.__doc__)
    parser.add_argument("--config", default=None)
    parser.add_argument("--model", default=None, help="models:/name@alias, a run directory or a save_pretrained folder")
    parser.add_argument("--host", default=None, help="address to bind (default serve.host, 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port (default serve.port, 8000)")
    parser.add_argument("overrides", nargs="*", help="section.key=value (value parsed as YAML)")
    args = parser.parse_args(argv)
    from pipeline import serving
    from pipeline.config import ConfigError, load_config
    from pipeline.raycluster import shutdown_if_started

    try:
        cfg = load_config(args.config, args.overrides)
        url = serving.start(cfg, model=args.model, host=args.host, port=args.port)
    except (ConfigError, FileNotFoundError) as err:
        print(f"serve: {err}", file=sys.stderr)
        return 2
    print(f"serving at {url}: POST /get_reward, POST /score, GET /health, GET /metadata (Ctrl-C stops)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        serving.stop()
        shutdown_if_started()


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


if __name__ == "__main__":
    sys.exit(main())
