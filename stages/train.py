"""Train stage: Ray Train (V2) + DeepSpeed ZeRO trains the reward model; resumable; exported as a plain HF folder.

Entry: :func:`train_reward_model` (stage ``train``). The driver and worker live in :mod:`pipeline.ray_train`, the
loop in :mod:`pipeline.train_loop` (which also runs under ``torchrun`` without Ray).

Outputs (manifest names): ``model`` — a ``save_pretrained`` folder (safetensors, tokenizer, chat template,
``reward_mean``/``reward_std`` over the validation set in ``config.json``); ``checkpoint`` — the last Ray Train
checkpoint; ``metrics`` — ``metrics.json`` with the final validation metrics and the effective config;
``validation_rewards`` — ``validation_rewards.parquet``, the final evaluation per validation pair in the split's
row order (``row, reward_chosen, reward_rejected, distance``); ``gradient_pairs`` — ``gradient_pairs.csv``
(``distance, grad_norm``): every ``train.grad_diag_every`` steps, rank 0's first micro-batch, each pair's distance
and the norm of the gradient its loss term sends to the score head (the paper's mechanism: proportional to the
distance under BT, flat under NormBT), recorded since the worker group last started; the log-log slope is the
final metric ``grad/distance_slope``.

``train.continue_search``: when the search's best trial trained the first steps of this very run
(:mod:`pipeline.continuation`), the run starts from that trial's final checkpoint and trains the rest; the trial's
metric history up to there is copied into this stage's MLflow run, so the curves start at step 1 (the gradient
record starts where this run did).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from pipeline.config import PipelineConfig, flatten, from_flat
from pipeline.memory_plan import refuse_if_unfit
from pipeline.ray_train import build_trainer, count_rows, remove_unregistered_checkpoints, storage_of
from pipeline.continuation import continuation_problem
from pipeline.train_loop import GRADIENT_PAIRS, VALIDATION_REWARDS, checkpoint_problem, last_step, plan_steps
from pipeline.stage import StageContext, StageResult


def effective_config(ctx: StageContext) -> PipelineConfig:
    """The run's config with the tune stage's best hyperparameters applied when tune ran."""
    tune = ctx.upstream.get("tune")
    if tune is None or "best_config" not in tune.outputs:
        return ctx.cfg
    best = json.loads(Path(tune.output("best_config")).read_text())
    return from_flat(best, base=ctx.cfg, where=f"tune best config {tune.output('best_config')}")


def train_reward_model(ctx: StageContext) -> StageResult:
    from pipeline.raycluster import ensure_ray

    cfg = effective_config(ctx)
    if cfg.train.use_gpu:  # before any worker starts: a run that cannot fit fails now, saying what would fit
        refuse_if_unfit(cfg, log=ctx.log)
    ensure_ray(cfg)
    data = ctx.upstream["data"]
    if "datasets" in data.outputs:  # the data this model trains on, in the run's Dataset column and lineage
        ctx.tracker.log_datasets(json.loads(Path(data.output("datasets")).read_text()))
    storage = storage_of(cfg, ctx.run_dir)
    name = _run_name(ctx, storage)
    if "://" not in storage:
        for stale in remove_unregistered_checkpoints(Path(storage) / name):
            ctx.log(f"  train: removed {stale}, a checkpoint written but never registered by Ray Train")
    start = _search_start(ctx, cfg) if cfg.train.continue_search else None
    trainer = build_trainer(cfg, ctx.upstream["data"], name=name, storage_path=storage,
                            tracking_uri=ctx.tracker.uri, run_id=ctx.tracker.run_id, tracking_spool=ctx.tracker.spool,
                            initial_checkpoint=start)
    try:
        result = trainer.fit()
    except Exception as err:  # Ray wraps worker errors; surface the worker's own message
        raise RuntimeError(_worker_message(err)) from err
    return _export(ctx, cfg, result)


def _search_start(ctx: StageContext, cfg: PipelineConfig) -> str | None:
    """The search's best trial's checkpoint when this run continues it (:mod:`pipeline.continuation`), its
    metric history copied into this run so the curves start at step 1; else None, and the log says why."""
    tune = ctx.upstream.get("tune")
    if tune is None or "best_trial" not in tune.outputs:
        ctx.log("  train: train.continue_search is on, but no search-mode trial finished with a checkpoint to "
                "continue: training from step 0")
        return None
    trial = json.loads(Path(tune.output("best_trial")).read_text())
    data = ctx.upstream["data"]
    horizon, _ = plan_steps(cfg, count_rows(data.output("train")))
    last = last_step(cfg, horizon)
    problem = continuation_problem(trial["config"], flatten(cfg), last)
    if problem is None and trial.get("data_hash") != data.hash:
        problem = f"the search trained on other data (data stage {trial.get('data_hash')}, this run's {data.hash})"
    if problem is None and trial.get("horizon") != horizon:
        problem = f"the search's schedule spans {trial.get('horizon')} steps, this run's {horizon}"
    if problem is None and "://" not in trial["checkpoint"]:
        problem = checkpoint_problem(trial["checkpoint"])
    if problem is not None:
        ctx.log(f"  train: not continuing the search's best trial: {problem}; training from step 0")
        return None
    steps = int(trial["config"]["train.stop_after_steps"])
    ctx.log(f"  train: continues the search's best trial {trial['trial_id']} after its {steps} steps, the first "
            f"{steps} of this run's {last}")
    _copy_history(ctx, trial.get("mlflow_run_id") or "", steps)
    return trial["checkpoint"]


def _copy_history(ctx: StageContext, trial_run_id: str, steps: int) -> None:
    """The trial's per-step metrics up to ``steps`` into this stage's MLflow run (each attempt of the stage has
    a run of its own). Metrics the trial logged only at its end (its phase times, gradient slope, parameter
    counts) describe the trial, not this run, and stay there. Reading the trial's run is best effort: the
    curves' start is not worth failing the training for (an MLflow outage)."""
    if not (ctx.tracker.active and trial_run_id):
        return
    from pipeline.report import metric_history

    try:
        keys = list(ctx.tracker.client.get_run(trial_run_id).data.metrics)
        history = metric_history(ctx.tracker.uri, trial_run_id, keys)
    except Exception as err:  # noqa: BLE001 - said, and training goes on
        ctx.log(f"  train: the trial's metric history was not copied ({type(err).__name__}: {err})")
        return
    by_step: dict[int, dict[str, float]] = {}
    for key, (at, values) in history.items():
        if min(at) >= steps:
            continue  # logged only at the trial's end
        for step, value in zip(at, values):
            if step <= steps:
                by_step.setdefault(int(step), {})[key] = value
    for step in sorted(by_step):
        ctx.tracker.log_metrics(by_step[step], step=step)


