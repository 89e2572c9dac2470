"""Joining or starting Ray, once per driver process.

``ray.address`` (or ``RAY_ADDRESS``) joins an existing cluster; otherwise a local cluster starts with the
dashboard on, because Train-inside-Tune needs the State API to release a stopped trial's placement group.
Workers get the environment the stack needs on CPU (``DS_ACCELERATOR=cpu``) and the offline / tokenizer
settings of the driver.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from pipeline.config import PipelineConfig

_STARTED = False
# Variables forwarded to every Ray worker when set in the driver.
_FORWARD = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HOME", "TOKENIZERS_PARALLELISM",
            "DS_ACCELERATOR", "NORMBT_SHARED_DATA", "NORMBT_FAIL_AT_STEP", "PYTHONPATH")


def _chatty(log_level: str) -> bool:
    """``run.log_level`` INFO or DEBUG (``--verbose``): the libraries speak for themselves."""
    return log_level in ("DEBUG", "INFO")


def quiet_env(log_level: str) -> dict[str, str]:
    """Below INFO (``run.log_level``, the default WARNING) the libraries' own chatter stays off the terminal:
    transformers' load reports and progress bars (every trial and worker loads a model), the hub's bars, MLflow's
    and Ray Data's INFO lines ("Dataset ... execution finished" from every worker), Tune's experiment box (its
    new output prints it even at verbose 0; the classic reporter at 0 prints nothing), and Ray's log
    de-duplication: it takes lines that differ only in their numbers for repeats, so it held back most training
    progress lines ("step 2/8 ... [repeated 2x across cluster]") and printed its notice. Once the chatter is off,
    only rank 0's own lines reach the driver, so there is nothing left to de-duplicate. The driver reads
    ``RAY_DEDUP_LOGS`` when it imports ray: this runs before that. A value the user set wins."""
    if _chatty(log_level):
        return {}
    wanted = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "MLFLOW_LOGGING_LEVEL": "WARNING",
              "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "RAY_DATA_LOG_LEVEL": "WARNING",
              "RAY_AIR_NEW_OUTPUT": "0", "RAY_DEDUP_LOGS": "0"}
    return {k: os.environ.get(k, v) for k, v in wanted.items()}


def quiet_this_process(cfg: PipelineConfig) -> None:
    """:func:`quiet_env` for this process and, for libraries imported already, their loggers (``run.log_level``
    shapes the terminal only: no stage declares it, no output depends on it)."""
    import warnings

    log_level = cfg.run.log_level
    os.environ.update(quiet_env(log_level))
    if _chatty(log_level):
        return
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    for name in ("mlflow", "ray.data", "ray.train"):  # in case they were imported (and configured) already
        logging.getLogger(name).setLevel(logging.WARNING)
    # Ray Data's notice that progress bars are off (this module turned them off), once per process
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    # DeepSpeed's collectives call torch APIs that torch has deprecated: nothing for the user to change
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    if not getattr(sys.unraisablehook, "drops_stop_signal", False):
        sys.unraisablehook = stop_signal_dropped(sys.unraisablehook)


def stop_signal_dropped(default: Any) -> Any:
    """An unraisable-exception hook that drops ``SystemExit`` and hands anything else to ``default``.

    Ray turns the SIGTERM that stops an actor (Tune stopping a trial that ASHA cut, in its reused actor) into a
    ``SystemExit`` raised in whatever code is running. When that is a weakref or ``__del__`` callback, Python
    cannot raise it and prints "Exception ignored in ..." with a traceback: the stop working, not a fault (seen
    in a default-sized search on 2 cores)."""
    def hook(unraisable: Any) -> None:
        if unraisable.exc_type is SystemExit:
            return
        default(unraisable)

    hook.drops_stop_signal = True
    return hook


def tune_verbosity(cfg: PipelineConfig) -> int:
    """Tune's ``verbose``: its trial tables only with ``run.log_level`` INFO or DEBUG (``--verbose``)."""
    return int(_chatty(cfg.run.log_level))


