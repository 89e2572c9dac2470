"""``train.continue_search``: the final run continues the search's best trial when that trial trained the first
steps of this very run, and trains exactly the weights a run from step 0 trains; otherwise it says why not."""

import json
from pathlib import Path

import pytest
import torch

from pipeline import runner
from pipeline.config import flatten, load_config
from pipeline.continuation import continuation_problem
from pipeline.train_loop import one_process_config

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.yaml"


def _flat(*overrides):
    return flatten(load_config(SMOKE, list(overrides)))


@pytest.mark.unit
def test_a_prefix_trial_of_the_same_run_can_be_continued():
    run = _flat("train.num_workers=1", "train.micro_batch_size=8")
    trial = {**run, "train.stop_after_steps": 3, "train.eval_every": 2, "train.log_every": 1}
    assert continuation_problem(trial, run, run_last_step=8) is None


@pytest.mark.unit
@pytest.mark.parametrize("trial_overrides, run_overrides, words", [
    (["train.max_steps=10"], [], "not prefixes of this run"),  # the default's own 10-step trials
    (["train.stop_after_steps=8"], [], "nothing to add"),
    (["train.stop_after_steps=3", "train.lr=1e-3"], [], "train.lr 0.001 in the trial, 0.0003 here"),
    (["train.stop_after_steps=3", "loss.beta=0.5"], [], "loss.beta 0.5 in the trial, 0.9 here"),
    (["train.stop_after_steps=3", "lora.r=8"], [], "lora.r 8 in the trial, 0 here"),
])
def test_a_trial_that_trained_other_steps_is_not_continued(trial_overrides, run_overrides, words):
    run = _flat(*run_overrides)
    assert words in continuation_problem(_flat(*trial_overrides), run, run_last_step=8)


@pytest.mark.unit
def test_an_in_process_trial_is_not_continued_by_two_workers():
    """A DeepSpeed checkpoint loads at the world size that wrote it: one rank of 8 pairs (an in-process trial of the
    smoke config's 2 × 4) is not 2 workers of 4, but is 1 worker of 8."""
    cfg = load_config(SMOKE, ["train.stop_after_steps=3"])
    trial = flatten(one_process_config(cfg))
    problem = continuation_problem(trial, _flat(), run_last_step=8)
    assert "train.micro_batch_size 8 in the trial, 4 here" in problem and "train.num_workers 1 in the trial, 2" in problem
    assert continuation_problem(trial, _flat("train.num_workers=1", "train.micro_batch_size=8"), 8) is None


@pytest.mark.unit
@pytest.mark.parametrize("launcher, ranks", [("in_process", (1, 8)), ("ray_train", (2, 4))])
def test_the_trial_config_written_by_tune_reads_back_equal_to_the_run_it_was_a_prefix_of(tmp_path, launcher, ranks):
    """``best_trial.json`` holds the config as the trial's loop saw it (an in-process trial is one rank of the
    whole global batch), through JSON (tuples become lists, numpy values plain): the final run with the same
    ranks continues it, the default 2 × 4 only a Ray Train trial."""
    import numpy as np

    from pipeline.artifacts import write_json
    from stages.tune import TrialSetup, trained_config

    base = load_config(SMOKE, ["train.stop_after_steps=3", "lora.r=4", "lora.target_modules=[q_proj, v_proj]"])
    setup = TrialSetup(cfg=base, data=None, storage_path=str(tmp_path), tracker=None, mode="search", digest="d",
                       launcher=launcher)
    trained = trained_config(setup, {"train.lr": np.float64(3e-4), "loss.beta": np.float64(0.9)})
    path = write_json(tmp_path / "best_trial.json", {"config": flatten(trained)})
    trial = json.loads(path.read_text())["config"]
    workers, micro = ranks
    run = _flat("lora.r=4", "lora.target_modules=[q_proj, v_proj]", f"train.num_workers={workers}",
                f"train.micro_batch_size={micro}")
    assert continuation_problem(trial, run, run_last_step=8) is None
    assert (continuation_problem(trial, _flat("lora.r=4", "lora.target_modules=[q_proj, v_proj]"), 8) is None) == (
        launcher == "ray_train")


@pytest.mark.unit
def test_a_checkpoint_on_remote_storage_keeps_its_scheme():
    from stages.tune import checkpoint_uri

    assert checkpoint_uri("bucket/normbt/tune/trial/checkpoint_000001", "s3://bucket/normbt/tune") == \
        "s3://bucket/normbt/tune/trial/checkpoint_000001"
    assert checkpoint_uri("/runs/x/tune/trial/checkpoint_000001", "/runs/x/tune") == "/runs/x/tune/trial/checkpoint_000001"


