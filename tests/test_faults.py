"""Faults a cluster batch run meets, injected for real: a trial stopped at a checkpoint report, a slow stopped
trial's teardown, a truncated or unregistered checkpoint. The process-level ones (SIGTERM, a full disk, two
pipelines) are in ``tests/test_fault_processes.py``."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

from pipeline import losses, train_loop


class SavingEngine:
    """What ``_checkpoint`` asks of a DeepSpeed engine: a save that writes real files into the folder."""

    global_rank = 0

    def save_checkpoint(self, folder: str, tag: str, client_state: dict) -> None:
        (Path(folder) / tag).mkdir(parents=True)
        torch.save({"w": torch.zeros(1000), **client_state}, Path(folder) / tag / "mp_rank_00_model_states.pt")


def _stopped_by_tune(metrics: dict, checkpoint_dir: str | None = None, final: bool = False) -> None:
    assert checkpoint_dir and any(Path(checkpoint_dir).rglob("*.pt"))  # the report carries a checkpoint
    raise SystemExit(0)  # what ray.tune.report does when the scheduler stopped the trial (session.sys.exit)


@pytest.mark.unit
@pytest.mark.parametrize("report_ends_it", [True, False], ids=["stopped-at-report", "save-fails"])
def test_no_checkpoint_stays_in_temporary_storage_whatever_ends_the_trial(tmp_path, monkeypatch, report_ends_it):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    engine = SavingEngine()
    if not report_ends_it:  # the save itself fails halfway (a full disk): the half-written folder goes too
        def half_then_full(folder, tag, client_state):
            SavingEngine().save_checkpoint(folder, tag, client_state)
            raise OSError(28, "No space left on device")
        engine.save_checkpoint = half_then_full
    with pytest.raises(SystemExit if report_ends_it else OSError):
        train_loop._checkpoint(engine, 4, 4, losses.DistanceEMA(0.9), {"loss": 1.0}, _stopped_by_tune)
    assert list(tmp_path.iterdir()) == []


def _deepspeed_like(folder: Path) -> Path:
    SavingEngine().save_checkpoint(str(folder), train_loop.CKPT_TAG, {"step": 2})
    torch.save({"optim": torch.ones(2000)}, folder / train_loop.CKPT_TAG / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    return folder


@pytest.mark.unit
def test_a_truncated_checkpoint_file_is_named_before_anything_loads_it(tmp_path):
    from safetensors.torch import save_file

    folder = _deepspeed_like(tmp_path / "ckpt-a")
    save_file({"w": torch.zeros(500)}, str(folder / "model.safetensors"))
    assert train_loop.checkpoint_problem(folder) is None
    optim = folder / train_loop.CKPT_TAG / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    os.truncate(optim, optim.stat().st_size // 2)
    assert train_loop.checkpoint_problem(folder).startswith(f"{optim} is unreadable")

    folder = _deepspeed_like(tmp_path / "ckpt-b")
    save_file({"w": torch.zeros(500)}, str(folder / "model.safetensors"))
    os.truncate(folder / "model.safetensors", 1000)
    assert train_loop.checkpoint_problem(folder).startswith(f"{folder / 'model.safetensors'} is truncated")
    assert "no DeepSpeed model states" in train_loop.checkpoint_problem(tmp_path)


@pytest.mark.unit
def test_only_checkpoints_ray_registered_stay(tmp_path):
    import json

    from pipeline.ray_train import SNAPSHOT, remove_unregistered_checkpoints

    names = ["checkpoint_2026-12-02_10-00-00.000000", "checkpoint_2026-12-02_10-00-05.000000"]
    for name in [*names, "checkpoint_2026-12-02_10-00-09.000000"]:
        _deepspeed_like(tmp_path / name)
    (tmp_path / SNAPSHOT).write_text(json.dumps({"checkpoint_report_indices": [3, 5], "checkpoint_results": [
        {"checkpoint_dir_name": n, "metrics": {}} for n in names]}))
    removed = remove_unregistered_checkpoints(tmp_path)
    assert removed == [tmp_path / "checkpoint_2026-12-02_10-00-09.000000"]
    assert sorted(p.name for p in tmp_path.glob("checkpoint_*") if p.is_dir()) == names


@pytest.mark.unit
def test_a_full_disk_is_said_naming_the_file_or_the_run_directory(tmp_path):
    from pipeline.runner import disk_full

    try:
        try:
            raise OSError(28, "No space left on device", str(tmp_path / "train" / "metrics.json"))
        except OSError as err:
            raise RuntimeError("export failed") from err
    except RuntimeError as err:
        said = disk_full(err, tmp_path)
    assert said.startswith(f"no space left on device writing {tmp_path / 'train' / 'metrics.json'}")
    ray_text = RuntimeError("training failed: OSError: [Errno 28] Error writing bytes to file. Detail: [errno 28] "
                            "No space left on device (File \"/elsewhere/ray/storage.py\", line 3)")
    assert disk_full(ray_text, tmp_path).startswith(f"no space left on device under the run directory {tmp_path} (")
    assert disk_full(RuntimeError("training failed: CUDA out of memory"), tmp_path) is None


# ------------------------------------------------------------------ integration: a stopped in-process trial

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"
TEARDOWN_S = 5.0  # a stopped trial's MLflow call this slow: over Tune's 2 s wait before it reuses the actor


class SlowToFinish:
    """A stage tracker whose trial runs take ``TEARDOWN_S`` to close as KILLED, as a remote MLflow call can."""

    uri = run_id = spool = None

    def child(self, name: str, tags: dict | None = None) -> SlowToFinish:
        return SlowToFinish()

    def log_params(self, params: dict) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        if status == "KILLED":
            import time

            time.sleep(TEARDOWN_S)


@pytest.fixture(scope="module")
def data_manifest(ray_session, tmp_path_factory):
    from pipeline import runner
    from pipeline.config import load_config

    cfg = load_config(SMOKE, [f"run.root={tmp_path_factory.mktemp('faults-data')}", "tracking.enabled=false"])
    return runner.run_pipeline(cfg, stages=("data",), log=lambda _: None)["data"]


@pytest.mark.integration
@pytest.mark.timeout(180)  # passes in ~40 s; before the fix Tune aborted trial 2, then hung
def test_a_slow_teardown_of_a_stopped_trial_never_fails_the_next_one(tmp_path, data_manifest, ray_session):
    """Two in-process trials in one reused Tune actor; the first is stopped at its step-2 report, which carries a
    checkpoint, and its teardown takes 5 s; the second trial must still run (Tune would abort it when the
    first one's thread outlives the wait)."""
    from ray import tune

    from pipeline.config import load_config
    from stages.tune import TrialSetup, _absolute, make_trainable, trial_resources

    cfg = load_config(SMOKE, ["tracking.enabled=false", "train.max_steps=4", "train.checkpoint_every=2"])
    setup = TrialSetup(cfg=cfg, data=_absolute(data_manifest), storage_path=str(tmp_path / "trials"),
                       tracker=SlowToFinish(), mode="search", digest="test", launcher="in_process")
    tuner = tune.Tuner(
        tune.with_resources(make_trainable(setup), trial_resources(cfg, "in_process")),
        param_space={"train.lr": tune.grid_search([3e-4, 1e-4])},
        tune_config=tune.TuneConfig(reuse_actors=True, max_concurrent_trials=1),
        run_config=tune.RunConfig(name="stopped", storage_path=str(tmp_path), stop={"step": 2},
                                  failure_config=tune.FailureConfig(max_failures=0)))
    grid = tuner.fit()
    assert [str(r.error) if r.error else None for r in grid] == [None, None]
    assert sorted(r.metrics["step"] for r in grid) == [2, 2]
