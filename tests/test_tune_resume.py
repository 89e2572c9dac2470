"""Resume of an interrupted search, as users hit it: ``run_pipeline.py`` running the tune stage gets Ctrl-C
(SIGINT) in its first trial after a checkpoint, exits 130, and the same command again restores the Tune
experiment; the unfinished trial continues from its checkpoint in a new Tune actor, and the search ends with
both trials. The environment carries a stray rendezvous (``RANK``, ``MASTER_PORT``, ...) on a taken port, as
one started inside a torchrun or batch job does."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]
REPO = Path(__file__).resolve().parents[1]
ARGS = ["--config", "configs/smoke.yaml", "--stages", "data,tune", "tune.num_samples=2", "tracking.enabled=false",
        "tune.trial_overrides={train.max_steps: 60, train.checkpoint_every: 5, train.eval_every: 30}"]


def _env(busy_port: int) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    # What a shell inside a torchrun or batch job exports, and what a test process carries after training in
    # process. Ray's actors inherit it; a trial must not take it for its rendezvous (its port is taken here: a
    # CI run failed this way, every trial with EADDRINUSE).
    env.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(busy_port))
    return env


def test_an_interrupted_search_resumes_its_unfinished_trial_from_its_checkpoint(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        _interrupt_and_resume(tmp_path, _env(taken.getsockname()[1]))


def _interrupt_and_resume(tmp_path: Path, env: dict[str, str]) -> None:
    run_dir = tmp_path / "run"
    command = [sys.executable, "run_pipeline.py", "--run-dir", str(run_dir), *ARGS]
    log_path = tmp_path / "first.log"
    with open(log_path, "wb") as log:
        driver = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 600
        while "step 12/60" not in log_path.read_text(errors="replace"):  # the step-10 checkpoint is reported
            assert driver.poll() is None, log_path.read_text()[-3000:]
            assert time.time() < deadline, "the first trial did not reach step 12"
            time.sleep(0.2)
        driver.send_signal(signal.SIGINT)
        assert driver.wait(timeout=180) == 130, log_path.read_text()[-3000:]
    assert not (run_dir / "tune" / "manifest.json").exists()

    rerun = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    out = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, out[-3000:]
    assert "data: up to date, skipped" in out and "tune: resuming the interrupted experiment" in out
    assert "resumed from the checkpoint at step" in out, out[-3000:]
    trials = pd.read_csv(run_dir / "tune" / "trials.csv").sort_values("trial_id")
    assert len(trials) == 2 and set(trials["status"]) <= {"COMPLETED", "STOPPED"}  # ASHA may stop the second
    assert (trials["status"].iloc[0], trials["step"].iloc[0]) == ("COMPLETED", 60)  # the interrupted one
