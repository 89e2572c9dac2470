"""Register stage + run report, without Ray: fake upstream manifests around a tiny real reward model.

The stage runs through the real runner (``run_pipeline(..., stages=("register",))``) against a SQLite
MLflow store in tmp_path; upstream stages are stand-ins written with ``write_manifest``. The helpers
here are shared with ``test_mlflow_server.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch

from pipeline import modeling, pyfunc_model, runner, tracking
from pipeline.artifacts import Manifest, write_manifest
from pipeline.config import load_config
from stages import register
from tests.test_modeling import CLOCK_ONLY, LLAMA32_DATE

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[1]
MODEL_NAME = "normbt-test-rm"
SECTIONS = ("## Summary", "## Model registry", "## Configuration", "## Data", "## Training",
            "## Distance diagnostics", "## RewardBench", "## Best-of-N", "## Tune and loss comparison")
PAIRS = pd.DataFrame({"prompt": ["What is 6 times 7?", "Say hi.", "List three primes."],
                      "response": ["6 times 7 is 42.", "Hi!", "Two, three and five are the first three primes."]})


# ------------------------------------------------------------------ shared helpers


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    tok = modeling.load_tokenizer("tiny:llama")
    folder = tmp_path_factory.mktemp("register") / "tiny-llama"
    return modeling.save_reward_model(modeling.build_reward_model("tiny:llama", tok, seed=3), tok, folder)


@pytest.fixture
def isolated_mlflow(tmp_path, monkeypatch):
    """No MLflow state leaks in or out: cwd in tmp (default artifact roots), no tracking env vars."""
    monkeypatch.chdir(tmp_path)
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(key, raising=False)
    yield tmp_path


def make_config(root: Path, name: str, tracking_uri: str | None, *overrides: str):
    extra = [f"tracking.tracking_uri={tracking_uri}"] if tracking_uri else ["tracking.enabled=false"]
    return load_config(REPO / "configs" / "smoke.yaml",
                       [f"run.root={root}", f"run.name={name}", f"tracking.registered_model_name={MODEL_NAME}",
                        "run.stages=[data,train,rewardbench,best_of_n,register]", *extra, *overrides])


def _png(path: Path, title: str) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3, 2))
    FigureCanvasAgg(fig)
    fig.add_subplot().plot([1, 2, 4], [0.2, 0.5, 0.6])
    fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return str(path)


def fake_upstream(cfg, run_dir: Path, model_dir: Path, *, score: float | None, val_accuracy: float = 0.75,
                  stages: tuple[str, ...] = ("data", "train", "rewardbench", "best_of_n")) -> dict[str, Manifest]:
    """Write stand-in manifests (and their files) for the upstream stages; the train run gets metric history."""
    from pipeline.metrics import plot_accuracy_by_distance

    run_dir.mkdir(parents=True, exist_ok=True)
    manifests: dict[str, Manifest] = {}
    parent = tracking.start_pipeline_run(cfg, run_dir)

    def put(stage: str, outputs: dict[str, str], run_id: str | None = None, **metrics) -> None:
        manifests[stage] = Manifest(stage=stage, hash=f"fake-{stage}", outputs=outputs, mlflow_run_id=run_id,
                                    started_at=1.0, finished_at=3.5, metrics=metrics)
        write_manifest(run_dir, manifests[stage])

    if "data" in stages:
        stats = {"rows": {"train": 60, "validation": 30, "by_source": {"synthetic": 90}},
                 "quarantine": {"total": 3, "by_reason": {"empty_response": 2, "identical_pair": 1},
                                "by_source": {}}, "truncated": 1, "tokens": {"mean": 41.5, "max": 90}}
        (run_dir / "data").mkdir(exist_ok=True)
        (run_dir / "data" / "stats.json").write_text(json.dumps(stats))
        put("data", {"stats": str(run_dir / "data" / "stats.json")})
    if "train" in stages:
        train_run = parent.child("train")
        for step in range(1, 9):
            train_run.log_metrics({"loss": 0.7 - 0.03 * step, "accuracy": 0.5 + 0.04 * step, "mu": 1.0 + 0.1 * step,
                                   "distance_mean": 1.0 + 0.1 * step, "distance_min": 0.2, "distance_max": 2.0,
                                   "weight_mean": 1.0, "weight_min": 0.4, "weight_max": 3.0 - 0.1 * step}, step=step)
        final = {"val_accuracy": val_accuracy, "val_loss": 0.55, "step": 8, "val_accuracy_dq1": 0.6,
                 "val_accuracy_dq2": 0.7, "val_accuracy_dq3": 0.8, "val_accuracy_dq4": 0.9}
        train_run.log_metrics(final, step=8)
        train_run.finish()
        (run_dir / "train").mkdir(exist_ok=True)
        (run_dir / "train" / "metrics.json").write_text(json.dumps({"final": final, "config": {}}))
        put("train", {"model": str(model_dir), "metrics": str(run_dir / "train" / "metrics.json")},
            run_id=train_run.run_id, val_accuracy=val_accuracy)
    if "rewardbench" in stages:
        folder = run_dir / "rewardbench" / "synth"
        folder.mkdir(parents=True, exist_ok=True)
        bins = pd.DataFrame({"group": ["all"] * 2 + ["Fine"] * 2, "bin": [0, 1, 0, 1],
                             "distance_low": [0.1, 0.5, 0.1, 0.4], "distance_high": [0.5, 2.0, 0.4, 1.0],
                             "n": [10, 10, 5, 5], "accuracy": [0.6, 0.9, 0.5, 0.8]})
        bins.to_csv(folder / "accuracy_by_distance.csv", index=False)
        metrics = {"format": "v1", "model": str(model_dir), "subsets": {"fine-mult": 0.55, "coarse-topic": 0.95},
                   "sections": {"Fine": 0.55, "Coarse": 0.95}, "overall": score,
                   "counts": {"fine-mult": 10, "coarse-topic": 10}, "distance_bins": bins.to_dict("records"),
                   "missing": []}
        (folder / "metrics.json").write_text(json.dumps(metrics))
        outputs = {"synth/metrics": str(folder / "metrics.json"),
                   "synth/distance_bins": str(folder / "accuracy_by_distance.csv"),
                   "synth/distance_plot": str(plot_accuracy_by_distance(bins, folder / "accuracy_by_distance.png"))}
        put("rewardbench", {**outputs, "metrics": outputs["synth/metrics"]})
    if "best_of_n" in stages:
        folder = run_dir / "best_of_n"
        folder.mkdir(parents=True, exist_ok=True)
        pd.DataFrame({"n": [1, 2, 4], "kl": [0.0, 0.19, 0.64], "gold_mean": [0.5, 0.6, 0.7],
                      "gold_ci_low": [0.4, 0.5, 0.6], "gold_ci_high": [0.6, 0.7, 0.8], "proxy_mean": [0.0, 0.3, 0.5],
                      "oracle_gold_mean": [0.5, 0.75, 0.9]}).to_csv(folder / "results.csv", index=False)
        put("best_of_n", {"results": str(folder / "results.csv"), "plot": _png(folder / "plot.png", "bon")})
    if "tune" in stages:
        folder = run_dir / "tune"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "best_config.json").write_text(json.dumps({"loss.name": "normbt"}))
        pd.DataFrame({"trial_id": ["a", "b"], "loss": ["bt", "normbt"], "seed": [0, 0], "val_accuracy": [0.6, 0.7],
                      "status": ["COMPLETED"] * 2, "checkpoint": ["/x", "/y"], "error": ["", ""]}
                     ).to_csv(folder / "trials.csv", index=False)
        pd.DataFrame({"loss": ["bt", "normbt", "diff"], "metric": ["val_accuracy"] * 3, "mean": [0.6, 0.7, 0.1],
                      "ci_low": [0.5, 0.6, 0.0], "ci_high": [0.7, 0.8, 0.2], "n": [5, 5, 5]}
                     ).to_csv(folder / "compare.csv", index=False)
        put("tune", {"best_config": str(folder / "best_config.json"), "trials": str(folder / "trials.csv"),
                     "compare_table": str(folder / "compare.csv"), "compare_plot": _png(folder / "compare.png", "cmp")})
    parent.finish()
    return manifests


def run_register(cfg, run_dir: Path) -> Manifest:
    return runner.run_pipeline(cfg, run_dir=run_dir, stages=("register",), log=print)["register"]


def registered(manifest: Manifest) -> dict:
    return json.loads(Path(manifest.output("model_uri")).read_text())


def reference_rewards(model_dir: Path, pairs: pd.DataFrame) -> list[float]:
    """The plain transformers reward of each ``[user, assistant]`` conversation, scored alone."""
    model, tok = modeling.load_exported(model_dir)
    out = []
    for prompt, response in zip(pairs["prompt"], pairs["response"], strict=True):
        ids = modeling.encode_messages(tok, [{"role": "user", "content": prompt},
                                             {"role": "assistant", "content": response}])
        input_ids, mask = modeling.pad_batch([ids], tok.pad_token_id)
        with torch.inference_mode():
            rewards, _ = modeling.forward_rewards(model, input_ids, mask)
        out.append(float(rewards[0]))
    return out


def check_report(manifest: Manifest, *, curves: bool = True, tune: bool = False) -> None:
    md = Path(manifest.output("report")).read_text()
    page = Path(manifest.output("report_html")).read_text()
    for heading in SECTIONS:
        assert heading in md, heading
        assert f"<h2>{heading[3:]}</h2>" in page, heading
    assert "data:image/png;base64," in page
    assert "empty_response" in md and "| train | 60 |" in md  # data stats
    assert "coarse-topic" in md and "| Fine | 0.5500 |" in md  # rewardbench tables
    assert "| 4 | 0.6400 | 0.7000 |" in md  # best-of-n table
    if tune:
        assert "| diff | val_accuracy | 0.1000 |" in md and "| loss.name | normbt |" in md
        assert "| a | bt | 0 | 0.6000 | COMPLETED |" in md  # trials without the checkpoint / empty columns
        assert "![loss comparison](report_files/compare.png)" in md
    else:
        assert "tune stage: not run" in md
    assert "<details><summary>Resolved configuration" in md
    files = Path(manifest.output("report")).parent / "report_files"
    for link in [line.split("](", 1)[1].rstrip(")") for line in md.splitlines() if line.startswith("![")]:
        assert (files.parent / link).is_file(), link
    assert ((files / "training_curves.png").is_file() and (files / "weights.png").is_file()) == curves


# ------------------------------------------------------------------ tests


def test_champion_promotion_pyfunc_and_report(isolated_mlflow, model_dir):
    from mlflow import MlflowClient

    tmp = isolated_mlflow
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    env_before = os.environ.get("MLFLOW_TRACKING_URI")
    import mlflow

    uri_before = mlflow.get_tracking_uri()

    # 1) first registration: version 1, candidate + champion
    cfg = make_config(tmp / "runs", "first", uri)
    fake_upstream(cfg, tmp / "runs" / "first", model_dir, score=0.60)
    first = run_register(cfg, tmp / "runs" / "first")
    rec = registered(first)
    assert (rec["version"], rec["aliases"], rec["decision"]) == (1, ["candidate", "champion"], "promoted")
    assert rec["uri"] == f"models:/{MODEL_NAME}/1" and rec["registered_model"] == MODEL_NAME
    assert first.metrics == {"register/version": 1, "register/score": 0.60}
    client = MlflowClient(tracking_uri=uri)
    tags = client.get_model_version(MODEL_NAME, "1").tags
    assert tags["score_metric"] == "rewardbench/synth/overall" and float(tags["score"]) == 0.60
    assert tags["previous_champion_version"] == "none" and tags["decision"] == "promoted"
    stage_run = client.get_run(first.mlflow_run_id)
    assert stage_run.info.status == "FINISHED"
    assert stage_run.data.metrics["register/version"] == 1
    parent_id = stage_run.data.tags[tracking.PARENT_TAG]
    for run_id in (first.mlflow_run_id, parent_id):
        names = {a.path for a in client.list_artifacts(run_id, "report")}
        assert {"report/report.md", "report/report.html", "report/registry.json"} <= names
    # MLflow's global state is as we found it
    assert mlflow.get_tracking_uri() == uri_before and os.environ.get("MLFLOW_TRACKING_URI") == env_before
    assert mlflow.active_run() is None and mlflow.models.model.__dict__["__mlflow_model__"] is None
    check_report(first)

    # 2) a lower score: candidate only, champion stays 1
    cfg = make_config(tmp / "runs", "second", uri)
    fake_upstream(cfg, tmp / "runs" / "second", model_dir, score=0.55)
    rec = registered(run_register(cfg, tmp / "runs" / "second"))
    assert (rec["version"], rec["aliases"], rec["decision"]) == (2, ["candidate"], "kept previous champion")
    assert str(client.get_model_version_by_alias(MODEL_NAME, "champion").version) == "1"
    tags = client.get_model_version(MODEL_NAME, "2").tags
    assert (tags["previous_champion_version"], float(tags["previous_champion_score"])) == ("1", 0.60)
    assert tags["decision"] == "kept previous champion" and "<=" in tags["decision_reason"]

    # 3) a higher score: becomes champion (and candidate)
    cfg = make_config(tmp / "runs", "third", uri)
    fake_upstream(cfg, tmp / "runs" / "third", model_dir, score=0.70)
    rec = registered(run_register(cfg, tmp / "runs" / "third"))
    assert (rec["version"], rec["aliases"], rec["decision"]) == (3, ["candidate", "champion"], "promoted")
    assert client.get_model_version(MODEL_NAME, "3").tags["previous_champion_version"] == "1"
    assert client.get_model_version(MODEL_NAME, "1").aliases == []

    # the champion loads as a pyfunc and scores like plain transformers
    with tracking.mlflow_globals(uri):
        model = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@champion")
        local = mlflow.artifacts.download_artifacts(f"models:/{MODEL_NAME}@champion", dst_path=str(tmp / "dl"))
    out = model.predict(PAIRS)
    assert list(out.columns) == ["reward"] and len(out) == len(PAIRS)
    assert out["reward"].tolist() == pytest.approx(reference_rewards(model_dir, PAIRS), abs=1e-5)
    sig = model.metadata.signature
    assert sig.inputs.input_names() == ["prompt", "response"] and sig.outputs.input_names() == ["reward"]
    requirements = (Path(local) / "requirements.txt").read_text()
    assert f"torch=={torch.__version__.split('+')[0]}" in requirements and "torchvision" not in requirements

    # ... and loads where this project is not importable (models from code, no pickle)
    script = textwrap.dedent(f"""
        import importlib.abc, json, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] in ('pipeline', 'stages', 'tests'):
                    raise ImportError('blocked: ' + name)
        sys.meta_path.insert(0, Block())
        import mlflow, pandas as pd
        model = mlflow.pyfunc.load_model({local!r})
        frame = pd.DataFrame({PAIRS.to_dict("list")!r})
        print(json.dumps(model.predict(frame)["reward"].tolist()))
        assert not [m for m in sys.modules if m.split('.')[0] in ('pipeline', 'stages')]
    """)
    done = subprocess.run([sys.executable, "-c", script], check=False, cwd=tmp, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": ""})
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == pytest.approx(out["reward"].tolist(), abs=1e-6)


def test_fallback_metric_is_not_compared_with_rewardbench_champion(isolated_mlflow, model_dir):
    tmp = isolated_mlflow
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    cfg = make_config(tmp / "runs", "rb", uri)
    fake_upstream(cfg, tmp / "runs" / "rb", model_dir, score=0.40)
    assert registered(run_register(cfg, tmp / "runs" / "rb"))["aliases"] == ["candidate", "champion"]
    # no rewardbench stage: scored by train/val_accuracy (0.99 > 0.40, but a different metric)
    cfg = make_config(tmp / "runs", "val", uri)
    fake_upstream(cfg, tmp / "runs" / "val", model_dir, score=None, val_accuracy=0.99,
                  stages=("train",))
    manifest = run_register(cfg, tmp / "runs" / "val")
    rec = registered(manifest)
    assert (rec["score_metric"], rec["score"]) == ("train/val_accuracy", 0.99)
    assert (rec["aliases"], rec["decision"]) == (["candidate"], "kept previous champion")
    assert "not comparable" in rec["decision_reason"]
    md = Path(manifest.output("report")).read_text()
    assert "data stage: not run" in md and "rewardbench stage: not run" in md and "best_of_n stage: not run" in md


def test_tracking_disabled_writes_report_only(isolated_mlflow, model_dir):
    tmp = isolated_mlflow
    cfg = make_config(tmp / "runs", "offline", None)
    fake_upstream(cfg, tmp / "runs" / "offline", model_dir, score=0.5,
                  stages=("data", "tune", "train", "rewardbench", "best_of_n"))
    manifest = run_register(cfg, tmp / "runs" / "offline")
    rec = registered(manifest)
    assert rec["registered"] is False and "tracking.enabled is false" in rec["reason"]
    assert rec["uri"] is None and rec["score"] == 0.5
    assert manifest.metrics == {"register/score": 0.5}
    check_report(manifest, curves=False, tune=True)
    assert "Curves skipped: tracking is disabled" in Path(manifest.output("report")).read_text()
    assert not (tmp / "runs" / "mlflow.db").exists() and not (tmp / "mlruns").exists()


def test_decide_rules():
    class Version:
        def __init__(self, version, tags):
            self.version, self.tags = version, tags

    champ = Version("4", {"score_metric": "m", "score": "0.5"})
    assert register.decide("m", 0.6, None)["decision"] == "promoted"
    assert register.decide("m", 0.6, champ)["decision"] == "promoted"
    assert register.decide("m", 0.5, champ)["decision"] == "kept previous champion"  # a tie keeps
    assert register.decide("m", None, champ)["decision"] == "kept previous champion"
    assert register.decide("other", 0.9, champ)["decision"] == "kept previous champion"
    assert register.decide("m", 0.9, Version("4", {}))["decision"] == "kept previous champion"
    tags = register.decide("m", 0.6, champ)
    assert (tags["previous_champion_version"], tags["previous_champion_score"], tags["score"]) == ("4", "0.5", "0.6")


def test_rendering_matches_pipeline_modeling():
    """The logged model's self-contained rendering equals pipeline.modeling's, with and without a chat template."""
    tok = modeling.load_tokenizer("tiny:llama")
    messages = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4."}]
    assert pyfunc_model.render_ids(tok, messages) == modeling.encode_messages(tok, messages)
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}\n{% endfor %}")
    assert pyfunc_model.render_ids(tok, messages) == modeling.encode_messages(tok, messages)
    for template in (LLAMA32_DATE, CLOCK_ONLY):  # the calendar pinned the same way
        tok.chat_template, tok.init_kwargs["template_date"] = template, "2025-01-02"
        assert pyfunc_model.render_ids(tok, messages) == modeling.encode_messages(tok, messages)
    ids = list(range(10))
    for side in ("left", "right"):
        assert pyfunc_model.cut_ids(ids, 4, side) == modeling.truncate_ids(ids, 4, side)
