"""Joining or starting Ray, once per driver process.

``ray.address`` (or ``RAY_ADDRESS``) joins an existing cluster; otherwise a local cluster starts with the
dashboard on, because Train-inside-Tune needs the State API to release a stopped trial's placement group.
Workers get the environment the stack needs on CPU (``DS_ACCELERATOR=cpu``) and the offline / tokenizer
settings of the driver.
"""

from __future__ import annotations

import os
from typing import Any

from pipeline.config import PipelineConfig

_STARTED = False
# Variables forwarded to every Ray worker when set in the driver.
_FORWARD = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HOME", "TOKENIZERS_PARALLELISM",
            "DS_ACCELERATOR", "NORMBT_SHARED_DATA", "NORMBT_FAIL_AT_STEP", "PYTHONPATH")


def worker_env(use_gpu: bool) -> dict[str, str]:
    env = {k: os.environ[k] for k in _FORWARD if k in os.environ}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not use_gpu:
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed otherwise probes for CUDA and fails on CPU-only nodes
    return env


def ensure_ray(cfg: PipelineConfig) -> Any:
    """Initialise Ray if this process has not; return the ``ray`` module."""
    global _STARTED
    import ray
    from ray.data import DataContext

    if not ray.is_initialized():
        address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
        runtime_env = {"env_vars": worker_env(cfg.train.use_gpu)}
        if address:
            _token_auth_like_the_head()
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
            print(f"ray: joined the existing cluster at {address} ({cluster_nodes()} node(s), "
                  f"{ray.cluster_resources().get('CPU', 0):g} CPUs, {ray.cluster_resources().get('GPU', 0):g} GPUs)",
                  flush=True)
        else:
            os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
            # address="local": a new cluster for this run. Without it ray.init joins the last cluster started on
            # this machine (/tmp/ray/ray_current_cluster), even one that has since been stopped (a hang).
            ray.init(address="local", num_cpus=cfg.ray.num_cpus, runtime_env=runtime_env, include_dashboard=True,
                     log_to_driver=True, configure_logging=True, logging_level="WARNING")
        _STARTED = True
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    return ray


def _token_auth_like_the_head() -> None:
    """Ray 2.60 turns on token authentication for a cluster started with ``ray start`` when a token exists
    (``RAY_AUTH_TOKEN`` or ``~/.ray/auth_token``), but a driver joining it does not send that token unless
    ``RAY_AUTH_MODE=token``: the join fails with "InvalidAuthToken". Apply the head's rule here too (Ray's own
    function, which also refreshes the config Ray has already read), unless the user chose a mode."""
    from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available

    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def cluster_nodes() -> int:
    import ray

    return len([n for n in ray.nodes() if n.get("Alive")])


def shutdown_if_started() -> None:
    """Stop the Ray instance this process started (never a cluster we merely joined)."""
    global _STARTED
    if _STARTED:
        import ray

        ray.shutdown()
        _STARTED = False
