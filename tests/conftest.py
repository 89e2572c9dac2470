"""Shared fixtures: offline Hugging Face, shared data location, GPU skip, Ray clean-up."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("NORMBT_SHARED_DATA", REPO.parent / "shared" / "data"))


# The whole suite's time budget: CI stops a run at 90 minutes and prints nothing of what failed. Past this budget
# every remaining test fails at once, saying so, and pytest still prints its summary.
SUITE_BUDGET_S = float(os.environ.get("NORMBT_SUITE_BUDGET_S", "4800"))
_SUITE_START = time.monotonic()


def pytest_report_header(config):
    """What a failure far away needs: the machine's size and load, and the variables that steer Ray and torch."""
    import shutil

    free_gb = shutil.disk_usage(os.environ.get("TMPDIR", "/tmp")).free / 2**30
    shm = shutil.disk_usage("/dev/shm").free / 2**30 if os.path.isdir("/dev/shm") else float("nan")
    steer = {k: v for k, v in os.environ.items()
             if k.startswith(("RAY_", "MLFLOW_", "NORMBT_")) or k in ("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                      "MASTER_ADDR", "MASTER_PORT", "HOME")}
    return [f"normbt: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, {free_gb:.1f} GiB free in temp, "
            f"{shm:.1f} GiB free in /dev/shm, suite budget {SUITE_BUDGET_S:.0f} s",
            f"normbt: environment {sorted(steer.items())}"]


def pytest_runtest_setup(item):
    spent = time.monotonic() - _SUITE_START
    if spent > SUITE_BUDGET_S:
        pytest.fail(f"not run: the suite has spent {spent:.0f} s, over its budget of {SUITE_BUDGET_S:.0f} s "
                    f"(NORMBT_SUITE_BUDGET_S)", pytrace=False)


@pytest.hookimpl(trylast=True)
def pytest_runtest_logreport(report):
    """A failure's last line, printed when it happens (with the time spent and the load): a run cut short
    from outside still shows why its tests failed."""
    if report.failed:
        crash = getattr(report.longrepr, "reprcrash", None)
        reason = " ".join(crash.message.split()) if crash else (str(report.longrepr).strip().splitlines() or ["?"])[-1]
        sys.stdout.write(f"\nFAILED-NOW {report.nodeid} ({report.when}, {report.duration:.0f} s, suite at "
                         f"{time.monotonic() - _SUITE_START:.0f} s, load {os.getloadavg()[0]:.1f}): "
                         f"{reason[:400]}\n")
        sys.stdout.flush()


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA} (set NORMBT_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the integration tier (starting Ray costs ~10 s on 2 cores)."""
    from pipeline.config import PipelineConfig
    from pipeline.raycluster import ensure_ray

    from pipeline import raycluster

    ray = ensure_ray(PipelineConfig())
    raycluster._STARTED = False  # the fixture owns this instance: run_pipeline.main must not shut it down
    yield ray
    ray.shutdown()


# ---------------------------------------------------------------- a loopback MLflow server

HEALTH_TIMEOUT_S = float(os.environ.get("NORMBT_MLFLOW_SERVER_TIMEOUT", "60"))  # measured: ~25 s on 2 cores


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as reply:
            return reply.status == 200
    except (urllib.error.URLError, OSError):
        return False


class MlflowServer:
    """A loopback ``mlflow server`` (REST tracking + registry + proxied artifacts) that can be stopped and started
    again on the same port with the same store, as a server that goes away and comes back: its SQLite store and
    artifacts in ``folder``, its own process group (its workers stop with it), its log shown if it fails to come up."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.url = f"http://127.0.0.1:{_free_port()}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> MlflowServer:
        port = self.url.rsplit(":", 1)[1]
        log_path = self.folder / "server.log"
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", port, "--workers", "1",
               "--backend-store-uri", f"sqlite:///{self.folder / 'srv.db'}",
               "--artifacts-destination", str(self.folder / "art"), "--serve-artifacts"]
        # No background job runner (7 huey consumers): it doubles the start-up time on 2 cores and is not needed.
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.folder, env=env,
                                         start_new_session=True)
        deadline = time.time() + HEALTH_TIMEOUT_S
        while not _healthy(self.url):
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.stop()
                pytest.fail(f"mlflow server exited with {code}:\n{log_path.read_text()[-3000:]}")
            if time.time() > deadline:
                self.stop()
                pytest.fail(f"mlflow server not healthy after {HEALTH_TIMEOUT_S:.0f}s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)
            self.proc = None


@pytest.fixture
def restartable_mlflow_server(tmp_path, monkeypatch):
    """A started :class:`MlflowServer` in tmp_path (cwd there, no MLflow env vars), always stopped at teardown."""
    monkeypatch.chdir(tmp_path)
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(key, raising=False)
    server = MlflowServer(tmp_path)
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture
def mlflow_server(restartable_mlflow_server):
    """``http://127.0.0.1:<port>`` of a fresh :class:`MlflowServer` in tmp_path, always stopped at teardown."""
    return restartable_mlflow_server.url


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group (created by this fixture: start_new_session), SIGKILL what remains."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return  # the whole group is gone
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
