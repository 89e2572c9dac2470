"""Resume after the driver dies, as users hit it: the embedded default model, ``run_pipeline.py`` killed with its
whole process group (SIGKILL: Ray's processes share the driver's fate) after a checkpoint, then the same command
again. The rerun skips the data stage, a new Ray session restores the Train run from storage, and the final
weights equal an uninterrupted run's (two uninterrupted runs are bit-identical on CPU)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]
REPO = Path(__file__).resolve().parents[1]
ARGS = ["--stages", "data,train", "train.max_steps=8", "train.checkpoint_every=4", "train.log_every=1",
        "tracking.enabled=false"]


def _command(run_dir: Path) -> list[str]:
    return [sys.executable, "run_pipeline.py", "--run-dir", str(run_dir), *ARGS]


def _env() -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    return env


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "train" / "model" / "model.safetensors"))


@pytest.mark.slow  # 4-5 min on 2 cores; tests/test_train_stage.py's killed-worker resume runs by default
def test_driver_killed_after_a_checkpoint_reruns_to_the_uninterrupted_weights(tmp_path):
    straight = tmp_path / "straight"
    done = subprocess.run(_command(straight), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    killed = tmp_path / "killed"
    shutil.copytree(straight / "data", killed / "data")  # the same data stage (its hash matches: skipped)
    log_path = tmp_path / "killed.log"
    with open(log_path, "wb") as log:
        driver = subprocess.Popen(_command(killed), cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
        deadline = time.time() + 600
        while "step 6/8" not in log_path.read_text(errors="replace"):  # the step-4 checkpoint is reported
            assert driver.poll() is None, log_path.read_text()[-3000:]
            assert time.time() < deadline, "training did not reach step 6"
            time.sleep(0.2)
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=60)
    assert not (killed / "train" / "manifest.json").exists()

    rerun = subprocess.run(_command(killed), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    out = rerun.stdout + rerun.stderr
    assert "data: up to date, skipped" in out
    assert "resumed from the checkpoint at step 4" in out and "step 1/8" not in out
    reference, resumed = _weights(straight), _weights(killed)
    assert reference.keys() == resumed.keys()
    for key in reference:
        torch.testing.assert_close(resumed[key], reference[key], rtol=0, atol=1e-6, msg=key)
    final = [json.loads((run / "train" / "metrics.json").read_text())["final"] for run in (straight, killed)]
    assert final[0]["val_accuracy"] == final[1]["val_accuracy"] and final[1]["step"] == 8
