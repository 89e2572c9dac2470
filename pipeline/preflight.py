"""Checks before any compute: each failure is one clear message, all reported together."""

from __future__ import annotations

import glob
import os
import urllib.request
from pathlib import Path

from pipeline.config import PipelineConfig


def _local_path_missing(value: str) -> bool:
    """A path-like value (not a hub id, not a URI) that names nothing on this machine."""
    from pipeline.modeling import is_builtin

    if "://" in value or is_builtin(value):
        return False
    looks_local = value.startswith(("/", ".", "~")) or Path(value).suffix in {".jsonl", ".json", ".parquet", ".gz"}
    return looks_local and not glob.glob(os.path.expanduser(value), recursive=True)


def _local_model_problems(cfg: PipelineConfig) -> list[str]:
    """A local model folder is read now (seconds), so a wrong folder fails before any worker starts."""
    from pipeline import modeling

    folder = os.path.expanduser(cfg.model.name_or_path)
    if not (Path(folder) / "config.json").is_file():
        return [f"model.name_or_path: {folder} has no config.json (not a save_pretrained folder)"]
    try:
        tok = modeling.load_tokenizer(folder, trust_remote_code=cfg.model.trust_remote_code)
    except Exception as err:  # noqa: BLE001 - any failure to load is reported as such
        return [f"model.name_or_path: {folder}: the tokenizer does not load ({type(err).__name__}: {err})"]
    if tok.pad_token_id is None:
        return [f"model.name_or_path: {folder}: the tokenizer has no pad, EOS or UNK token to pad with"]
    return []


def problems(cfg: PipelineConfig, stages: tuple[str, ...]) -> list[str]:
    found = []
    if "data" in stages:
        for i, src in enumerate(cfg.data.sources):
            if src.path and _local_path_missing(src.path):
                found.append(f"data.sources[{i}].path: {src.path} does not exist")
    if _local_path_missing(cfg.model.name_or_path):
        found.append(f"model.name_or_path: {cfg.model.name_or_path} does not exist")
    elif Path(os.path.expanduser(cfg.model.name_or_path)).is_dir():
        found.extend(_local_model_problems(cfg))
    for key, value in (("rewardbench.model", cfg.rewardbench.model), ("best_of_n.reward_model", cfg.best_of_n.reward_model)):
        if value and _local_path_missing(value):
            found.append(f"{key}: {value} does not exist")
    for i, bench in enumerate(cfg.rewardbench.benchmarks):
        if {"data", "rewardbench"} & set(stages) and bench.path and _local_path_missing(bench.path):
            found.append(f"rewardbench.benchmarks[{i}].path: {bench.path} does not exist")
    uri = cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if cfg.tracking.enabled and uri and uri.startswith(("http://", "https://")):
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5)  # noqa: S310 - the user's own server
        except Exception as err:  # noqa: BLE001 - any failure means "not reachable", said once
            found.append(f"tracking URI {uri} is not reachable ({type(err).__name__}: {err})")
    if "://" in cfg.run.root:
        found.append(f"run.root: {cfg.run.root} is a URI; the run directory is written by the driver and must be a "
                     f"local or mounted folder (Ray Train/Tune storage takes URIs: ray.storage_path; models and "
                     f"reports also go to MLflow's artifact store)")
    trains = "train" in stages or "tune" in stages
    local = not (cfg.ray.address or os.environ.get("RAY_ADDRESS"))
    cpus = cfg.ray.num_cpus or os.cpu_count() or 1  # of the local cluster this run starts
    if trains and local:
        need = cfg.train.num_workers * cfg.train.cpus_per_worker
        if need > cpus - 0.5:  # trap 1: workers holding every CPU starve Ray Data's tasks, a silent hang
            found.append(f"train.num_workers × train.cpus_per_worker = {need:g} CPUs, but the local Ray cluster has "
                         f"{cpus} and Ray Data needs at least 0.5 beside the workers; lower one of them or set "
                         f"ray.num_cpus")
    for stage, section in (("rewardbench", cfg.rewardbench), ("best_of_n", cfg.best_of_n)):
        if local and stage in stages and not cfg.train.use_gpu and section.cpus_per_actor > cpus:
            # an actor no node can hold: Ray Data would wait for it forever
            found.append(f"{stage}.cpus_per_actor = {section.cpus_per_actor:g}, but the local Ray cluster has "
                         f"{cpus} CPUs; lower it or set ray.num_cpus")
    if trains:
        found.extend(attention_problems(cfg))
        from pipeline.lora import qlora_problem

        found.extend(p for p in [qlora_problem(cfg.lora)] if p)
    if cfg.train.use_gpu and trains:
        import torch

        if not torch.cuda.is_available() and not (cfg.ray.address or os.environ.get("RAY_ADDRESS")):
            found.append("train.use_gpu=true but this machine has no CUDA device and no Ray cluster is configured")
    return found


def attention_problems(cfg: PipelineConfig) -> list[str]:
    """``flash_attention_2`` runs only on CUDA with the ``flash-attn`` package importable; without either, the
    first forward on a worker would fail after the cluster, the data and the engine had started."""
    if cfg.model.attn_implementation != "flash_attention_2":
        return []
    import importlib.util

    if not cfg.train.use_gpu:
        return ["model.attn_implementation=flash_attention_2 runs on GPU only (train.use_gpu=false): use sdpa"]
    if importlib.util.find_spec("flash_attn") is None:
        return [("model.attn_implementation=flash_attention_2 needs the flash-attn package (pip install "
                 "flash-attn), not importable here; sdpa needs nothing")]
    return []
