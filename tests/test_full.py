"""The real entry point on the smoke config, end to end: exact output files, registry, then a rerun that does
nothing (litgpt's test_full, for a pipeline)."""

import json
from pathlib import Path

import pytest

import run_pipeline

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200)]
REPO = Path(__file__).resolve().parents[1]


def test_smoke_pipeline_end_to_end_then_rerun_is_a_no_op(ray_session, tmp_path, capsys):
    args = ["--config", str(REPO / "configs" / "smoke.yaml"), f"run.root={tmp_path}", "train.max_steps=4"]
    assert run_pipeline.main(args) == 0
    run = tmp_path / "smoke"
    for stage, names in {"data": {"train", "validation", "quarantine", "stats"},
                         "train": {"model", "checkpoint", "metrics"},
                         "rewardbench": {"scores", "metrics", "synthetic/scores", "synthetic/metrics"},
                         "best_of_n": {"candidates", "results", "plot"},
                         "register": {"model_uri", "report", "report_html"}}.items():
        manifest = json.loads((run / stage / "manifest.json").read_text())
        assert names <= set(manifest["outputs"]), stage
    for rel in ("train/model/model.safetensors", "train/model/config.json", "train/model/tokenizer_config.json",
                "rewardbench/synthetic/scores.parquet", "rewardbench/synthetic/metrics.json",
                "best_of_n/candidates.parquet", "best_of_n/results.csv", "best_of_n/plot.png",
                "register/report.md", "register/report.html", "register/registry.json", "config.yaml", "run.json"):
        assert (run / rel).is_file(), rel
    registry = json.loads((run / "register" / "registry.json").read_text())
    assert registry["registered"] and "candidate" in registry["aliases"] and "champion" in registry["aliases"]
    out = capsys.readouterr().out
    assert "summary:" in out and "mlflow ui --backend-store-uri" in out

    assert run_pipeline.main(args) == 0
    rerun = capsys.readouterr().out
    assert rerun.count("up to date, skipped") == 5, rerun
