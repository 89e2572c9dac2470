"""Ray Train (V2) around the loop: the driver builds a ``TorchTrainer`` (:func:`build_trainer`, used by the train
stage and by every Tune trial); the worker function :func:`train_loop_per_worker` gets everything from its
argument and hands the work to :func:`pipeline.train_loop.run_loop`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterator


from pipeline import tracking
from pipeline.config import PipelineConfig
from pipeline.raycluster import quiet_this_process
from pipeline.train_loop import TRAIN_COLUMNS, LoopPlan, checkpoint_problem, plan_steps, rows_from_columns, run_loop

_TEST_HOOKS = ("NORMBT_FAIL_AT_STEP", "NORMBT_NAN_AT_STEP")  # fault injection, read by the worker
SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's list of the checkpoints it registered, in a run folder
# Ray Train's controller takes each worker's report from a one-slot queue when it polls the workers, every 2 s by
# default: a worker reporting more often waits for the poll (train.log_every 1 on the smoke config: 13.8 of the
# train stage's 35 s; a GPU step shorter than 2 s would be held to 2 s). A poll is one small call per worker, and
# an answer that is late is awaited at the next poll (a worker counts as lost only after 10 minutes of them), so
# the controller polls every 0.1 s. Ray carries this variable from the driver to the controller.
POLL_INTERVAL = ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")


def _worker_env() -> dict[str, str]:
    """Environment of the train workers: the fault-injection hooks when set, and Ray Train's print patch off.
    The patch sends each ``print`` of a worker to the root logger too, and a Ray worker's stdout is a wrapped
    stream, so the patch also prints it: every progress line reached the terminal twice (measured on the smoke
    config). Without it a print goes once, through Ray's worker log to the driver. A value set by the user wins."""
    env = {k: os.environ[k] for k in _TEST_HOOKS if k in os.environ}
    env["RAY_TRAIN_ENABLE_PRINT_PATCH"] = os.environ.get("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    return env


def _train_log_level(level: str) -> None:
    """Ray Train's worker logs each report with its metrics at INFO ("Reporting training result 8:
    TrainingReport(...)") through a logger named by its module's file path, outside the ``ray.train`` loggers its
    LoggingConfig filters: set that logger's level (``run.log_level``; INFO with ``--verbose``)."""
    import logging

    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(level)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker: everything comes from ``config`` (no module globals)."""
    import ray.train

    cfg: PipelineConfig = config["cfg"]
    _train_log_level(cfg.run.log_level)
    quiet_this_process(cfg)
    ctx = ray.train.get_context()
    plan = LoopPlan(max_steps=config["max_steps"], steps_per_epoch=config["steps_per_epoch"],
                    world_size=ctx.get_world_size(), rank=ctx.get_world_rank())
    window_rows = cfg.train.micro_batch_size * cfg.train.grad_accum * plan.world_size * cfg.train.length_group_window

    def train_windows(epoch: int) -> Iterator[list[dict]]:
        shard = ray.train.get_dataset_shard("train")
        for batch in shard.iter_batches(batch_size=window_rows, batch_format="numpy", prefetch_batches=1):
            yield rows_from_columns(batch)

    cached: list[list[dict]] = []

    def validation_rows() -> list[dict]:  # read once: every evaluation uses the same rows
        if not cached:
            shard = ray.train.get_dataset_shard("validation")
            cached.append([r for b in shard.iter_batches(batch_size=1024, batch_format="numpy") for r in rows_from_columns(b)])
        return cached[0]

    def report(metrics: dict, checkpoint_dir: str | None = None, final: bool = False) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(reported_metrics(metrics, final), checkpoint=checkpoint)

    say = print if plan.rank == 0 else lambda _: None
    checkpoint = resume_checkpoint(ray.train.get_checkpoint(), say=say)
    if checkpoint is None and config.get("initial_checkpoint"):  # nothing of this run's own yet: the start it was given
        say(f"starting from the checkpoint {config['initial_checkpoint']}")
        checkpoint = ray.train.Checkpoint(config["initial_checkpoint"])
    logger = tracking.for_rank(plan.rank, config.get("tracking_uri"), config.get("run_id"), config.get("tracking_spool"))
    if checkpoint is None:
        run_loop(cfg, plan, train_windows=train_windows, validation_rows=validation_rows, report=report,
                 restore_dir=None, use_gpu=cfg.train.use_gpu, logger=logger)
        return
    with checkpoint.as_directory() as folder:
        run_loop(cfg, plan, train_windows=train_windows, validation_rows=validation_rows, report=report,
                 restore_dir=folder, use_gpu=cfg.train.use_gpu, logger=logger)


def registered_checkpoints(run_folder: str, filesystem: Any) -> list[str]:
    """Folder names of the checkpoints Ray Train registered in ``run_folder``, newest report first (none
    without a snapshot). Only a registered checkpoint is complete: Ray registers it after every rank's
    ``report`` returned."""
    import json

    path = f"{run_folder}/{SNAPSHOT}"
    if filesystem.get_file_info(path).type.name == "NotFound":
        return []
    with filesystem.open_input_stream(path) as f:
        state = json.loads(f.read().decode("utf-8"))
    ranked = sorted(zip(state["checkpoint_report_indices"], state["checkpoint_results"]), key=lambda p: -p[0])
    return [result["checkpoint_dir_name"] for _, result in ranked]


def resume_checkpoint(latest: Any, say: Any = print) -> Any:
    """The checkpoint to resume from: Ray's latest when it reads back, else the newest earlier registered one
    that does, else None (the run starts afresh); each one passed over is named with the reason. Every rank
    decides alike (same files, same order), so all load the same one."""
    import ray.train

    if latest is None:
        return None
    run_folder, _, latest_name = latest.path.rstrip("/").rpartition("/")
    names = registered_checkpoints(run_folder, latest.filesystem)
    names = [latest_name] + [n for n in names if n != latest_name]
    for name in names:
        candidate = latest if name == latest_name else ray.train.Checkpoint(f"{run_folder}/{name}", latest.filesystem)
        with candidate.as_directory() as folder:
            problem = checkpoint_problem(folder)
        if problem is None:
            if candidate is not latest:
                say(f"resuming from the earlier checkpoint {candidate.path}")
            return candidate
        say(f"checkpoint {candidate.path} cannot be resumed from: {problem}")
    say("no readable checkpoint: training starts afresh")
    return None


def remove_unregistered_checkpoints(run_folder: Path) -> list[Path]:
    """Delete the ``checkpoint_*`` folders of a local run folder that Ray Train never registered (written when
    a signal or failure came before the report returned): never resumed from, and never deleted by Ray."""
    import shutil

    run_folder = Path(run_folder)
    if not (run_folder / SNAPSHOT).is_file():
        return []
    registered = set(registered_checkpoints(str(run_folder), _local_filesystem()))
    stale = [p for p in sorted(run_folder.glob("checkpoint_*")) if p.is_dir() and p.name not in registered]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def _local_filesystem() -> Any:
    import pyarrow.fs

    return pyarrow.fs.LocalFileSystem()


def reported_metrics(metrics: dict, final: bool) -> dict:
    """What a report hands to Ray: the finite numbers, and ``final`` (1 on the run's last report)."""
    clean = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
    clean["final"] = int(final)
    return clean


def build_trainer(cfg: PipelineConfig, data: Any, *, name: str, storage_path: str,
                  tracking_uri: str | None, run_id: str | None, tracking_spool: str | None = None,
                  callbacks: list | None = None, in_memory: bool = False, controller_failure_limit: int = -1,
                  initial_checkpoint: str | None = None) -> Any:
    """The ``TorchTrainer`` for one training run (the train stage, and each Tune trial).

    ``initial_checkpoint``: a checkpoint (path or URI) of another run to start from, written at this run's world
    size (``train.continue_search``); once this run has registered a checkpoint of its own, a restart resumes
    from that instead.

    ``in_memory`` sends the splits from the driver's memory whatever their size (Tune trials: a Parquet read task
    started next to a trial would want a CPU the trial's workers hold); ``controller_failure_limit`` bounds how
    often a worker group that cannot start is retried (-1: Ray's default, forever)."""
    import ray
    import ray.train
    from ray.data import ExecutionOptions
    from ray.train.torch import TorchConfig, TorchTrainer

    n_train = count_rows(data.output("train"))
    max_steps, steps_per_epoch = plan_steps(cfg, n_train)
    in_memory = in_memory or n_train <= cfg.train.in_memory_rows
    # Every rank reads the whole stream in file order (see the module docstring), so nothing is split.
    datasets = {split: split_dataset(data.output(split), in_memory=in_memory) for split in ("train", "validation")}
    resources = {"CPU": cfg.train.cpus_per_worker} | ({"GPU": 1} if cfg.train.use_gpu else {})
    os.environ.setdefault(*POLL_INTERVAL)  # read by fit(), in this process; a value the user set wins
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg, "max_steps": max_steps, "steps_per_epoch": steps_per_epoch,
                           "tracking_uri": tracking_uri, "run_id": run_id, "tracking_spool": tracking_spool,
                           "initial_checkpoint": initial_checkpoint},
        torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                                               resources_per_worker=resources,
                                               placement_strategy=cfg.train.placement_strategy),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage_path, callbacks=callbacks,
            worker_runtime_env={"env_vars": _worker_env()},
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures,
                                                   controller_failure_limit=controller_failure_limit),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=max(1, cfg.train.keep_checkpoints)),
            # Ray Train's INFO lines ("Reporting training result ...: TrainingReport(...)") only with run.log_level
            logging_config=ray.train.LoggingConfig(log_level=cfg.run.log_level)),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=[],
                                            execution_options=ExecutionOptions(preserve_order=True)),
    )


