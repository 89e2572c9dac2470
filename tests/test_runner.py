"""Runner: ordered stages, manifests, skip-if-unchanged, resume after failure, MLflow nesting."""

import json

import pytest

from pipeline import runner, tracking
from pipeline.config import load_config
from pipeline.stage import STAGES, StageSpec, stage_hash
from tests import fake_stages



@pytest.fixture
def fake(monkeypatch, tmp_path, request):
    specs = {
        "data": StageSpec(name="data", entry="tests.fake_stages:first", reads=("train.lr",)),
        "train": StageSpec(name="train", entry="tests.fake_stages:second", reads=("loss",), needs=("data",)),
    }
    monkeypatch.setattr(runner, "STAGES", specs)
    fake_stages.CALLS.clear()
    # MLflow's SQLite store takes seconds to create: only the tracking tests (integration tier) use it.
    tracked = request.node.get_closest_marker("integration") is not None
    cfg = load_config(None, [f"run.root={tmp_path}", "run.name=t", "run.stages=[data, train]",
                             f"tracking.enabled={str(tracked).lower()}"])
    return cfg, tmp_path / "t"


@pytest.mark.unit
def test_runs_in_order_writes_manifests_and_skips_on_rerun(fake):
    cfg, run_dir = fake
    lines = []
    manifests = runner.run_pipeline(cfg, log=lines.append)
    assert fake_stages.CALLS == ["first", "second"]
    assert (run_dir / "train" / "b.txt").read_text() == f"{cfg.train.lr}+b"
    saved = json.loads((run_dir / "data" / "manifest.json").read_text())
    assert saved["outputs"] == {"a": str(run_dir / "data" / "a.txt")}
    assert (run_dir / "config.yaml").is_file()
    runner.run_pipeline(cfg, log=lines.append)
    assert fake_stages.CALLS == ["first", "second"], "unchanged stages must be skipped"
    assert sum("up to date" in line for line in lines) == 2
    assert manifests["train"].hash == runner.read_manifest(run_dir, "train").hash


@pytest.mark.unit
def test_changed_key_reruns_stage_and_downstream(fake):
    cfg, _ = fake
    runner.run_pipeline(cfg, log=lambda _: None)
    from pipeline.config import from_flat

    runner.run_pipeline(from_flat({"train.lr": 0.5}, base=cfg), log=lambda _: None)
    assert fake_stages.CALLS == ["first", "second", "first", "second"]


@pytest.mark.unit
def test_failure_is_clear_and_rerun_resumes_at_failed_stage(fake, monkeypatch):
    cfg, run_dir = fake
    monkeypatch.setenv("FAKE_STAGE_FAIL", "1")
    with pytest.raises(runner.PipelineError, match="stage 'train' failed: ValueError: injected failure"):
        runner.run_pipeline(cfg, log=lambda _: None)
    assert (run_dir / "train" / "error.log").is_file() and runner.read_manifest(run_dir, "train") is None
    monkeypatch.delenv("FAKE_STAGE_FAIL")
    runner.run_pipeline(cfg, log=lambda _: None)
    assert fake_stages.CALLS == ["first", "second", "second"], "the finished stage is not redone"


@pytest.mark.unit
def test_missing_upstream_and_unknown_stage(fake):
    cfg, _ = fake
    with pytest.raises(runner.PipelineError, match="needs stage 'data'"):
        runner.run_pipeline(cfg, stages=("train",), log=lambda _: None)
    with pytest.raises(runner.PipelineError, match="unknown stage"):
        runner.run_pipeline(cfg, stages=("nope",), log=lambda _: None)


@pytest.mark.integration
def test_mlflow_parent_and_nested_stage_runs(fake):
    cfg, run_dir = fake
    runner.run_pipeline(cfg, log=lambda _: None)
    runner.run_pipeline(cfg, log=lambda _: None)  # rerun reuses the parent run
    from mlflow import MlflowClient

    client = MlflowClient(tracking.resolve_tracking_uri(cfg))
    parent_id = json.loads((run_dir / "run.json").read_text())["mlflow_run_id"]
    exp = client.get_experiment_by_name(cfg.tracking.experiment_name)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 3  # one parent, one per stage
    children = [r for r in runs if r.data.tags.get(tracking.PARENT_TAG) == parent_id]
    assert sorted(r.data.tags["pipeline.stage"] for r in children) == ["data", "train"]
    parent = client.get_run(parent_id)
    assert parent.data.params["train.lr"] == str(cfg.train.lr)
    assert parent.info.status == "FINISHED"
    assert [r for r in children if r.data.tags["pipeline.stage"] == "data"][0].data.metrics["rows"] == 3
    # a stage's summary metrics sit at the step they were measured (curves would otherwise start at the end value)
    train_run = [r for r in children if r.data.tags["pipeline.stage"] == "train"][0]
    assert [m.step for m in client.get_metric_history(train_run.info.run_id, "val_accuracy")] == [12]