def _run_name(ctx: StageContext, storage: str) -> str:
    """The Ray Train run name carries the stage hash: a rerun of the same stage (after the driver died) finds its
    checkpoints and continues, while a changed config starts afresh. Under one name for every config, a rerun
    after a change loaded the earlier run's final checkpoint, trained nothing and exported the old weights.
    In the run directory's own storage (no ``ray.storage_path``), folders of other hashes are removed: they can
    never be resumed, and no other run writes there. Shared storage is left alone."""
    from pipeline.stage import STAGES, stage_hash

    prefix = f"train-{ctx.run_dir.name}"
    name = f"{prefix}-{stage_hash(ctx.cfg, STAGES['train'], ctx.upstream)[:12]}"
    if not ctx.cfg.ray.storage_path and Path(storage).is_dir():
        for stale in Path(storage).glob(f"{prefix}-*"):
            if stale.name != name and stale.is_dir() and re.fullmatch(rf"{re.escape(prefix)}-[0-9a-f]{{12}}", stale.name):
                shutil.rmtree(stale, ignore_errors=True)
    return name


def _worker_message(err: Exception) -> str:
    text = str(err)
    for marker in ("FloatingPointError: ", "ValueError: ", "RuntimeError: "):
        if marker in text:
            return "training failed: " + text.split(marker, 1)[1].splitlines()[0]
    return f"training failed: {text.splitlines()[0] if text else type(err).__name__}"


def _export(ctx: StageContext, cfg: PipelineConfig, result: Any) -> StageResult:
    checkpoint = result.checkpoint
    if checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    model_dir = ctx.out_dir / "model"
    shutil.rmtree(model_dir, ignore_errors=True)
    with checkpoint.as_directory() as folder:
        shutil.copytree(Path(folder) / "model", model_dir)
        shutil.copy(Path(folder) / VALIDATION_REWARDS, ctx.out_dir / VALIDATION_REWARDS)
        shutil.copy(Path(folder) / GRADIENT_PAIRS, ctx.out_dir / GRADIENT_PAIRS)
    final = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}
    metrics_path = ctx.out_dir / "metrics.json"
    metrics_path.write_text(json.dumps({"final": final, "config": {k: str(v) for k, v in flatten(cfg).items()}},
                                       indent=2))
    ctx.tracker.log_artifact(metrics_path)
    ctx.tracker.set_tags({"checkpoint": checkpoint.path, "model": str(model_dir)})
    ctx.log(f"  train: val_accuracy {final.get('val_accuracy', float('nan')):.3f} after {final.get('step')} steps; "
            f"model at {model_dir}")
    return StageResult(outputs={"model": str(model_dir), "checkpoint": checkpoint.path, "metrics": str(metrics_path),
                                "validation_rewards": str(ctx.out_dir / VALIDATION_REWARDS),
                                "gradient_pairs": str(ctx.out_dir / GRADIENT_PAIRS)},
                       metrics={k: v for k, v in final.items() if k.startswith("val_")},
                       metrics_step=int(final.get("step") or 0))


