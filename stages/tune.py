"""Tune stage: Ray Tune over training trials: a hyperparameter search (ASHA) or a seeded loss comparison.

Entry: :func:`tune_reward_model` (stage ``tune``). Every trial is the Tune *function* trainable
:func:`run_trial` (Ray Train V2 rejects ``Tuner(trainer)``): it builds the trial's config, opens a nested
MLflow run ``trial-<trial id>`` under the stage's run (all params of the trial config; the training's rank 0
logs the per-step and final metrics into it), then trains by ``tune.trial_launcher``:

* ``in_process`` (what ``auto`` picks unless a trial trains on several GPUs): the trial's own Tune actor runs
  :func:`pipeline.train_loop.train_local` as one rank, with ``train.micro_batch_size × train.num_workers``
  pairs per forward, so the global batch, the steps and the pairs of each step are those of the Ray Train run
  (:func:`pipeline.train_loop.one_process_config`). Tune reuses the actor from trial to trial
  (``reuse_actors``): after the first trial, a trial starts without a new process, imports or worker group.
  The actor reserves the workers' CPUs (and one GPU) and computes with their threads. Reports and checkpoints
  go to Tune (``ray.tune.report``); an ASHA stop ends the trial at its next report.
* ``ray_train``: the trial fits the stage-shared :func:`pipeline.ray_train.build_trainer` ``TorchTrainer`` with
  a ``TuneReportCallback``, so every ``ray.train.report`` of the workers reaches Tune and its scheduler: a new
  worker group per trial (``benchmarks/README.md``: about 40 s of start-up per trial on 2 CPU cores, against
  about 2 s in process).

Trial config = the run's config ← ``tune.trial_overrides`` ← the trial's own values (searched keys, or a loss
setting and seed); the searched values win over the overrides.

Search (``tune.mode: search``): ``tune.search_space`` maps dotted keys to ``{uniform: [a, b]}``,
``{loguniform: [a, b]}``, ``{choice: [...]}`` or ``{randint: [a, b]}`` (``b`` excluded, as in Tune);
``tune.num_samples`` trials are drawn by Optuna's TPE when ``optuna`` is importable, else by Tune's random
search, both seeded with ``run.seed`` (a rerun draws the same trials); with ``tune.start_from_config`` the
first trial runs the configured values of the searched keys, a baseline the others must beat; and ASHA stops weak trials early. The objective is ``tune.metric`` (validation accuracy: the train
stage's held-out validation split, never a test set or RewardBench), maximised.

*When ASHA sees the metric.* The workers report every ``train.log_every`` steps, but ``val_accuracy`` only at
evaluation steps and in the final report. So when ``train.eval_every`` is 0 (after the overrides) each trial
gets ``train.eval_every = max(1, max_steps // tune.eval_reports)``. ASHA runs on ``time_attr="step"`` with
``grace_period = tune.grace_period × eval_every`` steps (``tune.grace_period`` counts validation reports) and
``max_t`` = the trial's step budget; reports without the metric are skipped by ASHA, and Tune's strict metric
check, which would reject them, is switched off for the stage (``TUNE_DISABLE_STRICT_METRIC_CHECKING``). Only
a trial that ran to its end (``final`` report) has a checkpoint, so the best trial is the completed one with the
highest metric (ties: first trial id); early-stopped trials are listed but only chosen if none completed.

Compare (``tune.mode: compare``): the grid ``tune.losses`` × ``tune.seeds`` (seed ``train.seed + i`` sets
``train.seed`` and ``model.seed``), one trial each via ``tune.grid_search`` over an index, FIFO (no early
stopping). Each trial's exported model (``model/`` of its final checkpoint) is then scored on
``rewardbench.benchmarks`` with :func:`pipeline.benchmarks.score_benchmark` (files under
``<out>/scores/<loss>-seed<s>/``, metrics into the trial's MLflow run). For the validation accuracy, each
benchmark's overall score and each of its sections, the table gives the mean and 95% t-interval over seeds per
loss setting, and for the paired difference (setting − first setting, paired by seed).

Each loss at its own lr (``tune.compare_lr_grid``, empty by default): before the seeded trials, every setting
that does not fix ``train.lr`` itself trains at each grid lr with ``tune.compare_lr_seeds`` seeds (a Tune
experiment of its own, ``<storage>/tune_lr``), and keeps the lr with the best mean ``tune.metric`` on the
validation split (ties: the smaller lr; :func:`pipeline.compare.choose_lrs`); these trials are never scored on a
benchmark. The setting's seeds then all train at that lr; ``lr_search.csv`` [lr_search] lists every (setting,
lr) with its mean, and ``compare.csv`` and ``trials.csv`` name each setting's lr.

Resources: in process, a trial's actor reserves ``train.num_workers × train.cpus_per_worker`` CPUs (and one
GPU when training on GPUs). With Ray Train, a trial function reserves 0.1 CPU (:data:`TRIAL_CPUS`) and its
Train workers ``train.num_workers × train.cpus_per_worker``. Unless ``tune.max_concurrent_trials`` is set,
concurrency = ⌊(CPUs − ``tune.reserve_cpus``) / per-trial CPUs⌋ ≥ 1 (:func:`derive_concurrency`; one on 2
cores). Both read the train/validation splits in the trial function; with Ray Train they reach the workers as
in-memory datasets: the TorchTrainer's own Parquet read tasks want a whole CPU, and on 2 cores the trial (0.1)
plus its workers (2 × 0.5) leave 0.9, so they would wait forever.

What follows about stopped trials and placement groups concerns the Ray Train launcher (an in-process trial
holds no placement group of its own beyond Tune's). A trial stopped by ASHA is killed with its Train controller; Ray Train's cleaner then releases the workers'
placement group through the dashboard's State API (:func:`pipeline.raycluster.ensure_ray` keeps the dashboard
on). That cleaner finds its cluster by auto-detection and fails when a second Ray instance runs on the machine
("Found multiple active Ray instances"): the CPUs stay reserved and the next trial would starve. So: (1) a trial
first waits until one CPU is free (what its workers need on the library's default 2 × 0.5); when it is the only trial running, this
job's Train-sized placement groups still there after 10 s are leftovers and are removed (State API with the
cluster's address given explicitly); past the controller's patience (``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S``,
60 s, × (1 + ``tune.controller_failure_limit``)) it errors out naming the cause; (2) its TorchTrainer gets
``FailureConfig.controller_failure_limit = tune.controller_failure_limit``, so a worker group that cannot start
errors the trial out instead of retrying forever; (3) after the experiment, placement groups this job created
during it and still holds are removed, so later stages get their CPUs back. Tune never retries a failed trial.

Resume: Ctrl-C makes Tune save its state and return early; the stage then raises ``KeyboardInterrupt`` (no
manifest; ``run_pipeline.py`` exits 130). The experiment lives at ``<storage>/tune`` (``storage`` =
``ray.storage_path`` or ``<run dir>/ray_storage``); an in-process trial's checkpoints live in its Tune trial
folder, a Ray Train trial's Train run at ``<storage>/tune_trials/trial-<trial id>``. When the stage is rerun
after an interruption with the same stage hash (``experiment.json`` in the stage folder),
``Tuner.restore(..., resume_errored=True)`` continues it: finished trials are kept, unfinished ones rerun from
their last checkpoint (``train.checkpoint_every``; none by default, so from the start). A
different hash starts afresh (a local stale experiment is deleted). Trials finished before the interruption
keep their MLflow runs under the earlier attempt's stage run (every trial run is tagged ``tune.trial_id`` and
``tune.hash``). In compare mode a benchmark a model already scored under the same hash (``scored.json``, written
after its files) is read back rather than scored again, so a run stopped while scoring loses only the model in hand.

Outputs (stage folder; manifest names in brackets):

* ``trials.csv`` [trials]: one row per trial: ``trial_id``, its values (search: the searched keys; compare:
  ``loss``, ``seed`` and the setting's keys), ``<metric>``, ``step``, ``status`` (``COMPLETED``: ran to the
  end; ``STOPPED``: stopped early by ASHA; ``ERROR``), ``best``, ``checkpoint``, ``mlflow_run_id``, ``error``,
  and in compare mode the benchmark metrics.
* ``best_config.json`` [best_config]: only the chosen dotted keys → values (search: the searched keys of the
  best trial; compare: the loss setting with the higher mean validation accuracy, with its searched
  ``train.lr`` when the lr search ran). The train stage applies it.
* [best_checkpoint]: the best trial's final Ray Train checkpoint (search mode, when it completed).
* ``best_trial.json`` [best_trial]: with it, the trial's id, MLflow run id and the whole flat config it trained
  with (an in-process trial as one rank): the train stage's ``train.continue_search`` continues it from there.
* compare mode: ``compare.csv`` [compare_table] (``loss, metric, mean, ci_low, ci_high, n, lr``; ``loss`` is a
  setting's label or ``diff`` — with more than two settings ``diff:<label>-<first label>``; metrics: the
  validation metric, each benchmark's overall and sections, and ``grad/distance_slope``) and
  ``compare.png`` [compare_plot]. Pair-level evidence, each later setting against the first (the analysis is
  :mod:`pipeline.compare_analysis`; this stage scores the trials and the reference model and writes its results):
  ``paired_stats.csv`` [paired_stats] (per benchmark, for all pairs and per section: accuracies as plain means
  over pairs × seeds; the difference over training runs and pairs, :func:`pipeline.compare.paired_bootstrap`:
  95% interval, SE split into seed and pair parts, MDE at 80% power, p-value, ``p_holm`` (Holm across the
  comparison's benchmarks and sections) and ``seeds_for_mde`` (seeds per loss for a 3-point MDE); conditional on
  these trained models: the pair-only bootstrap interval and McNemar's exact test over pairs; seeds missing for
  either setting are left out);
  ``shared_bins.csv`` [shared_bins] with ``shared_bin_edges.json`` [shared_bin_edges] (every pair binned once
  by its distance under ``tune.reference_model``, default the untrained starting model: accuracy per bin for
  each setting on the same pairs, and among cells where the two disagree the share each wins);
  ``length_controls.csv`` [length_controls] (what "the longer/shorter response wins" scores per section on the
  same pairs, beside each setting's accuracy); ``gradient_slopes.png`` [gradient_plot] (each pair's score-head
  gradient norm against its distance, per setting, with the log-log slope).

Metrics: ``tune/best_<metric>``, ``tune/trials``, ``tune/completed``, ``tune/stopped``, ``tune/errors``;
compare mode adds ``compare/<loss>/<metric>_mean`` / ``_ci_low`` / ``_ci_high`` (``loss`` also ``diff``) and
``compare/paired/<benchmark>/<loss>/diff`` / ``ci_low`` / ``ci_high`` / ``mde`` / ``p_value`` / ``p_holm`` /
``seeds_for_mde`` (all pairs, over training runs).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline import tracking
from pipeline.compare import compare_grid, finite, is_compared, plain
from pipeline.compare_analysis import GRAD_SLOPE
from pipeline.raycluster import await_free_cpu, job_placement_groups, remove_placement_groups, tune_verbosity
from pipeline.artifacts import Manifest, write_json
from pipeline.config import PipelineConfig, SearchDomain, flatten, from_flat
from pipeline.stage import STAGES, StageContext, StageResult, stage_hash

TRIAL_CPUS = 0.1  # the trial function only drives its TorchTrainer (0 is rejected by Tune)
GRID_KEY = "grid_index"  # compare mode's only Tune parameter: the index into the losses × seeds grid
CHECKPOINT_KEY = "checkpoint_path"  # added to the Tune result by TuneReportCallback when Train checkpoints
EXPERIMENT = "tune"
TRIALS_FOLDER = "tune_trials"
STRICT_METRIC_ENV = "TUNE_DISABLE_STRICT_METRIC_CHECKING"
# Before Tune reuses an actor it waits this long for the stopped trial's thread to end (Ray's default: 2 s),
# then aborts the *next* trial. A stopped trial's teardown (closing its MLflow run on a remote server, leaving
# DeepSpeed) can take longer; a thread that never ends still errors the next trial, after this bound.
STOPPED_TRIAL_WAIT_ENV, STOPPED_TRIAL_WAIT_S = "TUNE_FUNCTION_THREAD_TIMEOUT_S", 300


# ============================================================================ pure helpers (no Ray)


def search_domain(domain: SearchDomain) -> Any:
    """One ``tune.search_space`` entry (checked when the config loaded) → a ``ray.tune`` domain."""
    from ray import tune

    args = getattr(domain, domain.kind)
    if domain.kind == "choice":
        return tune.choice([plain(a) for a in args])
    if domain.kind == "randint":
        return tune.randint(int(args[0]), int(args[1]))
    return getattr(tune, domain.kind)(float(args[0]), float(args[1]))


def search_space(space: Mapping[str, SearchDomain]) -> dict[str, Any]:
    """``tune.search_space`` → Tune ``param_space`` (flat, dotted keys)."""
    return {key: search_domain(domain) for key, domain in space.items()}


def trial_launcher(cfg: PipelineConfig) -> str:
    """``tune.trial_launcher`` resolved: 'auto' trains each trial in its Tune actor unless the trial would
    train on several GPUs (one process drives one device; a multi-GPU trial needs its Ray Train workers)."""
    if cfg.tune.trial_launcher != "auto":
        return cfg.tune.trial_launcher
    return "ray_train" if cfg.train.use_gpu and cfg.train.num_workers > 1 else "in_process"


def trial_resources(cfg: PipelineConfig, launcher: str) -> dict[str, float]:
    """What Tune reserves for a trial's own actor. In process it does the workers' work, so it holds their
    CPUs (and one GPU); a Ray Train trial only drives its TorchTrainer, whose workers reserve their own."""
    t = cfg.train
    if launcher == "ray_train":
        return {"cpu": TRIAL_CPUS}
    return {"cpu": t.num_workers * t.cpus_per_worker} | ({"gpu": 1} if t.use_gpu else {})


def derive_concurrency(resources: Mapping[str, float], cfg: PipelineConfig, launcher: str = "ray_train") -> int:
    """Trials at once: ``tune.max_concurrent_trials`` if set, else ⌊(CPUs − reserve) / per-trial CPUs⌋ ≥ 1
    (per trial: its Train workers plus the trial function, or the in-process trial's actor), also capped by
    GPUs when training on GPUs."""
    if cfg.tune.max_concurrent_trials > 0:
        return cfg.tune.max_concurrent_trials
    t = cfg.train
    own = trial_resources(cfg, launcher)
    per_trial = own["cpu"] + (t.num_workers * t.cpus_per_worker if launcher == "ray_train" else 0.0)
    n = math.floor((float(resources.get("CPU", 0.0)) - cfg.tune.reserve_cpus) / per_trial + 1e-9)
    if t.use_gpu:
        gpus = t.num_workers if launcher == "ray_train" else 1
        n = min(n, math.floor(float(resources.get("GPU", 0.0)) / gpus + 1e-9))
    return max(1, n)


def eval_cadence(max_steps: int, eval_every: int, reports: int) -> int:
    """``train.eval_every`` for a search trial: as configured, else ``max(1, max_steps // reports)``."""
    if eval_every > 0:
        return eval_every
    return max(1, max_steps // max(1, reports))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool)


# ============================================================================ the trial (runs inside Tune)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrialSetup:
    """Everything a trial needs, shipped with the trainable (no module globals)."""

    cfg: PipelineConfig  # the run's config ← tune.trial_overrides (← derived train.eval_every in search mode)
    data: Manifest  # the data stage's manifest, with absolute paths (Tune runs trials in their own folder)
    storage_path: str  # where each trial's Ray Train run lives
    tracker: tracking.RunLogger  # the stage's MLflow run: each trial nests under it
    mode: str
    digest: str  # the stage hash: tags each trial's MLflow run, so a resumed experiment finds its earlier trials
    grid: tuple = ()  # compare mode: overrides by grid index
    controller_failure_limit: int = 1
    start_timeout_s: float = 120.0  # how long a trial waits for the CPU its dataset setup needs
    concurrency: int = 1  # trials at once (1: leftover Train placement groups can be told apart)
    launcher: str = "ray_train"  # tune.trial_launcher resolved: 'in_process' or 'ray_train'

    def overrides(self, params: Mapping[str, Any]) -> dict[str, Any]:
        if self.mode == "compare":
            return dict(self.grid[int(params[GRID_KEY])])
        return {k: plain(v) for k, v in params.items()}


def trained_config(setup: TrialSetup, params: Mapping[str, Any]) -> PipelineConfig:
    """The config a trial trained with, as its loop saw it: an in-process trial is one rank of the whole global
    batch (the final run's ``train.continue_search`` compares it with its own)."""
    from pipeline.train_loop import one_process_config

    cfg = from_flat(setup.overrides(params), base=setup.cfg)
    return one_process_config(cfg) if setup.launcher == "in_process" else cfg


def checkpoint_uri(path: str, storage: str) -> str:
    """A trial checkpoint's location as another stage can open it: Ray keeps a remote checkpoint's path without
    its scheme (``bucket/x`` for ``s3://bucket/x``), which would read as a local path."""
    scheme, sep, _ = storage.partition("://")
    return f"{scheme}://{path}" if sep and path and "://" not in path else path


def run_trial(params: Mapping[str, Any], setup: TrialSetup) -> None:
    """One Tune trial: nested MLflow run, then the loop in this process or a TorchTrainer, its reports
    forwarded to Tune."""
    import ray.tune

    started = time.time()
    trial_id = ray.tune.get_context().get_trial_id()
    overrides = setup.overrides(params)
    cfg = from_flat(overrides, base=setup.cfg, where=f"tune trial {trial_id}")
    logger = setup.tracker.child(f"trial-{trial_id}", tags={
        "tune.trial_id": trial_id, "tune.mode": setup.mode, "tune.hash": setup.digest,
        "tune.overrides": json.dumps(overrides, default=str), "tune.launcher": setup.launcher,
        "tune.pid": str(os.getpid())})
    logger.log_params(tracking.params_of(cfg))
    if setup.launcher == "in_process":
        try:
            _train_in_this_process(cfg, setup.data, logger, started)
        except SystemExit:  # Tune stopping the trial (ASHA) ends its thread at a report
            logger.finish("KILLED")
            raise
        except BaseException:
            logger.finish("FAILED")
            raise
        logger.finish("FINISHED")
        return
    _fit_trainer(cfg, setup, trial_id, logger)


def _train_in_this_process(cfg: PipelineConfig, data: Manifest, logger: tracking.RunLogger, started: float) -> None:
    """The trial's training as one rank in this Tune actor (``tune.trial_launcher``): no worker group to start,
    and a reused actor has torch, transformers and DeepSpeed imported already. Same loop, same global batch
    (:func:`pipeline.train_loop.one_process_config`); checkpoints and resume go through Tune."""
    import gc
    from contextlib import nullcontext

    import ray.tune
    import torch

    from pipeline.ray_train import reported_metrics
    from pipeline.raycluster import quiet_this_process
    from pipeline.train_loop import SplitRows, one_process_config, one_process_threads, read_rows, train_local

    quiet_this_process(cfg)  # Ray Train's "Checkpoint successfully created" per trial report

    gc.collect()  # an earlier trial's engine in this actor (a stopped one's too) goes before this one builds
    torch.set_num_threads(one_process_threads(cfg))  # the workers' threads, which this process now runs

    def report(metrics: dict, checkpoint_dir: str | None = None, final: bool = False) -> None:
        checkpoint = ray.tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.tune.report(reported_metrics(metrics, final), checkpoint=checkpoint)

    checkpoint = ray.tune.get_checkpoint()  # a resumed experiment's unfinished trial continues from it
    with checkpoint.as_directory() if checkpoint else nullcontext() as folder:
        train_local(one_process_config(cfg), SplitRows(data.output("train")), read_rows(data.output("validation")),
                    report=report, restore_dir=folder, logger=tracking.for_rank(0, logger.uri, logger.run_id, logger.spool),
                    started=started, one_process=True)


def _fit_trainer(cfg: PipelineConfig, setup: TrialSetup, trial_id: str, logger: tracking.RunLogger) -> None:
    """The trial as a Ray Train run: its TorchTrainer's reports reach Tune through ``TuneReportCallback``."""
    import ray.data
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipeline.ray_train import build_trainer

    data_context = ray.data.DataContext.get_current()  # this trial's datasets carry it to the workers
    data_context.enable_progress_bars = False
    data_context.print_on_execution_start = False
    try:
        await_free_cpu(setup.start_timeout_s, sole_trial=setup.concurrency == 1,
                       keep_bundles=[{"CPU": TRIAL_CPUS}])  # Tune's own group for this trial function
    except TimeoutError:
        logger.finish("FAILED")
        raise
    # The splits go to the workers in memory: a 1-CPU Parquet read task started inside them would wait forever
    # on a 2-core node (0.9 CPU left next to this trial and its workers; see the module docstring). A worker
    # group that cannot start (placement group never freed) is a controller failure: bounded.
    trainer = build_trainer(cfg, setup.data, name=f"trial-{trial_id}", storage_path=setup.storage_path,
                            tracking_uri=logger.uri, run_id=logger.run_id, tracking_spool=logger.spool,
                            callbacks=[TuneReportCallback()],
                            in_memory=True, controller_failure_limit=setup.controller_failure_limit)
    try:
        result = trainer.fit()
    except BaseException:
        logger.finish("FAILED")
        raise
    logger.set_tags({"checkpoint": result.checkpoint.path if result.checkpoint else ""})
    logger.finish("FINISHED")


def make_trainable(setup: TrialSetup) -> Callable[[dict], None]:
    def normbt_trial(params: dict) -> None:  # the name Tune registers; the same on restore
        # Read in this actor when Tune reuses it for the next trial; an actor's environment comes from the
        # cluster's start, not from the driver, so it is set here, in the process that reads it.
        os.environ.setdefault(STOPPED_TRIAL_WAIT_ENV, str(STOPPED_TRIAL_WAIT_S))
        run_trial(params, setup)

    return normbt_trial


# ============================================================================ the stage


def tune_reward_model(ctx: StageContext) -> StageResult:
    from pipeline.raycluster import ensure_ray
    from pipeline.ray_train import count_rows, storage_of
    from pipeline.train_loop import last_step, plan_steps

    cfg = ctx.cfg
    if cfg.tune.eval_reports < 1 or cfg.tune.grace_period < 1:
        raise ValueError("tune.eval_reports and tune.grace_period must be >= 1")
    if cfg.tune.mode == "compare" and cfg.tune.bootstrap < 2:
        raise ValueError(f"tune.bootstrap must be >= 2 (pair-bootstrap resamples), got {cfg.tune.bootstrap}")
    ray = ensure_ray(cfg)
    data = _absolute(ctx.upstream["data"])
    base = from_flat(dict(cfg.tune.trial_overrides), base=cfg, where="tune.trial_overrides")
    horizon, _ = plan_steps(base, count_rows(data.output("train")))
    max_steps = last_step(base, horizon)  # a trial's steps (train.stop_after_steps: a prefix of the horizon)
    storage = storage_of(cfg, ctx.run_dir).rstrip("/")
    launcher = trial_launcher(base)
    concurrency = derive_concurrency(ray.cluster_resources(), base, launcher)
    digest = stage_hash(cfg, STAGES["tune"], ctx.upstream)
    if cfg.tune.mode == "compare":
        lrs, lr_files = _search_lrs(ctx, base, data, digest, storage, concurrency, launcher)
        grid = compare_grid(cfg, lrs)
        setup = _compare_setup(ctx, base, data, digest, f"{storage}/{TRIALS_FOLDER}", grid, concurrency, launcher)
        ctx.log(f"  tune: compare {len(grid)} trials ({cfg.tune.seeds} seeds × "
                f"{', '.join(dict.fromkeys(g['loss'] for g in grid))}), {concurrency} at a time, "
                f"{_launcher_words(launcher, base)}")
        results = _fit(ctx, setup, param_space={GRID_KEY: _grid_search(len(grid))}, num_samples=1,
                       scheduler=None, search_alg=None, concurrency=concurrency, storage=storage,
                       expected=len(grid))
        return _compare_outputs(ctx, results, grid, cfg.rewardbench.benchmarks, lr_files, digest)
    eval_every = eval_cadence(max_steps, base.train.eval_every, cfg.tune.eval_reports)
    base = from_flat({"train.eval_every": eval_every}, base=base)
    space = search_space(cfg.tune.search_space)
    setup = TrialSetup(cfg=base, data=data, storage_path=f"{storage}/{TRIALS_FOLDER}", tracker=ctx.tracker,
                       mode="search", digest=digest, controller_failure_limit=cfg.tune.controller_failure_limit,
                       start_timeout_s=_start_timeout(cfg), concurrency=concurrency, launcher=launcher)
    scheduler = _asha(grace=cfg.tune.grace_period * eval_every, max_t=max_steps)
    configured = flatten(base)
    start = [{k: configured[k] for k in space}] if cfg.tune.start_from_config else None
    search_alg, searcher = _searcher(cfg.run.seed, concurrency, start)
    ctx.log(f"  tune: search {cfg.tune.num_samples} trials over {', '.join(space) or '(nothing)'} "
            f"({searcher} seeded by run.seed, ASHA on {cfg.tune.metric} every {eval_every} "
            f"steps of {_steps_words(max_steps, horizon)}), {concurrency} at a time, "
            f"{_launcher_words(launcher, base)}")
    outside = _say_start_outside(ctx, space, start[0] if start else {})
    with _start_warning_dropped(outside if not tune_verbosity(cfg) else []):
        results = _fit(ctx, setup, param_space=space, num_samples=cfg.tune.num_samples, scheduler=scheduler,
                       search_alg=search_alg, concurrency=concurrency, storage=storage,
                       expected=cfg.tune.num_samples)
    return _search_outputs(ctx, results, list(space), start[0] if start else None, setup, horizon)


def _say_start_outside(ctx: StageContext, space: Mapping[str, Any], start: Mapping[str, Any]) -> list[str]:
    """A configured start outside its searched domain is a baseline the search must beat, not a mistake: said
    once, in words. ``space`` holds Tune's domains, whose own check decides (the one behind Tune's warning).
    Returns the keys said (whose Tune warning :func:`_start_warning_dropped` drops)."""
    outside = [k for k in start if not space[k].is_valid(start[k])]
    if outside:
        said = ", ".join(f"{k}={start[k]:g}" if isinstance(start[k], float) else f"{k}={start[k]}" for k in outside)
        ctx.log(f"  tune: the search's first trial is the configured {said}, outside the searched domain (the "
                "start the search has to beat, not a value it draws)")
    return outside


@contextmanager
def _start_warning_dropped(keys: list[str]) -> Iterator[None]:
    """While the search runs, Tune's "Pre-set value `v` is not within valid values of parameter `k`" warning for
    the ``keys`` the stage has said in words is dropped; any other warning passes (``--verbose`` keeps them all)."""
    if not keys:
        yield
        return
    marks = tuple(f"parameter `{k}`" for k in keys)

    def keep(record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not (text.startswith("Pre-set value") and "is not within valid values" in text
                    and any(m in text for m in marks))

    tune_log = logging.getLogger("ray.tune.search.variant_generator")
    tune_log.addFilter(keep)
    try:
        yield
    finally:
        tune_log.removeFilter(keep)


def _steps_words(steps: int, horizon: int) -> str:
    return str(steps) if steps == horizon else f"the first {steps} of a {horizon}-step schedule"


def _compare_setup(ctx: StageContext, base: PipelineConfig, data: Manifest, digest: str, trials_path: str,
                   grid: list[dict[str, Any]], concurrency: int, launcher: str) -> TrialSetup:
    return TrialSetup(cfg=base, data=data, storage_path=trials_path, tracker=ctx.tracker, mode="compare",
                      digest=digest, grid=tuple(g["overrides"] for g in grid),
                      controller_failure_limit=ctx.cfg.tune.controller_failure_limit,
                      start_timeout_s=_start_timeout(ctx.cfg), concurrency=concurrency, launcher=launcher)


def _search_lrs(ctx: StageContext, base: PipelineConfig, data: Manifest, digest: str, storage: str,
                concurrency: int, launcher: str) -> tuple[dict[str, float], dict[str, Path]]:
    """Compare mode's first phase (``tune.compare_lr_grid``): every setting without its own ``train.lr`` trains
    at each grid lr (``tune.compare_lr_seeds`` seeds) and keeps the lr with the best mean validation metric. Only
    validation decides; these trials are never scored on a benchmark. Writes ``lr_search.csv``."""
    from pipeline.compare import choose_lrs, lr_search_grid

    grid = lr_search_grid(ctx.cfg)
    if not grid:
        return {}, {}
    setup = _compare_setup(ctx, base, data, digest, f"{storage}/{TRIALS_FOLDER}_lr", grid, concurrency, launcher)
    ctx.log(f"  tune: lr search on validation, {len(grid)} trials (lr {list(ctx.cfg.tune.compare_lr_grid)} × "
            f"{ctx.cfg.tune.compare_lr_seeds} seed(s) × {len(dict.fromkeys(g['loss'] for g in grid))} settings)")
    records = _fit(ctx, setup, param_space={GRID_KEY: _grid_search(len(grid))}, num_samples=1, scheduler=None,
                   search_alg=None, concurrency=concurrency, storage=storage, expected=len(grid),
                   name=f"{EXPERIMENT}_lr")
    metric = ctx.cfg.tune.metric
    for r in records:
        cell = grid[int(r["config"][GRID_KEY])]
        r.update(loss=cell["loss"], seed=cell["seed"], lr=cell["lr"])
    table, chosen = choose_lrs(records, metric)
    path = ctx.out_dir / "lr_search.csv"
    table.to_csv(path, index=False)
    ctx.tracker.log_artifact(path)
    for label, lr in chosen.items():
        ctx.log(f"  tune: {label} trains at lr {lr:g} (best mean {metric} of the lr search)")
    return chosen, {"lr_search": path}


def _launcher_words(launcher: str, cfg: PipelineConfig) -> str:
    t = cfg.train
    if launcher == "ray_train":
        return f"each a Ray Train run of {t.num_workers} workers"
    return (f"each in its reused Tune actor as one rank of {t.micro_batch_size * t.num_workers} pairs "
            f"(= {t.num_workers} workers × {t.micro_batch_size}; tune.trial_launcher)")


def _start_timeout(cfg: PipelineConfig) -> float:
    """The patience of the Train controller: its worker-group start timeout × (1 + tolerated failures)."""
    per_try = float(os.environ.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "60"))
    return per_try * (1 + max(0, cfg.tune.controller_failure_limit))


def _absolute(manifest: Manifest) -> Manifest:
    """Local output paths made absolute: Tune runs each trial with its own working directory."""
    outputs = {k: v if "://" in v else str(Path(v).resolve()) for k, v in manifest.outputs.items()}
    return dataclasses.replace(manifest, outputs=outputs)


def _grid_search(n: int) -> Any:
    from ray import tune

    return tune.grid_search(list(range(n)))


def _asha(*, grace: int, max_t: int) -> Any:
    from ray.tune.schedulers import ASHAScheduler

    # metric/mode come from TuneConfig; the final report (step == max_t) must not be cut by the scheduler.
    return ASHAScheduler(time_attr="step", grace_period=grace, max_t=max(max_t, grace), stop_last_trials=False)


def _searcher(seed: int, concurrency: int, start: list[dict] | None) -> tuple[Any, str]:
    """Optuna's TPE when optuna is importable, else Tune's random search; both seeded, so a rerun of the same
    config draws the same trials, and both try the ``start`` points first."""
    try:
        import optuna  # noqa: F401
    except ImportError:
        from ray.tune.search.basic_variant import BasicVariantGenerator

        return (BasicVariantGenerator(points_to_evaluate=start, max_concurrent=concurrency, random_state=seed),
                "random search")
    from ray.tune.search.optuna import OptunaSearch

    class SparseMetricOptunaSearch(OptunaSearch):
        """Intermediate reports without the metric (non-evaluation steps) are not Optuna's business."""

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            if self.metric in result:
                super().on_trial_result(trial_id, result)

    return SparseMetricOptunaSearch(points_to_evaluate=start, seed=seed), "Optuna TPE"


def _bounded_by_tune(search_alg: Any) -> bool:
    from ray.tune.search import Searcher

    return search_alg is None or isinstance(search_alg, Searcher)


@contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


@contextmanager
def _sigterm_stops_tune_first() -> Iterator[None]:
    """SIGTERM while Tune's loop runs stops it as Ctrl-C does (Tune's own SIGINT handler): Tune ends its trials
    and saves the experiment state, with each trial's latest checkpoint, before ``fit`` returns; only then does
    the caller's SIGTERM handler run (``run_pipeline.py``: raises ``Terminated``). Raised inside Tune's loop,
    that exception skipped the save: the state on disk was up to 10 s old and the rerun restarted the
    interrupted trial from step 0. Outside Tune's loop (its SIGINT handler not installed) the caller's handler
    runs at once, as before. Tune leaves its SIGINT handler installed after ``fit``: the one before is put back,
    so Ctrl-C in a later stage is not swallowed."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():  # signal handlers are the main thread's
        yield
        return
    previous, before_int = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    pending: list[Any] = []

    def stop_tune_first(signum: int, frame: Any) -> None:
        tune_stop = signal.getsignal(signal.SIGINT)
        if callable(tune_stop) and tune_stop is not before_int:  # Tune's loop runs (its handler is in)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the save short
            pending.append(frame)
            tune_stop(signal.SIGINT, frame)
        else:
            signal.signal(signal.SIGTERM, previous)
            previous(signum, frame)

    if callable(previous):  # the caller's own handler (not the default or ignored one) is deferred
        signal.signal(signal.SIGTERM, stop_tune_first)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before_int)
        if pending or signal.getsignal(signal.SIGTERM) is stop_tune_first:
            signal.signal(signal.SIGTERM, previous)
        if pending:
            previous(signal.SIGTERM, pending[0])


def _fit(ctx: StageContext, setup: TrialSetup, *, param_space: dict, num_samples: int, scheduler: Any,
         search_alg: Any, concurrency: int, storage: str, expected: int, name: str = EXPERIMENT
         ) -> list[dict[str, Any]]:
    """Run (or resume) the experiment ``name``; one dict per trial (see :func:`_trial_record`)."""
    from ray import tune

    trainable = tune.with_resources(make_trainable(setup), trial_resources(setup.cfg, setup.launcher))
    experiment = f"{storage}/{name}"
    marker = ctx.out_dir / ("experiment.json" if name == EXPERIMENT else f"experiment-{name}.json")
    digest = setup.digest
    previous = json.loads(marker.read_text()) if marker.is_file() else {}
    if previous.get("hash") == digest and tune.Tuner.can_restore(experiment):
        ctx.log(f"  tune: resuming the interrupted experiment at {experiment}")
        tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_errored=True, param_space=param_space)
    else:
        for stale in (experiment, setup.storage_path):
            if "://" not in stale:
                shutil.rmtree(stale, ignore_errors=True)
        write_json(marker, {"hash": digest, "experiment": experiment})
        tuner = tune.Tuner(
            trainable, param_space=param_space,
            tune_config=tune.TuneConfig(metric=ctx.cfg.tune.metric, mode="max", num_samples=num_samples,
                                        scheduler=scheduler, search_alg=search_alg,
                                        # random search's generator bounds itself (max_concurrent), and Tune
                                        # warns when it is given both
                                        max_concurrent_trials=concurrency if _bounded_by_tune(search_alg) else None,
                                        reuse_actors=setup.launcher == "in_process"),
            run_config=tune.RunConfig(name=name, storage_path=storage,
                                      # the stage prints the trials' outcome and the best one itself
                                      verbose=tune_verbosity(ctx.cfg),
                                      failure_config=tune.FailureConfig(max_failures=0)))
    before = job_placement_groups()
    try:
        # reports between evaluations carry no val_accuracy (module docstring)
        with _env(STRICT_METRIC_ENV, "1"), _sigterm_stops_tune_first():
            grid = tuner.fit()
    finally:  # whatever stopped trials left behind goes, so later stages in this job get their CPUs back
        after = job_placement_groups() if before is not None else None
        removed = remove_placement_groups(sorted(set(after) - set(before))) if after is not None else []
        if removed:
            ctx.log(f"  tune: removed {len(removed)} placement group(s) left behind by stopped trials")
    records = sorted((_trial_record(r, ctx.cfg.tune.metric) for r in grid), key=lambda r: r["trial_id"])
    # Tune turns Ctrl-C into an early return (interrupted trials look TERMINATED, later ones do not exist yet):
    # pass it on, so the stage is not marked done and a rerun resumes.
    unfinished = max(0, expected - len(records)) + sum(r["status"] == "UNFINISHED" for r in records)
    if unfinished:
        raise KeyboardInterrupt(f"tune: {unfinished} of {expected} trials unfinished; rerun to resume {experiment}")
    _close_trial_runs(ctx.tracker, digest, records)
    if not any(r["status"] != "ERROR" for r in records):
        first = next((r["error"] for r in records if r["error"]), "no trial ran")
        raise RuntimeError(f"every tune trial failed; first error: {first}")
    return records


def _trial_record(result: Any, metric: str) -> dict[str, Any]:
    m = dict(result.metrics or {})
    final = int(m.get("final", 0) or 0) == 1
    trial_id = str(m.get("trial_id") or _trial_id_from_path(result.path))
    # A trial that ended (ran out, or stopped by ASHA) has done=True in its last result; one cut by Ctrl-C not.
    status = "ERROR" if result.error else "UNFINISHED" if not m.get("done") else "COMPLETED" if final else "STOPPED"
    return {"trial_id": trial_id, "config": dict(result.config or {}), metric: _last_value(result, metric),
            "step": m.get("step"), "status": status,
            "checkpoint": _checkpoint_path(result, m) if final else "",
            GRAD_SLOPE: m.get(GRAD_SLOPE, math.nan) if final else math.nan,
            "error": _first_line(result.error) if result.error else ""}


def _checkpoint_path(result: Any, metrics: dict) -> str:
    """A Ray Train trial's checkpoint (``TuneReportCallback`` names it), else the one the trial reported to Tune."""
    if metrics.get(CHECKPOINT_KEY):
        return str(metrics[CHECKPOINT_KEY])
    return str(result.checkpoint.path) if result.checkpoint else ""


def _trial_id_from_path(path: Any) -> str:
    found = re.search(r"_([0-9a-f]{5,}_\d{5})", Path(str(path or "")).name)
    return found.group(1) if found else Path(str(path or "unknown")).name


def _last_value(result: Any, metric: str) -> float:
    value = (result.metrics or {}).get(metric)
    if finite(value):
        return float(value)
    frame = result.metrics_dataframe
    if frame is not None and metric in frame:
        values = frame[metric].dropna()
        if len(values):
            return float(values.iloc[-1])
    return math.nan


def _first_line(err: Any) -> str:
    text = str(err).strip()
    return (text.splitlines() or [type(err).__name__])[-1][:500]


def _close_trial_runs(tracker: tracking.RunLogger, digest: str, records: list[dict[str, Any]]) -> None:
    """Attach each trial's MLflow run id (also of trials finished before a resume, nested under the earlier
    attempt's stage run); mark runs of stopped or crashed trials (killed mid-fit)."""
    for r in records:
        r["mlflow_run_id"] = ""
    if not tracker.active:
        return
    client = tracker.client
    experiment_id = client.get_run(tracker.run_id).info.experiment_id
    runs = client.search_runs([experiment_id], filter_string=f"tags.`tune.hash` = '{digest}'", max_results=10_000)
    by_trial: dict[str, Any] = {}
    for run in sorted(runs, key=lambda run: run.info.start_time or 0):  # the latest attempt wins
        trial_id = run.data.tags.get("tune.trial_id")
        if trial_id:
            by_trial[trial_id] = run
    for r in records:
        run = by_trial.get(r["trial_id"])
        if run is None:
            continue
        r["mlflow_run_id"] = run.info.run_id
        client.set_tag(run.info.run_id, "tune.status", r["status"])
        if run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, status="FAILED" if r["status"] == "ERROR" else "KILLED")


def _best(records: list[dict[str, Any]], metric: str) -> dict[str, Any] | None:
    """The completed trial with the highest metric (first trial id on ties); early-stopped ones as fallback."""
    for allowed in (("COMPLETED",), ("COMPLETED", "STOPPED")):
        pool = [r for r in records if r["status"] in allowed and finite(r[metric])]
        if pool:
            return max(pool, key=lambda r: (r[metric], -records.index(r)))
    return None


def _trials_frame(records: list[dict[str, Any]], metric: str, value_columns: dict[str, list]) -> pd.DataFrame:
    frame = pd.DataFrame({"trial_id": [r["trial_id"] for r in records], **value_columns})
    for column in (metric, "step", "status", "best", "checkpoint", "mlflow_run_id", "error"):
        frame[column] = [r.get(column, "") for r in records]
    return frame


def _search_outputs(ctx: StageContext, records: list[dict[str, Any]], keys: list[str],
                    start: dict[str, Any] | None, setup: TrialSetup, horizon: int) -> StageResult:
    metric = ctx.cfg.tune.metric
    best = _best(records, metric)
    if best is None:
        raise RuntimeError(f"no tune trial reported {metric!r}; see the trial errors in {ctx.out_dir}")
    # The configured values' own trial (tune.start_from_config): the baseline the search has to beat.
    baseline = next((r for r in records if start is not None and finite(r.get(metric, float("nan")))
                     and all(plain(r["config"].get(k)) == plain(v) for k, v in start.items())), None)
    extra = {f"tune/start_{metric}": baseline[metric]} if baseline is not None else {}
    for r in records:
        r["best"] = r is best
    columns = {k: [plain(r["config"].get(k)) for r in records] for k in keys}
    trials = _trials_frame(records, metric, columns)
    trials_path = ctx.out_dir / "trials.csv"
    trials.to_csv(trials_path, index=False)
    best_config = {k: plain(best["config"][k]) for k in keys}
    best_path = write_json(ctx.out_dir / "best_config.json", best_config)
    for path in (trials_path, best_path):
        ctx.tracker.log_artifact(path)
    ctx.tracker.set_tags({"tune.best_trial": best["trial_id"], "tune.best_checkpoint": best["checkpoint"]})
    ctx.log(f"  tune: best trial {best['trial_id']} ({best['status']}) {metric} {best[metric]:.4f}: {best_config}")
    outputs = {"best_config": str(best_path), "trials": str(trials_path)}
    if best["checkpoint"]:
        outputs["best_checkpoint"] = best["checkpoint"]
        outputs["best_trial"] = str(write_json(ctx.out_dir / "best_trial.json", {
            "trial_id": best["trial_id"], "checkpoint": checkpoint_uri(best["checkpoint"], setup.storage_path),
            "mlflow_run_id": best["mlflow_run_id"], "data_hash": ctx.upstream["data"].hash, "horizon": horizon,
            "config": plain(flatten(trained_config(setup, best["config"])))}))
    return StageResult(outputs=outputs, metrics={f"tune/best_{metric}": best[metric], **extra, **_counts(records)})


def _counts(records: list[dict[str, Any]]) -> dict[str, int]:
    status = [r["status"] for r in records]
    return {"tune/trials": len(records), "tune/completed": status.count("COMPLETED"),
            "tune/stopped": status.count("STOPPED"), "tune/errors": status.count("ERROR")}


def _compare_outputs(ctx: StageContext, records: list[dict[str, Any]], grid: list[dict[str, Any]],
                     benches: list[Any], lr_files: Mapping[str, Path], digest: str) -> StageResult:
    """Score every completed trial on the benchmarks, then hand the analysis to :mod:`pipeline.compare_analysis`
    and write, log and return what it found."""
    from pipeline.compare_analysis import pair_evidence, paired_summary, seed_summary, write_pair_evidence, \
        write_seed_outputs
    from pipeline.train_loop import GRADIENT_PAIRS

    metric = ctx.cfg.tune.metric
    bench_names: list[str] = []
    score_files: dict[str, dict[tuple[str, int], pd.DataFrame]] = {b.name: {} for b in benches}
    gradient_points: dict[str, list[np.ndarray]] = {}
    for r in records:
        cell = grid[int(r["config"][GRID_KEY])]
        r.update(loss=cell["loss"], seed=cell["seed"], setting=cell["setting"])
        if r["status"] != "COMPLETED" or not r["checkpoint"]:
            ctx.log(f"  tune: trial {r['trial_id']} ({r['loss']}, seed {r['seed']}) {r['status']}: not scored")
            continue
        scored, points = _score_trial(ctx, r, benches, GRADIENT_PAIRS, digest)
        gradient_points.setdefault(r["loss"], []).append(points)
        for name, (flat, frame) in scored.items():
            score_files[name][(r["loss"], r["seed"])] = frame
            for key, value in flat.items():
                if is_compared(key):
                    r[key] = value
                    bench_names.append(key)
    labels = list(dict.fromkeys(g["loss"] for g in grid))
    lrs = {g["loss"]: g["lr"] for g in grid}
    summary = seed_summary(records, labels, metric, bench_names, lrs)
    winner_cell = next(g for g in grid if g["loss"] == summary.winner)
    setting = {k: v for k, v in winner_cell["overrides"].items() if k not in ("train.seed", "model.seed")}
    best_path = write_json(ctx.out_dir / "best_config.json", {k: plain(v) for k, v in setting.items()})
    keys = list(dict.fromkeys(k for g in grid for k in g["setting"]))
    columns = {"loss": [r["loss"] for r in records], "seed": [r["seed"] for r in records],
               "lr": [lrs[r["loss"]] for r in records],
               **{k: [plain(r["setting"].get(k)) for r in records] for k in keys if k != "train.lr"}}
    for r in records:
        r["best"] = r["loss"] == summary.winner
    trials = _trials_frame(records, metric, columns)
    for name in summary.metric_names[1:]:
        trials[name] = [r.get(name, math.nan) for r in records]
    trials_path = ctx.out_dir / "trials.csv"
    trials.to_csv(trials_path, index=False)
    seeds = sorted({g["seed"] for g in grid})
    scored_benches = [b for b in benches if score_files[b.name]]
    references, reference_model = _reference_scores(ctx, scored_benches, digest) if scored_benches else ({}, "")
    evidence = pair_evidence(score_files, references, labels, seeds, n_boot=ctx.cfg.tune.bootstrap,
                             seed=ctx.cfg.train.seed, distance_bins=ctx.cfg.rewardbench.distance_bins)
    files = {**write_seed_outputs(summary, gradient_points, ctx.out_dir), "best_config": best_path,
             "trials": trials_path, **write_pair_evidence(evidence, ctx.out_dir, reference_model), **lr_files}
    for path in files.values():
        ctx.tracker.log_artifact(path)
    paired_metrics, paired_lines = paired_summary(evidence["paired_stats"])
    for line in summary.lines + paired_lines:
        ctx.log(line)
    ctx.log(f"  tune: {summary.winner} has the higher mean {metric} ({summary.means[summary.winner]:.4f}); "
            f"best_config {setting}")
    stage_metrics = {f"tune/best_{metric}": summary.means[summary.winner], **_counts(records), **summary.metrics,
                     **paired_metrics}
    return StageResult(outputs={k: str(v) for k, v in files.items()}, metrics=stage_metrics)


def _score_trial(ctx: StageContext, r: dict[str, Any], benches: list[Any], gradient_file: str, digest: str
                 ) -> tuple[dict[str, tuple[dict[str, float], pd.DataFrame]], np.ndarray]:
    """Score one completed trial's exported model on every benchmark; its per-pair table per benchmark and the
    gradient diagnostics its training recorded. A benchmark this trial's checkpoint already scored under this
    stage hash (a rerun after an interruption) is read back, not scored again."""
    from ray.train import Checkpoint

    label = f"{r['loss']}-seed{r['seed']}"
    scorer_ctx = dataclasses.replace(ctx, out_dir=ctx.out_dir / "scores" / _safe(label),
                                     tracker=tracking.RunLogger(ctx.tracker.uri, r["mlflow_run_id"] or None,
                                                                ctx.tracker.spool))
    key = {"hash": digest, "model": r["checkpoint"]}
    scored = _already_scored(scorer_ctx, benches, key, label)
    with Checkpoint(path=r["checkpoint"]).as_directory() as folder:
        for bench in benches:
            if bench.name not in scored:
                scored[bench.name] = _score_and_mark(bench, str(Path(folder) / "model"), scorer_ctx, key)
        gradient_path = Path(folder) / gradient_file
        points = np.loadtxt(gradient_path, delimiter=",", skiprows=1, ndmin=2) if gradient_path.is_file() \
            else np.zeros((0, 2))
    return {b.name: scored[b.name] for b in benches}, points.reshape(-1, 2)


SCORED_MARKER = "scored.json"  # written last into a benchmark's score folder: which model, under which stage hash


def _score_and_mark(bench: Any, model_path: str, ctx: StageContext, key: Mapping[str, str]
                    ) -> tuple[dict[str, float], pd.DataFrame]:
    from pipeline.benchmarks import score_benchmark

    marker = ctx.out_dir / bench.name / SCORED_MARKER
    marker.unlink(missing_ok=True)  # the files are about to change: a scoring stopped midway must not pass as done
    outputs, flat = score_benchmark(bench, model_path, ctx)
    ctx.tracker.log_metrics(flat)
    write_json(marker, {**key, "metrics": flat})
    return flat, pd.read_parquet(outputs[f"{bench.name}/scores"])


def _already_scored(ctx: StageContext, benches: list[Any], key: Mapping[str, str], label: str
                    ) -> dict[str, tuple[dict[str, float], pd.DataFrame]]:
    """The benchmarks whose marker names this model and stage hash, read back from their files (the marker is
    written after them, so an interrupted scoring is never reused)."""
    found = {}
    for bench in benches:
        folder = ctx.out_dir / bench.name
        marker = folder / SCORED_MARKER
        if not (marker.is_file() and (folder / "scores.parquet").is_file()):
            continue
        saved = json.loads(marker.read_text())
        if all(saved.get(k) == v for k, v in key.items()):
            found[bench.name] = (saved["metrics"], pd.read_parquet(folder / "scores.parquet"))
            ctx.log(f"  tune: {bench.name} for {label} already scored by this run (read back from {folder})")
    return found


def _reference_scores(ctx: StageContext, benches: list[Any], digest: str) -> tuple[dict[str, Any], str]:
    """Every benchmark scored once by the reference model (``tune.reference_model``, default the untrained
    starting model): its per-pair distances bin the pairs for every loss; its run also yields the length
    controls (they depend on the texts only). The untrained model is built on the driver and saved once into
    the stage folder (a 3B backbone needs its fp32 size in driver memory for a moment; give
    ``tune.reference_model`` a saved folder to avoid that). Benchmarks it already scored under this stage hash
    are read back (the hash covers ``tune.reference_model``'s path, not its files: save another model under a
    new path)."""
    from pipeline.compare_analysis import Reference

    name = ctx.cfg.tune.reference_model or "untrained starting model"
    ref_ctx = dataclasses.replace(ctx, out_dir=ctx.out_dir / "scores" / "reference",
                                  tracker=tracking.RunLogger(None, None))
    key = {"hash": digest, "model": name}
    scored = _already_scored(ref_ctx, benches, key, "the reference model")
    missing = [b for b in benches if b.name not in scored]
    model_path = (ctx.cfg.tune.reference_model or _untrained_model(ctx)) if missing else ""
    for bench in missing:
        scored[bench.name] = _score_and_mark(bench, model_path, ref_ctx, key)
    out = {}
    for bench in benches:
        summary = json.loads((ref_ctx.out_dir / bench.name / "metrics.json").read_text())
        out[bench.name] = Reference(scored[bench.name][1], summary["length_controls"])
    return out, name


def _untrained_model(ctx: StageContext) -> str:
    import torch

    from pipeline import modeling

    cfg = ctx.cfg
    model_path = str(ctx.out_dir / "reference_model")
    tok = modeling.load_tokenizer(cfg.model.name_or_path, revision=cfg.model.revision,
                                  trust_remote_code=cfg.model.trust_remote_code, template_date=cfg.data.template_date)
    with torch.random.fork_rng():  # building seeds torch's RNG; the driver's own stream stays as it was
        model = modeling.build_reward_model(cfg.model.name_or_path, tok, revision=cfg.model.revision,
                                            trust_remote_code=cfg.model.trust_remote_code, seed=cfg.model.seed)
        modeling.save_reward_model(model, tok, model_path)
    return model_path


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=,-]+", "_", text)
