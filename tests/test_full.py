"""The real entry point on the smoke config, end to end against a loopback MLflow server: exact output files,
nested runs, the registry's aliases, the report, then a rerun that does nothing (litgpt's test_full, for a
pipeline)."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import run_pipeline
from pipeline import tracking

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

    # the search (2 trials, one at a time on 2 cores, no deadlock): the best trial by validation accuracy, its
    # values trained
    trials = pd.read_csv(run / "tune" / "trials.csv")
    assert len(trials) == 2 and set(trials["status"]) <= {"COMPLETED", "STOPPED"}, trials.to_string()
    assert np.isfinite(trials["val_accuracy"]).all()
    best_row = trials[trials["best"]]
    assert len(best_row) == 1 and best_row["status"].iloc[0] == "COMPLETED"
    assert best_row["val_accuracy"].iloc[0] == trials.loc[trials["status"] == "COMPLETED", "val_accuracy"].max()
    best = json.loads((run / "tune" / "best_config.json").read_text())
    assert set(best) == {"loss.beta", "loss.eps", "train.lr"}  # the default search space, nothing else
    # the first trial is the configured values (smoke's lr, the default β and ε): the start the search must beat
    start = trials[(trials["train.lr"] == 3e-4) & (trials["loss.beta"] == 0.9) & (trials["loss.eps"] == 1e-3)]
    assert manifests["tune"]["metrics"]["tune/start_val_accuracy"] == pytest.approx(start["val_accuracy"].iloc[0])
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
    assert "this run shows: the reward model ranks" in out and "Best-of-N selection by it" in out

    assert run_pipeline.main(args) == 0
    rerun = capsys.readouterr().out
    assert rerun.count("up to date, skipped") == len(STAGES), rerun

    # the registry as users browse it: the model-training view, a described version
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.tags.get("mlflow.experimentKind") == "custom_model_development"
    description = client.get_model_version(name, registry["version"]).description
    assert "backbone: `tiny:llama`" in description and "validation accuracy" in description
    check_the_endpoint(mlflow_server, tmp_path, name)


def _post(url, body=None, raw=None, token=None):
    import urllib.error
    import urllib.request

    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    request = urllib.request.Request(url, data=raw if raw is not None else json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def check_the_endpoint(tracking_uri, tmp_path, name):
    """The champion behind Ray Serve on loopback: both routes, parity with plain transformers and the pyfunc, bad
    input answered with a 4xx while the replica keeps serving, a bearer token, then shut down."""
    import mlflow
    import torch

    from pipeline import modeling, serving
    from pipeline.config import load_config
    from tests.helpers import serve_port

    port = serve_port()
    cfg = load_config(REPO / "configs" / "smoke.yaml", [f"tracking.tracking_uri={tracking_uri}", f"serve.port={port}",
                                                        "serve.token_env=NORMBT_TEST_SERVE_TOKEN"])
    import os

    os.environ["NORMBT_TEST_SERVE_TOKEN"] = "s3cret"
    url = serving.start(cfg)  # the registry's champion
    try:
        folder, _ = serving.resolve_model(cfg)
        model, tok = modeling.load_exported(folder)
        pairs = pd.DataFrame({"prompt": ["What is 6 times 7?", "Name a colour."], "response": ["42.", "Blue."]})
        texts = [tok.decode(modeling.encode_messages(tok, [{"role": "user", "content": p},
                                                           {"role": "assistant", "content": r}]),
                            skip_special_tokens=True) for p, r in zip(pairs["prompt"], pairs["response"], strict=True)]
        status, got = _post(f"{url}/get_reward", {"query": texts}, token="s3cret")
        assert status == 200 and got["truncated"] == [False, False]
        with torch.no_grad():
            plain = [model(**tok(t, return_tensors="pt", return_token_type_ids=False)).logits[0, 0].item()
                     for t in texts]
        assert got["rewards"] == pytest.approx(plain, abs=1e-5), "endpoint vs plain transformers"

        status, scored = _post(f"{url}/score", {"prompt": list(pairs["prompt"]), "response": list(pairs["response"])},
                               token="s3cret")
        with tracking.mlflow_globals(tracking_uri):  # leaves MLflow's globals as the next test expects them
            pyfunc = mlflow.pyfunc.load_model(f"models:/{name}@champion").predict(pairs)["reward"].tolist()
        assert status == 200 and scored["rewards"] == pytest.approx(pyfunc, abs=1e-5), "endpoint vs the pyfunc"
        assert len(scored["normalized_rewards"]) == 2

        bad = [(None, b"{nope", 400), ({"qury": ["x"]}, None, 422), ({"query": "x", "extra": 1}, None, 200),
               ({"query": [3]}, None, 422), ({"query": [""]}, None, 422), ({"query": ["x"] * 5000}, None, 413), (None, b"[" * 100_000, 400)]
        for body, raw, expected in bad:
            status, reply = _post(f"{url}/get_reward", body, raw=raw, token="s3cret")
            assert status == expected, (body, raw, reply)
        assert _post(f"{url}/get_reward", {"query": texts})[0] == 401, "no token, no reward"
        assert _post(f"{url}/get_reward", {"query": texts}, token="s3cret")[1]["rewards"] == got["rewards"]
        import urllib.error
        import urllib.request

        with pytest.raises(urllib.error.HTTPError, match="401"):  # it names the model's source and run
            urllib.request.urlopen(f"{url}/metadata")
        request = urllib.request.Request(f"{url}/metadata", headers={"Authorization": "Bearer s3cret"})
        with urllib.request.urlopen(request) as reply:
            metadata = json.loads(reply.read())
        assert metadata["registered_model"] == name and metadata["alias"] == "champion"
    finally:
        serving.stop()
        del os.environ["NORMBT_TEST_SERVE_TOKEN"]