def split_dataset(path: str, *, in_memory: bool) -> Any:
    """A data-stage split as a Ray Dataset of the training columns, rows in file order. In memory: one Arrow block
    read here (no Ray task; small splits start streaming at once). Otherwise ``read_parquet`` streams it."""
    import pyarrow.dataset as pads
    import ray.data

    if in_memory:
        return ray.data.from_arrow(pads.dataset(path, format="parquet").to_table(columns=TRAIN_COLUMNS))
    return ray.data.read_parquet(path, columns=TRAIN_COLUMNS)


def count_rows(path: str) -> int:
    """Rows of a data-stage split (Parquet metadata; nothing is read)."""
    import pyarrow.dataset as pads

    return pads.dataset(path, format="parquet").count_rows()


def storage_of(cfg: PipelineConfig, run_dir: Path) -> str:
    """Ray Train/Tune storage: ``ray.storage_path`` or the run dir. A multi-node cluster needs shared storage
    (``s3://``, ``gs://``, an NFS mount given as a URI): a node-local path would scatter the checkpoints."""
    from pipeline.raycluster import cluster_nodes

    path = cfg.ray.storage_path or str((Path(run_dir) / "ray_storage").resolve())
    if "://" not in path and cluster_nodes() > 1:
        raise ValueError(f"the Ray cluster has {cluster_nodes()} nodes but the storage path {path} is local to this "
                         f"machine; set ray.storage_path to shared storage (e.g. s3://bucket/normbt)")
    return path


