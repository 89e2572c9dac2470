"""The register stage against a real ``mlflow server`` (REST tracking + registry + proxied artifacts).

The server listens on 127.0.0.1 only, on a free port, with its SQLite store and artifacts in tmp_path;
it is always terminated (process group) in the fixture's teardown. Upstream stages are the stand-ins of
``test_register_stage.py``.
"""

from __future__ import annotations

import json
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

from stages import register
from tests.test_register_stage import (
    MODEL_NAME,
    PAIRS,
    check_report,
    fake_upstream,
    make_config,
    model_dir,  # noqa: F401 - fixture
    reference_rewards,
    registered,
    run_register,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

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


@pytest.fixture
def mlflow_server(tmp_path, monkeypatch):
    """``http://127.0.0.1:<port>`` of a fresh server; its log is shown if it fails to come up."""
    monkeypatch.chdir(tmp_path)
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(key, raising=False)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "server.log"
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{tmp_path / 'srv.db'}",
           "--artifacts-destination", str(tmp_path / "art"), "--serve-artifacts"]
    # No background job runner (7 huey consumers): it doubles the start-up time on 2 cores and is not needed.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(log_path, "wb") as log:
        # Own process group: the server's worker processes are stopped with it.
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, env=env,
                                start_new_session=True)
    try:
        deadline = time.time() + HEALTH_TIMEOUT_S
        while not _healthy(url):
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            if time.time() > deadline:
                pytest.fail(f"mlflow server not healthy after {HEALTH_TIMEOUT_S:.0f}s:\n"
                            f"{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        _stop(proc)


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


def test_register_against_server(mlflow_server, model_dir, tmp_path):  # noqa: F811 - fixture
    import mlflow
    from mlflow import MlflowClient

    url = mlflow_server
    cfg = make_config(tmp_path / "runs", "srv1", url)
    fake_upstream(cfg, tmp_path / "runs" / "srv1", model_dir, score=0.61)
    first = run_register(cfg, tmp_path / "runs" / "srv1")
    rec = registered(first)
    assert (rec["version"], rec["aliases"], rec["decision"]) == (1, ["candidate", "champion"], "promoted")
    assert rec["tracking_uri"] == url
    check_report(first)

    cfg = make_config(tmp_path / "runs", "srv2", url)
    fake_upstream(cfg, tmp_path / "runs" / "srv2", model_dir, score=0.52)
    rec = registered(run_register(cfg, tmp_path / "runs" / "srv2"))
    assert (rec["version"], rec["aliases"], rec["decision"]) == (2, ["candidate"], "kept previous champion")

    client = MlflowClient(tracking_uri=url)
    assert str(client.get_model_version_by_alias(MODEL_NAME, "champion").version) == "1"
    assert str(client.get_model_version_by_alias(MODEL_NAME, "candidate").version) == "2"
    assert client.get_model_version(MODEL_NAME, "2").tags["previous_champion_version"] == "1"
    # artifacts went through the server into its artifact destination, not the client's cwd
    assert any((tmp_path / "art").rglob("MLmodel")) and not (tmp_path / "mlruns").exists()
    stage_run = client.get_run(first.mlflow_run_id)
    names = {a.path for a in client.list_artifacts(first.mlflow_run_id, "report")}
    assert "report/report.html" in names and stage_run.info.status == "FINISHED"

    with register.mlflow_globals(url):
        model = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@champion")
    rewards = model.predict(PAIRS)["reward"].tolist()
    assert rewards == pytest.approx(reference_rewards(model_dir, PAIRS), abs=1e-5)
    assert json.loads(Path(first.output("model_uri")).read_text())["uri"] == f"models:/{MODEL_NAME}/1"
