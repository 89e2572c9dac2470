"""Run the stages in order, hand each its upstream manifests, skip what is already done.

The stages and the inputs each declares are in :mod:`pipeline.stage`. A rerun of a finished run does nothing
and says so; a stage that crashed has no manifest: the rerun resumes there (and inside training, at the last
checkpoint).
"""

from __future__ import annotations

import importlib
import sys
import time
import traceback
from pathlib import Path
from collections.abc import Callable, Mapping

from pipeline import tracking
from pipeline.artifacts import Manifest, now, read_manifest, write_manifest
from pipeline.config import PipelineConfig, to_yaml
from pipeline.outcome import outcome
from pipeline.stage import STAGES, StageContext, StageResult, StageSpec, stage_hash


class PipelineError(RuntimeError):
    """A failure reported to the user as one clear message (no bare traceback)."""


def run_dir_of(cfg: PipelineConfig, run_dir: str | Path | None = None) -> Path:
    return Path(run_dir) if run_dir else Path(cfg.run.root) / cfg.run.name


def _load_entry(spec: StageSpec) -> Callable[[StageContext], StageResult]:
    module_name, _, func = spec.entry.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name == module_name:
            raise PipelineError(f"stage {spec.name!r} is not implemented in this version ({module_name})") from None
        raise
    return getattr(module, func)


def _upstream(spec: StageSpec, run_dir: Path) -> dict[str, Manifest]:
    found: dict[str, Manifest] = {}
    for name in (*spec.needs, *spec.uses):
        manifest = read_manifest(run_dir, name)
        if manifest is None and name in spec.needs:
            raise PipelineError(f"stage {spec.name!r} needs stage {name!r}, which has not finished in {run_dir}; "
                                f"run it first, e.g. --stages {name},{spec.name}")
        if manifest is not None:
            found[name] = manifest
    return found