def worker_env(use_gpu: bool, log_level: str = "WARNING") -> dict[str, str]:
    env = {k: os.environ[k] for k in _FORWARD if k in os.environ}
    env.update(quiet_env(log_level))
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
        runtime_env = {"env_vars": worker_env(cfg.train.use_gpu, cfg.run.log_level)}
        if address:
            address = _token_auth_like_the_head(address)
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
            print(f"ray: joined the existing cluster at {address} ({cluster_nodes()} node(s), "
                  f"{ray.cluster_resources().get('CPU', 0):g} CPUs, {ray.cluster_resources().get('GPU', 0):g} GPUs)",
                  flush=True)
        else:
            os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
            if not _chatty(cfg.run.log_level):  # ray.init's notice, every run, that it chose token authentication
                logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
            # address="local": a new cluster for this run. Without it ray.init joins the last cluster started on
            # this machine (/tmp/ray/ray_current_cluster), even one that has since been stopped (a hang).
            with _sigterm_handler_kept(), _gcs_address_told(runtime_env["env_vars"]):
                ray.init(address="local", num_cpus=cfg.ray.num_cpus, runtime_env=runtime_env,
                         include_dashboard=True, log_to_driver=True, configure_logging=True, logging_level="WARNING")
        _STARTED = True
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    return ray


@contextmanager
def _gcs_address_told(env_vars: dict[str, str]) -> Iterator[None]:
    """Start the local cluster's GCS on a port chosen here and tell every process of the job its address
    (``RAY_ADDRESS``). Ray's State API inside an actor, which Ray Train's placement-group cleaner calls to release
    the workers' CPUs when a trial is stopped, otherwise looks the cluster up in /tmp/ray/ray_current_cluster. Only
    ``ray start`` writes that file, so for a cluster ``ray.init`` started it names another cluster (or none): the
    cleaner's thread dies after 40 s with a traceback on the terminal and nothing is released."""
    import socket

    from ray._common.network_utils import build_address
    from ray.util import get_node_ip_address

    port = os.environ.get("RAY_GCS_SERVER_PORT")  # the user's port, if set
    if not port:
        with socket.socket() as sock:
            sock.bind(("", 0))
            port = str(sock.getsockname()[1])
    env_vars.setdefault("RAY_ADDRESS", build_address(get_node_ip_address(), int(port)))
    old = os.environ.get("RAY_GCS_SERVER_PORT")
    os.environ["RAY_GCS_SERVER_PORT"] = port
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("RAY_GCS_SERVER_PORT", None)


@contextmanager
def _sigterm_handler_kept() -> Iterator[None]:
    """Starting a local cluster, ``ray.init`` replaces the process's SIGTERM handler with one that kills Ray's
    processes and exits 1 in the middle of whatever runs. A handler the caller installed (``run_pipeline.py``:
    SIGTERM stops like Ctrl-C, then Ray is shut down) is put back; without one, Ray's stays."""
    import signal
    import threading

    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if main and callable(previous):
            signal.signal(signal.SIGTERM, previous)


def _token_auth_like_the_head(address: str) -> str:
    """Send Ray's auth token exactly when the head asks for one; return the address to join.

    Ray 2.60 turns on token authentication for a cluster started with ``ray start`` when a token exists
    (``RAY_AUTH_TOKEN`` or ``~/.ray/auth_token``), but a driver joining it sends no token unless
    ``RAY_AUTH_MODE=token``: the join fails with "InvalidAuthToken". The opposite also breaks: a driver in token
    mode joining a head without auth rejects its raylets' calls, and the first task fails with OwnerDiedError.
    So ask the head (a GCS client without a token is refused at once by a token head) and follow its answer,
    unless the user chose a mode. An unclear answer keeps Ray's own rule (token mode when a token exists).
    ``"auto"`` is resolved to the recorded head's address first: given "auto", ``ray.init`` would apply Ray's
    rule again by itself.
    """
    from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available

    if os.environ.get("RAY_AUTH_MODE") is not None:
        return address
    if address == "auto":
        from ray._private.services import canonicalize_bootstrap_address

        try:
            address = canonicalize_bootstrap_address(address) or address
        except Exception:  # no recorded cluster: ray.init says so itself
            pass
    if _head_requires_token(address) is not False:
        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    return address


