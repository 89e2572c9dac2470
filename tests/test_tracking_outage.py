"""The MLflow server goes away: a real ``mlflow server`` stopped and started again on the same port and store.

- Down for a while mid-stage, then back: nothing logged is lost, the stage never waits on the server, calls from
  another process (a Ray Train worker holds a pickled logger) are kept too, and the runs say what happened.
- Down for good when a stage starts: a clear error within ``tracking.wait_s``; after it returns, the same command
  completes with one pipeline run, one run per stage and one registry version.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import runner, tracking
from pipeline.config import load_config
from tests.test_register_stage import MODEL_NAME, fake_upstream, make_config, model_dir, registered  # noqa: F401

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[1]


def _runs(client, experiment: str = "normbt"):
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], max_results=100)


def test_a_server_down_mid_stage_loses_nothing_and_the_runs_say_so(restartable_mlflow_server, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    server = restartable_mlflow_server
    cfg = load_config(REPO / "configs" / "smoke.yaml", [f"run.root={tmp_path / 'runs'}", "run.name=outage",
                                                        f"tracking.tracking_uri={server.url}"])
    run_dir = tmp_path / "runs" / "outage"
    parent = tracking.start_pipeline_run(cfg, run_dir)
    stage = parent.child("train", tags={"pipeline.stage": "train"})
    stage.log_metrics({"loss": 1.0}, step=0)
    artifact = tmp_path / "metrics.json"
    artifact.write_text('{"val_accuracy": 0.75}')

    server.stop()
    started = time.time()
    for step in range(1, 6):
        stage.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
    stage.set_tags({"checkpoint": "step-5"})
    stage.log_artifact(artifact)
    # a train worker logs through a pickled copy of the stage's logger, in its own process
    worker = ("import pickle, sys; logger = pickle.loads(sys.stdin.buffer.read()); "
              "logger.log_metrics({'loss': 0.15}, step=6)")
    subprocess.run([sys.executable, "-c", worker], input=pickle.dumps(stage), check=True, cwd=REPO, timeout=120)
    assert time.time() - started < 60, "logging waited on the server that is down"
    assert stage.pending() == 8
    assert (run_dir / tracking.SPOOL_NAME).is_file()

    server.start()
    monkeypatch.setattr(tracking, "RETRY_AFTER_S", 0.0)  # the next call tries the server at once
    stage.log_metrics({"loss": 0.1}, step=7)
    stage.finish("FINISHED")
    parent.finish("FINISHED")

    client = MlflowClient(tracking_uri=server.url)
    history = sorted((m.step, round(m.value, 6)) for m in client.get_metric_history(stage.run_id, "loss"))
    assert history == [(0, 1.0), *((s, round(1.0 / (s + 1), 6)) for s in range(1, 6)), (6, 0.15), (7, 0.1)]
    run = client.get_run(stage.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["checkpoint"] == "step-5"
    assert run.data.tags["tracking.spooled_calls"] == "8"
    assert "unreachable" in run.data.tags["tracking.outage"]
    assert [a.path for a in client.list_artifacts(stage.run_id)] == ["metrics.json"]
    assert stage.pending() == 0
    assert [r.info.run_id for r in _runs(client)].count(parent.run_id) == 1


def test_a_server_gone_when_a_stage_starts_stops_clearly_and_the_rerun_completes_once(
        restartable_mlflow_server, model_dir, tmp_path, monkeypatch):  # noqa: F811 - fixture
    from mlflow import MlflowClient

    server = restartable_mlflow_server
    cfg = make_config(tmp_path / "runs", "gone", server.url, "tracking.wait_s=3")
    run_dir = tmp_path / "runs" / "gone"
    fake_upstream(cfg, run_dir, model_dir, score=0.61)

    def server_dies_as_register_starts(line: str) -> None:
        print(line)
        if "register: running" in line:
            server.stop()

    started = time.time()
    with pytest.raises(runner.PipelineError) as failure:
        runner.run_pipeline(cfg, run_dir=run_dir, stages=("register",), log=server_dies_as_register_starts)
    message = str(failure.value)
    assert time.time() - started < 90, "the error came after MLflow's own minutes of retries"
    assert "stage 'register' could not start" in message and server.url in message
    assert "tracking.wait_s" in message and "Rerun the same command" in message
    assert not (run_dir / "register" / "manifest.json").exists()

    server.start()
    monkeypatch.setattr(tracking, "RETRY_AFTER_S", 0.0)
    manifest = runner.run_pipeline(cfg, run_dir=run_dir, stages=("register",), log=print)["register"]
    assert registered(manifest)["version"] == 1

    client = MlflowClient(tracking_uri=server.url)
    runs = _runs(client)
    # the pipeline's run, the stand-in upstream's train run, and one register run: the failed start left none
    assert sorted(r.info.run_name for r in runs) == ["gone", "register", "train"]
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert [v.version for v in client.search_model_versions(f"name='{MODEL_NAME}'")] == ["1"]
    assert not (run_dir / tracking.SPOOL_NAME).exists() or (run_dir / tracking.SPOOL_NAME).read_text() == ""


def test_a_spooled_call_the_store_refuses_is_set_aside_and_the_rest_still_go(tmp_path, monkeypatch):
    """A kept call for a run deleted meanwhile, and a line cut short by a kill, must not block the calls behind
    them or crash the logging call that replays them (the SQLite store: it always answers)."""
    import json

    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("e")
    alive, deleted = (client.create_run(exp).info.run_id for _ in range(2))
    client.delete_run(deleted)
    spool = tmp_path / tracking.SPOOL_NAME
    records = [{"run_id": deleted, "op": "metrics", "payload": {"rows": [["loss", 1.0, 1000, 0]]}, "at": 1.0},
               {"run_id": alive, "op": "metrics", "payload": {"rows": [["loss", 0.5, 2000, 1]]}, "at": 2.0}]
    spool.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"run_id": "cut sh\n')

    logger = tracking.RunLogger(uri, alive, spool)
    logger.log_metrics({"loss": 0.25}, step=2)

    assert [(m.step, m.value) for m in client.get_metric_history(alive, "loss")] == [(1, 0.5), (2, 0.25)]
    assert logger.pending() == 0
    kept = [json.loads(line) for line in (tmp_path / (tracking.SPOOL_NAME + ".rejected.jsonl")).read_text().splitlines()]
    assert [k.get("run_id") for k in kept] == [deleted, None] and all(k["error"] for k in kept)
    assert client.get_run(alive).data.tags["tracking.spooled_calls"] == "1"


@pytest.mark.timeout(1500)
@pytest.mark.slow  # a real training run through a minute-long outage: about 4 minutes on 2 cores
def test_training_through_a_server_outage_keeps_every_step(restartable_mlflow_server, tmp_path):
    """The real entry point trains (Ray Train workers log each step) while the server is stopped for a minute and
    started again. Every step's metrics reach the train stage's run exactly once, whether the server is back
    before the run ends (the run sends the kept calls) or only after (the same command sends them)."""
    import json
    import os

    from mlflow import MlflowClient

    server = restartable_mlflow_server
    run_dir = tmp_path / "run"
    steps = 120  # about 1.5 s each with a logging call per step: the outage falls mid-run on 2 cores
    cmd = [sys.executable, "run_pipeline.py", "--config", "configs/smoke.yaml", "--stages", "data,train",
           "--run-dir", str(run_dir), f"train.max_steps={steps}", f"tracking.tracking_uri={server.url}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    log_path = tmp_path / "train.log"
    with open(log_path, "wb") as log:
        driver = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 600
        while f"step 5/{steps}" not in log_path.read_text(errors="replace"):
            assert driver.poll() is None, log_path.read_text()[-3000:]
            assert time.time() < deadline, "training did not reach step 5"
            time.sleep(0.2)
        server.stop()
        time.sleep(60)
        server.start()
        assert driver.wait(timeout=900) == 0, log_path.read_text()[-3000:]
    kept = (run_dir / tracking.SPOOL_NAME).read_text().strip() if (run_dir / tracking.SPOOL_NAME).is_file() else ""
    print(f"after the run: {len(kept.splitlines())} call(s) still kept (0: the run itself sent them)")
    if kept:
        again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
        assert again.returncode == 0 and "train: up to date" in again.stdout, (again.stdout + again.stderr)[-3000:]
    assert not (run_dir / tracking.SPOOL_NAME).read_text().strip()

    client = MlflowClient(tracking_uri=server.url)
    train_run = json.loads((run_dir / "train" / "manifest.json").read_text())["mlflow_run_id"]
    logged = sorted(m.step for m in client.get_metric_history(train_run, "loss"))
    assert logged == list(range(1, steps + 1)), "a step's metrics were lost or sent twice"
    assert "unreachable" in client.get_run(train_run).data.tags["tracking.outage"]