def run_pipeline(cfg: PipelineConfig, *, run_dir: str | Path | None = None, stages: tuple[str, ...] | None = None,
                 log: Callable[[str], None] = print) -> dict[str, Manifest]:
    """Run ``stages`` (default ``cfg.run.stages``) and return every stage's manifest."""
    names = tuple(stages or cfg.run.stages)
    unknown = [n for n in names if n not in STAGES]
    if unknown:
        raise PipelineError(f"unknown stage(s) {unknown}; valid: {', '.join(STAGES)}")
    from pipeline.preflight import problems

    found = problems(cfg, names)
    if found:  # before anything is written
        raise PipelineError("preflight failed:\n  - " + "\n  - ".join(found))
    run_dir = run_dir_of(cfg, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    log(f"plan: {' -> '.join(names)}   (run dir: {run_dir})")
    try:
        parent = tracking.start_pipeline_run(cfg, run_dir)
    except tracking.TrackingUnavailable as err:
        raise PipelineError(str(err)) from None
    manifests: dict[str, Manifest] = {}
    try:
        for i, name in enumerate(names, 1):
            manifests[name] = _run_stage(cfg, STAGES[name], run_dir, parent, f"[{i}/{len(names)}]", log)
    except BaseException:
        parent.finish("FAILED")
        raise
    parent.finish("FINISHED")
    log(summary(cfg, run_dir, manifests, parent))
    return manifests


def summary(cfg: PipelineConfig, run_dir: Path, manifests: Mapping[str, Manifest], parent: tracking.RunLogger) -> str:
    """The closing lines: key metrics, where things are, how to look at them."""
    lines = ["", "summary:"]
    shows = outcome(manifests, cfg.tune.metric)
    if shows:
        lines.append(f"  this run shows: {shows}")
    for name, manifest in manifests.items():
        shown = {k: v for k, v in manifest.metrics.items() if isinstance(v, (int, float))}
        keys = [k for k in shown if any(t in k for t in ("overall", "val_accuracy", "gold", "rows_", "quarantined",
                                                         "best_val", "version"))][:6]
        lines.append(f"  {name:12s} " + ", ".join(f"{k}={shown[k]:.4g}" for k in keys))
    lines.append(f"  run dir: {run_dir.resolve()}")
    if parent.active:
        lines.append(f"  MLflow run: {parent.run_id} at {tracking.redact(parent.uri)}")
        if parent.pending():
            lines.append(f"  MLflow: {parent.pending()} logging call(s) could not be sent (server unreachable); they are "
                         f"kept in {parent.spool} and sent by the next run of this command")
        if parent.uri.startswith("sqlite:"):
            lines.append(f"  open the UI: mlflow ui --backend-store-uri {parent.uri}")
    report = manifests.get("register")
    if report and "report" in report.outputs:
        lines.append(f"  report: {report.outputs['report']}")
    return "\n".join(lines)


def disk_full(err: BaseException, run_dir: Path) -> str | None:
    """A full disk in ``err`` or what caused it, in words naming the path and the space left under the run
    directory; None for any other failure. Ray hands a worker's error over as text, so its message counts too."""
    import errno
    import shutil

    seen: BaseException | None = err
    found = None
    while seen is not None and found is None:
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            found = seen.filename or run_dir
        elif "No space left on device" in str(seen):  # Ray's copy to storage names no file: the run dir's
            under = (w.strip("'\",:()") for w in str(seen).split())
            found = next((w for w in under if w.startswith(str(Path(run_dir).resolve()))), run_dir)
        seen = seen.__cause__ or seen.__context__
    if found is None:
        return None
    try:
        free = f"{shutil.disk_usage(run_dir).free / 2**20:.1f} MiB free there"
    except OSError:
        free = "free space unknown"
    if Path(found) == Path(run_dir):
        return f"no space left on device under the run directory {run_dir} ({free})"
    return f"no space left on device writing {found} (run directory {run_dir}: {free})"


def _save_traceback(path: Path) -> str:
    """Write the current traceback to ``path``; on a full disk it may not fit: then it is printed instead."""
    text = traceback.format_exc()
    try:
        path.write_text(text)
        return str(path)
    except OSError as err:
        print(text, file=sys.stderr)
        return f"printed above ({path} could not be written: {err.strerror})"


def _run_stage(cfg: PipelineConfig, spec: StageSpec, run_dir: Path, parent: tracking.RunLogger, tag: str,
               log: Callable[[str], None]) -> Manifest:
    upstream = _upstream(spec, run_dir)
    digest = stage_hash(cfg, spec, upstream)
    previous = read_manifest(run_dir, spec.name)
    if previous is not None and previous.hash == digest:
        log(f"{tag} {spec.name}: up to date, skipped (hash {digest})")
        return previous
    entry = _load_entry(spec)
    out_dir = run_dir / spec.name
    out_dir.mkdir(parents=True, exist_ok=True)
    log(f"{tag} {spec.name}: running ...")
    started = now()
    try:
        tracker = parent.child(spec.name, tags={"pipeline.stage": spec.name, "pipeline.hash": digest})
    except tracking.TrackingUnavailable as err:
        raise PipelineError(f"stage {spec.name!r} could not start: {err}") from None
    with tracking.ended(tracker):
        try:
            result = entry(StageContext(cfg=cfg, run_dir=run_dir, out_dir=out_dir, upstream=upstream,
                                        tracker=tracker, log=log))
        except Exception as err:
            where = _save_traceback(out_dir / "error.log")
            full = disk_full(err, run_dir)
            if full:
                raise PipelineError(f"stage {spec.name!r} failed: {full}; the stage is not marked done: free "
                                    f"space there and rerun\n  full traceback: {where}") from err
            raise PipelineError(f"stage {spec.name!r} failed: {type(err).__name__}: {err}\n"
                                f"  full traceback: {where}") from err
        tracker.log_metrics({k: v for k, v in result.metrics.items() if isinstance(v, (int, float))},
                            step=result.metrics_step)
    manifest = Manifest(stage=spec.name, hash=digest, outputs=result.outputs, mlflow_run_id=tracker.run_id,
                        started_at=started, finished_at=now(), metrics=result.metrics)
    write_manifest(run_dir, manifest)
    log(f"{tag} {spec.name}: done in {time.time() - started:.1f}s")
    return manifest