def _host_port(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of a ``host:port`` or ``[v6]:port`` address; None for anything else (``ray://``...)."""
    from ray._common.network_utils import parse_address

    parsed = parse_address(address) if "://" not in address else None
    if parsed is None or not str(parsed[1]).isdigit():
        return None
    return parsed[0], int(parsed[1])


def _head_requires_token(address: str) -> bool | None:
    """True / False as the head's GCS answers a client without a token; None when it cannot tell."""
    import socket

    import ray.exceptions
    from ray._raylet import GcsClient

    target = _host_port(address)
    if target is None:
        return None
    try:  # an unreachable head would hold the GCS client for 40 s; ray.init reports it in its own words
        socket.create_connection(target, timeout=5).close()
    except OSError:
        return None
    try:
        GcsClient(address=address)
    except ray.exceptions.AuthenticationError:
        return True
    except Exception:  # not a GCS, or an error that says nothing about auth
        return None
    return False


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


# ---------------------------------------------------------------- placement groups left by stopped Tune trials
# When ASHA stops a trial, its Train controller is killed and the workers' placement group is released only by a
# cleaner that asks the dashboard's State API, which fails when a second Ray instance runs on the machine ("Found
# multiple active Ray instances"): the CPUs would stay reserved and the next trial starve. These helpers find and
# remove such groups, with the cluster's address given explicitly.


def await_free_cpu(timeout_s: float, *, sole_trial: bool, keep_bundles: list, needed: float = 1.0,
                   grace_s: float = 10.0) -> None:
    """Wait until ``needed`` CPU is free (the trial's Train workers need it), which never happens if an earlier
    trial's placement group was never released.
    When this is the only trial running, this job's groups still there after ``grace_s`` other than the trial's own
    (shaped ``keep_bundles``) can only be such leftovers: they are removed. Past ``timeout_s`` the trial errors out."""
    import ray

    start = time.monotonic()
    released = False
    while (free := ray.available_resources().get("CPU", 0.0)) < needed - 1e-6:
        waited = time.monotonic() - start
        if sole_trial and not released and waited > grace_s:
            released = True
            groups = job_placement_groups()
            remove_placement_groups([g for g, bundles in (groups or {}).items() if bundles != keep_bundles])
            continue
        if waited > timeout_s:
            raise TimeoutError(f"only {free:.2f} CPU free after {timeout_s:.0f}s, {needed} needed to start this "
                               f"trial: a stopped trial's placement group was probably not released (its cleaner "
                               f"needs the dashboard's State API and a single Ray instance per machine)")
        time.sleep(1.0)


def job_placement_groups() -> dict[str, list] | None:
    """``{id: bundles}`` of this job's placement groups not yet removed; None when the State API cannot tell.
    The cluster address is passed explicitly, so a second Ray instance on the machine does not confuse it."""
    import ray
    from ray.util.state import list_placement_groups

    context = ray.get_runtime_context()
    for attempt in range(3):  # the dashboard may still be starting
        try:
            groups = list_placement_groups(address=context.gcs_address, limit=10_000, detail=True,
                                           raise_on_missing_output=False,
                                           filters=[("creator_job_id", "=", context.get_job_id())])
            break
        except Exception:  # noqa: BLE001 - no dashboard (State API), e.g. a remote cluster without it
            if attempt == 2:
                return None
            time.sleep(2.0)
    return {g.placement_group_id: [b.get("unit_resources", b) for b in (g.bundles or [])]
            for g in groups if g.state != "REMOVED"}


def remove_placement_groups(ids: Sequence[str]) -> list[str]:
    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    removed = []
    for pg_id in ids:
        try:
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))
            removed.append(pg_id)
        except Exception:  # noqa: BLE001, S112 - already gone
            continue
    return removed
