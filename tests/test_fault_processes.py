"""Faults injected into the real entry point, ``run_pipeline.py`` on the smoke config (data + 24 train steps,
a checkpoint every 2): SIGTERM mid-training, a truncated checkpoint next to one that never got registered;
SIGTERM mid-search (data + tune, two trials of 60 steps, a checkpoint every 5).
One uninterrupted run (module fixture) gives the reference weights: two uninterrupted runs are bit-identical on
CPU, so any difference after a fault is the fault's."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # 2-4 min each on 2 cores: pytest -m slow
REPO = Path(__file__).resolve().parents[1]
ARGS = ["--config", "configs/smoke.yaml", "--stages", "data,train", "train.max_steps=24", "train.checkpoint_every=2",
        "tracking.enabled=false"]
TUNE_ARGS = ["--config", "configs/smoke.yaml", "--stages", "data,tune", "tune.num_samples=2", "tracking.enabled=false",
             "tune.trial_overrides={train.max_steps: 60, train.checkpoint_every: 5, train.eval_every: 30}"]


def command(run_dir: Path, args: list[str] = ARGS) -> list[str]:
    return [sys.executable, "run_pipeline.py", "--run-dir", str(run_dir), *args]


def environment(ray_tmp: str | None = None) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    if ray_tmp:
        env["RAY_TMPDIR"] = ray_tmp  # every Ray process of the run carries it in its command line
    return env


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "train" / "model" / "model.safetensors"))


def assert_same_weights(run_dir: Path, reference: Path) -> None:
    expected, got = weights(reference), weights(run_dir)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6, msg=key)


def ray_processes(ray_tmp: str) -> list[tuple[int, str]]:
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True, check=False).stdout
    return [(int(pid), args) for pid, _, args in (line.strip().partition(" ") for line in out.splitlines())
            if ray_tmp in args]


def terminate_at(run_dir: Path, args: list[str], marker: str, log_path: Path) -> str:
    """Run the command in its own session with its own Ray temp folder, SIGTERM the driver alone (what a scheduler
    sends first) once ``marker`` is printed; assert exit 143 within 60 s and no process of the Ray it started left
    (whatever remains is killed, never by name). Returns the run's output."""
    ray_tmp = tempfile.mkdtemp(prefix="rt27-", dir="/tmp")  # short: Ray's socket paths live under it
    try:
        with open(log_path, "wb") as log:
            driver = subprocess.Popen(command(run_dir, args), cwd=REPO, env=environment(ray_tmp), stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True)
            deadline = time.time() + 600
            while marker not in log_path.read_text(errors="replace"):
                assert driver.poll() is None, log_path.read_text()[-3000:]
                assert time.time() < deadline, f"the run never printed {marker!r}"
                time.sleep(0.1)
            driver.send_signal(signal.SIGTERM)
            sent = time.time()
            code = driver.wait(timeout=120)
            took = time.time() - sent
        text = log_path.read_text(errors="replace")
        assert code in (143, -signal.SIGTERM) and took < 60, f"exit {code} after {took:.0f} s:\n{text[-3000:]}"
        deadline = time.time() + 10  # processes told to stop may take a moment to go
        while ray_processes(ray_tmp) and time.time() < deadline:
            time.sleep(0.5)
        left = ray_processes(ray_tmp)
        assert not left, "Ray processes left behind:\n" + "\n".join(f"{pid} {args[:160]}" for pid, args in left)
        return text
    finally:
        for pid, _ in ray_processes(ray_tmp):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """The uninterrupted run. Its folder is named ``run`` like every faulted one: the Ray Train run name
    carries the run folder's name, so a copy under that name resumes from its checkpoints."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    done = subprocess.run(command(run_dir), cwd=REPO, env=environment(), capture_output=True, text=True, timeout=600,
                          check=False)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return run_dir


def rerun(run_dir: Path, args: list[str] = ARGS) -> str:
    done = subprocess.run(command(run_dir, args), cwd=REPO, env=environment(), capture_output=True, text=True, timeout=600,
                          check=False)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert "data: up to date, skipped" in out
    return out


@pytest.mark.timeout(900)
def test_a_truncated_checkpoint_is_passed_over_and_an_unregistered_one_removed(straight, tmp_path):
    """The newest registered checkpoint (the final one) has one rank's optimizer states cut to half, as a full
    disk or a killed copy leaves it; a complete checkpoint folder Ray never registered lies beside it. The rerun
    says so, resumes from the previous checkpoint, removes the unregistered folder and ends on the weights of
    the uninterrupted run."""
    run_dir = tmp_path / "run"
    shutil.copytree(straight, run_dir)
    (run_dir / "train" / "manifest.json").unlink()  # the train stage reruns; Ray Train finds its checkpoints
    [train_run] = (run_dir / "ray_storage").glob("train-run-*")
    newest, previous = sorted(p for p in train_run.glob("checkpoint_*") if p.is_dir())[::-1]
    cut = newest / "ckpt" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    os.truncate(cut, cut.stat().st_size // 2)
    unregistered = train_run / "checkpoint_2099-01-01_00-00-00.000000"
    shutil.copytree(previous, unregistered)

    out = rerun(run_dir)
    assert f"checkpoint {newest} cannot be resumed from: {cut} is unreadable" in out, out[-3000:]
    assert f"resuming from the earlier checkpoint {previous}" in out
    assert "resumed from the checkpoint at step 22" in out
    assert f"removed {unregistered}, a checkpoint written but never registered" in out
    assert not unregistered.exists()
    assert_same_weights(run_dir, straight)


@pytest.mark.timeout(900)
def test_sigterm_stops_training_like_ctrl_c_leaves_no_ray_process_and_the_rerun_resumes(straight, tmp_path):
    """SIGTERM to the driver alone (what a scheduler sends first) after the step-4 checkpoint: exit 143 within
    60 s, no process of the Ray it started left, the stage unfinished; the same command resumes to the
    uninterrupted weights."""
    run_dir = tmp_path / "run"
    shutil.copytree(straight / "data", run_dir / "data")  # the same data stage (its hash matches: skipped)
    text = terminate_at(run_dir, ARGS, "step 5/24", tmp_path / "terminated.log")  # the step-4 checkpoint is reported
    assert not (run_dir / "train" / "manifest.json").exists(), "training finished before the signal came:\n" + text[-3000:]

    out = rerun(run_dir)
    assert "resumed from the checkpoint at step" in out and "step 1/24" not in out, out[-3000:]
    assert_same_weights(run_dir, straight)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sigterm_during_the_search_exits_143_leaves_no_ray_process_and_the_rerun_completes(tmp_path):
    """SIGTERM to the driver while the first trial runs, after its step-10 checkpoint reached Tune: exit 143
    within 60 s, no process of the Ray it started left, the tune stage unfinished; the same command restores the
    Tune experiment, the interrupted trial continues from that checkpoint (not from step 0) and both trials end."""
    import pandas as pd

    run_dir = tmp_path / "run"
    text = terminate_at(run_dir, TUNE_ARGS, "step 12/60", tmp_path / "terminated.log")  # step-10 checkpoint reported
    assert "terminated (SIGTERM): rerun the same command to resume" in text, text[-3000:]
    assert not (run_dir / "tune" / "manifest.json").exists(), "the search finished before the signal came"

    out = rerun(run_dir, TUNE_ARGS)
    assert "tune: resuming the interrupted experiment" in out, out[-3000:]
    resumed = [int(s) for s in re.findall(r"resumed from the checkpoint at step (\d+)", out)]
    assert resumed and resumed[0] >= 10, f"resumed from {resumed}, not the step-10 checkpoint:\n{out[-3000:]}"
    assert (run_dir / "tune" / "manifest.json").is_file()
    trials = pd.read_csv(run_dir / "tune" / "trials.csv").sort_values("trial_id")
    assert len(trials) == 2 and set(trials["status"]) <= {"COMPLETED", "STOPPED"}  # ASHA may stop the second
    assert (trials["status"].iloc[0], trials["step"].iloc[0]) == ("COMPLETED", 60)  # the interrupted one


@pytest.mark.timeout(900)
def test_a_full_disk_under_the_run_directory_is_named_and_the_rerun_completes_after_space_is_freed(straight,
                                                                                                   tmp_path):
    """The run directory on a 45 MiB filesystem of its own (tmpfs): the data stage fits, the second training
    checkpoint (about 32 MiB each) does not. The run fails naming the device and the run directory, the train
    stage is not marked done; once the filesystem is grown (space freed), the same command completes, to the
    uninterrupted run's weights."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=45M", "tmpfs", str(disk)], capture_output=True,
                             text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small filesystem here (needs root): {mounted.stderr.strip()}")
    try:
        run_dir = disk / "run"
        full = subprocess.run(command(run_dir), cwd=REPO, env=environment(), capture_output=True, text=True,
                              timeout=600, check=False)
        err = full.stderr
        assert full.returncode == 1, (full.stdout + err)[-3000:]
        # The run's own last words (Ray's worker logs may still arrive after them)
        said = err.rpartition("error: stage 'train' failed: ")[2].partition("fix the cause and rerun")[0]
        assert said.startswith("no space left on device ") and str(run_dir) in said and "MiB free" in said, err[-3000:]
        assert "Traceback" not in said, said
        assert (run_dir / "data" / "manifest.json").is_file() and not (run_dir / "train" / "manifest.json").exists()

        grown = subprocess.run(["mount", "-o", "remount,size=400M", str(disk)], capture_output=True, text=True,
                               check=False)
        assert grown.returncode == 0, grown.stderr
        rerun(run_dir)
        assert (run_dir / "train" / "manifest.json").is_file()
        assert_same_weights(run_dir, straight)
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True, check=False)


