"""Faults a cluster batch run meets, injected for real: a trial stopped at a checkpoint report, a slow stopped
trial's teardown, a truncated or unregistered checkpoint. The process-level ones (SIGTERM, a full disk, two
pipelines) are in ``tests/test_fault_processes.py``."""

from __future__ import annotations

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
