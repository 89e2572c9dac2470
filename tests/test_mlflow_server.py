"""The register stage against a real ``mlflow server`` (REST tracking + registry + proxied artifacts).

The server comes from the ``mlflow_server`` fixture (conftest.py). Upstream stages are the stand-ins of
``test_register_stage.py``; ``test_full.py`` runs the whole smoke pipeline against a server.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline import tracking
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

    with tracking.mlflow_globals(url):
        model = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@champion")
    rewards = model.predict(PAIRS)["reward"].tolist()
    assert rewards == pytest.approx(reference_rewards(model_dir, PAIRS), abs=1e-5)
    assert json.loads(Path(first.output("model_uri")).read_text())["uri"] == f"models:/{MODEL_NAME}/1"