@pytest.mark.timeout(900)
def test_two_pipelines_at_once_on_one_machine_share_the_default_mlflow_store_and_both_finish(tmp_path):
    """Two ``run_pipeline.py`` started together (different run directories under one ``run.root``, so one
    MLflow SQLite store created by whichever comes first, each its own local Ray): both finish, each with its
    own MLflow run and a trained model."""
    from mlflow import MlflowClient

    root = tmp_path / "root"
    args = ["--config", "configs/smoke.yaml", "--stages", "data,train", "train.max_steps=4", f"run.root={root}"]
    logs = [tmp_path / f"{name}.log" for name in ("a", "b")]
    drivers = []
    for name, log_path in zip(("a", "b"), logs):
        with open(log_path, "wb") as log:
            drivers.append(subprocess.Popen([sys.executable, "run_pipeline.py", *args, f"run.name={name}"],
                                            cwd=REPO, env=environment(), stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True))
    try:
        codes = [driver.wait(timeout=800) for driver in drivers]
    finally:
        for driver in drivers:
            if driver.poll() is None:
                os.killpg(driver.pid, signal.SIGKILL)
    for code, log_path in zip(codes, logs):
        assert code == 0, f"{log_path.name}: exit {code}\n{log_path.read_text(errors='replace')[-3000:]}"
    for name in ("a", "b"):
        assert (root / name / "train" / "model" / "model.safetensors").is_file()
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("normbt")  # tracking.experiment_name
    runs = [r for r in client.search_runs([experiment.experiment_id]) if r.info.run_name in ("a", "b")]
    assert sorted(r.info.run_name for r in runs) == ["a", "b"] and {r.info.status for r in runs} == {"FINISHED"}
