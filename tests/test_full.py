"""The real entry point on the smoke config, end to end against a loopback MLflow server: exact output files,
nested runs, the registry's aliases, the report, then a rerun that does nothing (litgpt's test_full, for a
pipeline)."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import run_pipeline

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200)]
REPO = Path(__file__).resolve().parents[1]
STAGES = ("data", "tune", "train", "rewardbench", "best_of_n", "register")


def test_smoke_pipeline_end_to_end_against_a_server_then_rerun_is_a_no_op(ray_session, mlflow_server, tmp_path,
                                                                           capsys):
    from mlflow import MlflowClient

    args = ["--config", str(REPO / "configs" / "smoke.yaml"), f"run.root={tmp_path}", "train.max_steps=4",
            f"tracking.tracking_uri={mlflow_server}"]
    assert run_pipeline.main(args) == 0
    run = tmp_path / "smoke"
    manifests = {}
    for stage, names in {"data": {"train", "validation", "quarantine", "stats"},
                         "tune": {"best_config", "trials", "best_checkpoint"},
                         "train": {"model", "checkpoint", "metrics"},
                         "rewardbench": {"scores", "metrics", "synthetic/scores", "synthetic/metrics"},
                         "best_of_n": {"candidates", "results", "plot"},
                         "register": {"model_uri", "report", "report_html"}}.items():
        manifests[stage] = json.loads((run / stage / "manifest.json").read_text())
        assert names <= set(manifests[stage]["outputs"]), stage
    for rel in ("train/model/model.safetensors", "train/model/config.json", "train/model/tokenizer_config.json",
                "tune/trials.csv", "tune/best_config.json",
                "rewardbench/synthetic/scores.parquet", "rewardbench/synthetic/metrics.json",
                "best_of_n/candidates.parquet", "best_of_n/results.csv", "best_of_n/plot.png",
                "register/report.md", "register/report.html", "register/registry.json", "config.yaml", "run.json"):
        assert (run / rel).is_file(), rel

    # the search (3 trials on 2 cores, no deadlock): the best trial by validation accuracy, its values trained
    trials = pd.read_csv(run / "tune" / "trials.csv")
    assert len(trials) == 3 and set(trials["status"]) <= {"COMPLETED", "STOPPED"}, trials.to_string()
    assert np.isfinite(trials["val_accuracy"]).all()
    best_row = trials[trials["best"]]
    assert len(best_row) == 1 and best_row["status"].iloc[0] == "COMPLETED"
    assert best_row["val_accuracy"].iloc[0] == trials.loc[trials["status"] == "COMPLETED", "val_accuracy"].max()
    best = json.loads((run / "tune" / "best_config.json").read_text())
    assert set(best) == {"loss.beta", "loss.eps", "train.lr"}  # the default search space, nothing else
    trained = json.loads((run / "train" / "metrics.json").read_text())["config"]
    for key, value in best.items():
        assert value == pytest.approx(best_row[key].iloc[0], rel=1e-12)
        assert float(trained[key]) == pytest.approx(value), (key, trained[key])

    # everything is in the server: one parent run, a nested run per stage, a nested run per tune trial
    client = MlflowClient(tracking_uri=mlflow_server)
    parent = client.get_run(json.loads((run / "run.json").read_text())["mlflow_run_id"])
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.info.run_name for r in children) == sorted(STAGES)
    tune_run = manifests["tune"]["mlflow_run_id"]
    trial_runs = client.search_runs([parent.info.experiment_id],
                                    filter_string=f"tags.mlflow.parentRunId = '{tune_run}'")
    assert sorted(r.info.run_id for r in trial_runs) == sorted(trials["mlflow_run_id"])
    for trial_run in trial_runs:
        assert trial_run.data.params["train.max_steps"] == "2"  # smoke's tune.trial_overrides
        assert "loss" in trial_run.data.metrics and "val_accuracy" in trial_run.data.metrics  # from the workers
    registry = json.loads((run / "register" / "registry.json").read_text())
    assert registry["registered"] and registry["tracking_uri"] == mlflow_server
    name = registry["registered_model"]
    for alias in ("candidate", "champion"):
        assert str(client.get_model_version_by_alias(name, alias).version) == str(registry["version"])
    assert {a.path for a in client.list_artifacts(manifests["register"]["mlflow_run_id"], "report")} >= {
        "report/report.md", "report/report.html"}
    out = capsys.readouterr().out
    assert "summary:" in out and f"MLflow run: {parent.info.run_id}" in out

    assert run_pipeline.main(args) == 0
    rerun = capsys.readouterr().out
    assert rerun.count("up to date, skipped") == len(STAGES), rerun