@pytest.mark.integration
def test_pipeline_nests_under_an_already_active_run(fake):
    import mlflow

    cfg, run_dir = fake
    mlflow.set_tracking_uri(tracking.resolve_tracking_uri(cfg))
    with mlflow.start_run() as outer:
        runner.run_pipeline(cfg, log=lambda _: None)
        assert mlflow.active_run().info.run_id == outer.info.run_id, "the caller's run stays active"
    parent_id = json.loads((run_dir / "run.json").read_text())["mlflow_run_id"]
    parent = mlflow.MlflowClient().get_run(parent_id)
    assert parent.data.tags[tracking.PARENT_TAG] == outer.info.run_id


@pytest.mark.unit
def test_secrets_never_reach_params(tmp_path):
    cfg = load_config(None, ["tracking.tracking_uri=https://alice:s3cret@mlflow.example/",
                             "data.sources=[{path: 's3://key:hidden@bucket/x.jsonl'}]"])
    params = tracking.params_of(cfg)
    text = json.dumps(params)
    assert "s3cret" not in text and "hidden" not in text
    assert params["tracking.tracking_uri"] == "https://***@mlflow.example/"
    assert tracking.redact({"hf_token": "abc", "x": 1}) == {"hf_token": "***", "x": 1}


@pytest.mark.unit
def test_only_rank_zero_logs():
    assert tracking.for_rank(0, "sqlite:///x.db", "r").active
    assert not tracking.for_rank(1, "sqlite:///x.db", "r").active


@pytest.mark.unit
def test_preflight_reports_every_problem_at_once(fake, tmp_path):
    cfg, _ = fake
    from pipeline.config import from_flat

    bad = from_flat({"data.sources": [{"path": str(tmp_path / "missing.jsonl")}],
                     "model.name_or_path": str(tmp_path / "no-model"), "ray.num_cpus": 2, "train.num_workers": 2,
                     "train.cpus_per_worker": 1.0}, base=cfg)
    with pytest.raises(runner.PipelineError) as err:
        runner.run_pipeline(bad, stages=("data", "train"), log=lambda _: None)
    assert "missing.jsonl does not exist" in str(err.value) and "no-model does not exist" in str(err.value)
    assert "train.num_workers × train.cpus_per_worker = 2 CPUs, but the local Ray cluster has 2" in str(err.value)
    with pytest.raises(runner.PipelineError, match="run.root: s3://bucket/runs is a URI"):
        runner.run_pipeline(from_flat({"run.root": "s3://bucket/runs"}, base=cfg), log=lambda _: None)
    assert fake_stages.CALLS == [], "nothing runs before preflight passes"


@pytest.mark.unit
def test_tune_hash_follows_the_benchmarks_only_in_compare_mode():
    spec = STAGES["tune"]

    def digest(*overrides):
        return stage_hash(load_config(None, list(overrides)), spec, {})

    bench = "rewardbench.max_length=512"
    assert digest() == digest(bench)  # a search never scores benchmarks: rescoring config keeps it
    assert digest("tune.mode=compare") != digest("tune.mode=compare", bench)
    assert digest() != digest("run.seed=1")  # the searcher's seed


@pytest.mark.unit
def test_the_summary_says_in_one_sentence_what_the_run_shows():
    """The closing sentence (terminal summary and report): accuracy, Best-of-N against random up to which n and
    over-optimisation past the peak, and whether the search beat the configured values it started from."""
    from pipeline.artifacts import Manifest
    from pipeline.outcome import outcome

    bon = {"bon/gold_at_1": 0.498, "bon/beats_random": 1.0, "bon/beats_random_up_to": 8, "bon/peak_n": 4,
           "bon/gold_at_peak": 0.65, "bon/overoptimised": 1.0, "bon/gold_at_nmax": 0.55}
    manifests = {"tune": Manifest(stage="tune", hash="h", outputs={}, metrics={"tune/best_val_accuracy": 0.74,
                                                            "tune/start_val_accuracy": 0.70}),
                 "train": Manifest(stage="train", hash="h", outputs={}, metrics={"val_accuracy": 0.83}),
                 "best_of_n": Manifest(stage="best_of_n", hash="h", outputs={}, metrics=bon)}
    assert outcome(manifests) == (
        "the reward model ranks 83.0% of validation pairs right (val_accuracy 0.830); Best-of-N selection by it beats "
        "random selection up to n=8 (gold 0.650 at n=4 vs 0.498 at n=1), then gold falls to 0.550 "
        "(over-optimisation); the search beat its start (val_accuracy 0.740 vs 0.700 for the configured values).")
    manifests["tune"].metrics["tune/best_val_accuracy"] = 0.70
    manifests["best_of_n"].metrics.update({"bon/beats_random": 0.0})
    shows = outcome(manifests)
    assert "does not beat random selection (gold 0.498 at n=1)" in shows and "did not beat its start" in shows
    assert outcome({"data": Manifest(stage="data", hash="h", outputs={})}) == ""