@pytest.mark.unit
def test_a_search_on_other_data_is_not_continued(tmp_path):
    """The train stage may meet a tune manifest older than its data (``--stages data,train`` after a data
    change): the trial trained other rows in another order, whatever its settings."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.artifacts import Manifest
    from pipeline.stage import StageContext
    from pipeline.tracking import RunLogger
    from stages.train import _search_start

    (tmp_path / "train").mkdir()
    pq.write_table(pa.table({"chosen_len": list(range(64))}), tmp_path / "train" / "part.parquet")
    cfg = load_config(SMOKE, ["train.num_workers=1", "train.micro_batch_size=8", "train.continue_search=true"])
    trial = {"trial_id": "t0", "checkpoint": str(tmp_path / "missing"), "mlflow_run_id": "", "data_hash": "old",
             "horizon": 8, "config": {**flatten(cfg), "train.stop_after_steps": 3}}
    (tmp_path / "best_trial.json").write_text(json.dumps(trial, default=str))
    lines: list[str] = []

    def start(data_hash):
        ctx = StageContext(cfg=cfg, run_dir=tmp_path, out_dir=tmp_path, tracker=RunLogger(None, None),
                           log=lines.append, upstream={
                               "data": Manifest(stage="data", hash=data_hash, outputs={"train": str(tmp_path / "train")}),
                               "tune": Manifest(stage="tune", hash="t", outputs={"best_trial": str(tmp_path / "best_trial.json")})})
        return _search_start(ctx, cfg)

    assert start("new") is None and "the search trained on other data (data stage old" in lines[-1]
    trial["config"]["train.stop_after_steps"] = 0  # the default's own 10-step trials: said as such, not as data
    (tmp_path / "best_trial.json").write_text(json.dumps(trial, default=str))
    assert start("new") is None and "not prefixes of this run" in lines[-1]
    trial["config"]["train.stop_after_steps"] = 3
    (tmp_path / "best_trial.json").write_text(json.dumps(trial, default=str))
    assert start("old") is None and "cannot" not in lines[-1] and str(tmp_path / "missing") in lines[-1], \
        "same data: the settings agree, and the missing checkpoint is what stops it"


def _weights(model_dir):
    from safetensors.torch import load_file

    return load_file(str(Path(model_dir) / "model.safetensors"))


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_the_final_run_continues_the_best_trial_to_the_weights_of_a_run_from_step_0(tmp_path, ray_session):
    """The real entry point: a search whose one trial is the first 3 of 8 steps, then the final run with
    ``train.continue_search``: it says it continues, trains steps 4–8 only, and ends at the weights (and the
    loss curve, its first 3 steps copied from the trial) of the same run trained from step 0."""
    from pipeline.report import metric_history
    from pipeline.tracking import resolve_tracking_uri

    lines: list[str] = []
    cfg = load_config(SMOKE, [f"run.root={tmp_path}", "run.name=cont", "train.num_workers=1",
                              "train.micro_batch_size=8", "train.zero_stage=2", "tune.num_samples=1",
                              "tune.trial_overrides={train.stop_after_steps: 3}", "train.continue_search=true"])
    continued = runner.run_pipeline(cfg, stages=("data", "tune", "train"), log=lines.append)
    said = "\n".join(lines)
    assert "continues the search's best trial" in said and "after its 3 steps, the first 3 of this run's 8" in said
    trial = json.loads(Path(continued["tune"].outputs["best_trial"]).read_text())
    assert trial["config"]["train.stop_after_steps"] == 3 and trial["config"]["train.num_workers"] == 1
    a = _weights(continued["train"].outputs["model"])  # read now: the run from step 0 writes the same folder
    final = json.loads(Path(continued["train"].outputs["metrics"]).read_text())["final"]
    assert final["step"] == 8

    fresh_lines: list[str] = []
    scratch_cfg = load_config(SMOKE, [f"run.root={tmp_path}", "run.name=cont", "train.num_workers=1",
                                      "train.micro_batch_size=8", "train.zero_stage=2", "tune.num_samples=1",
                                      "tune.trial_overrides={train.stop_after_steps: 3}"])
    scratch = runner.run_pipeline(scratch_cfg, stages=("data", "tune", "train"), log=fresh_lines.append)
    assert "continues the search" not in "\n".join(fresh_lines)

    assert continued["train"].mlflow_run_id != scratch["train"].mlflow_run_id
    b = _weights(scratch["train"].outputs["model"])
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=key)
    uri = resolve_tracking_uri(cfg)
    curve = {run: metric_history(uri, run, ["loss"])["loss"]
             for run in (continued["train"].mlflow_run_id, scratch["train"].mlflow_run_id)}
    steps_c, loss_c = curve[continued["train"].mlflow_run_id]
    steps_s, loss_s = curve[scratch["train"].mlflow_run_id]
    assert steps_c == steps_s == list(range(1, 9)), "the continued run's curve starts at step 1 (copied) too"
    torch.testing.assert_close(torch.tensor(loss_c), torch.tensor(loss_s), rtol=1e-4, atol=1e-6)


@pytest.mark.integration
@pytest.mark.slow  # the refusal itself is in the unit tier; this is the stage saying it (about 90 s on 2 cores)
@pytest.mark.timeout(600)
def test_the_default_two_workers_say_why_they_do_not_continue(tmp_path, ray_session):
    """Two workers of 4 cannot load the one-rank trial's checkpoint: the run says so and trains from step 0."""
    lines: list[str] = []
    cfg = load_config(SMOKE, [f"run.root={tmp_path}", "run.name=nocont", "tune.num_samples=1", "tracking.enabled=false",
                              "tune.trial_overrides={train.stop_after_steps: 3}", "train.continue_search=true"])
    result = runner.run_pipeline(cfg, stages=("data", "tune", "train"), log=lines.append)
    said = "\n".join(lines)
    assert "not continuing the search's best trial" in said and "train.num_workers 1 in the trial, 2 here" in said
    assert json.loads(Path(result["train"].outputs["metrics"]).read_text())["final"]["step"] == 8
