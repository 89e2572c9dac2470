"""LoRA as users run it on Ray: the train stage's two Ray Train workers under ZeRO-2 (the merged export scores
like training under plain transformers; a worker killed mid-run is replaced and resumes from the last checkpoint
to the uninterrupted run's weights), and the search stage training LoRA trials with ``lora.r`` searched, in
their Tune actors and as Ray Train runs."""

import json
import os
from pathlib import Path

import pandas as pd
import pytest
import torch

from pipeline import runner
from pipeline.config import load_config
from tests.test_train_stage import SMOKE, _metric_history, _plain_validation_rewards, _ray_train, _weights

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]
LORA = ["lora.r=4", "lora.alpha=8"]


@pytest.fixture(scope="module")
def data_dir(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-data")
    cfg = load_config(SMOKE, [f"run.root={root}", "tracking.enabled=false"])
    return Path(runner.run_pipeline(cfg, stages=("data",), log=lambda _: None)["data"].outputs["train"]).parent


@pytest.fixture(scope="module")
def lora_baseline(data_dir, tmp_path_factory):
    """2 workers, ZeRO-2, LoRA r 4 on tiny Llama, uninterrupted: the reference run."""
    return _ray_train(tmp_path_factory.mktemp("lora-base"), "base", LORA, data_dir)


def test_lora_on_two_ray_workers_exports_a_plain_model_that_scores_like_training(lora_baseline, data_dir):
    cfg, manifest, _ = lora_baseline
    final = json.loads(Path(manifest.outputs["metrics"]).read_text())["final"]
    assert final["step"] == 6 and final["lora/r"] == 4 and 0 < final["params/trainable"] < final["params/total"] / 4
    assert not any("lora" in key for key in _weights(manifest.outputs["model"])), "merged: a plain folder"
    rewards, config = _plain_validation_rewards(manifest.outputs["model"], data_dir)
    assert abs(rewards.mean().item() - config["reward_mean"]) < 1e-5
    assert abs(rewards.std(unbiased=False).item() - config["reward_std"]) < 1e-5
    assert len(_metric_history(cfg, manifest.mlflow_run_id, "loss")) == 6


def test_a_killed_lora_worker_resumes_to_the_uninterrupted_weights(lora_baseline, data_dir, tmp_path):
    """A worker dies hard after step 5; Ray restarts the group from its last registered checkpoint (adapters, the
    trained head, the optimizer state, μ: step 4's, or step 2's if the controller had not registered step 4's yet),
    and the merged export equals the uninterrupted run's."""
    marker = tmp_path / "killed-once"
    os.environ["NORMBT_FAIL_AT_STEP"] = f"5:{marker}"
    try:
        cfg, resumed, _ = _ray_train(tmp_path, "resumed", [*LORA, "train.checkpoint_every=2",
                                                            "train.max_failures=1"], data_dir)
    finally:
        del os.environ["NORMBT_FAIL_AT_STEP"]
    assert marker.read_text() == "5", "the injected failure must have happened"
    # steps 1-5 logged, then 5-6 again from step 4's checkpoint (3-6 from step 2's); from scratch: 5 + 6
    assert len(_metric_history(cfg, resumed.mlflow_run_id, "loss")) in (7, 9), "resumed from a checkpoint"
    _, manifest, _ = lora_baseline
    ref, got = _weights(manifest.outputs["model"]), _weights(resumed.outputs["model"])
    assert ref.keys() == got.keys()
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize("launcher", ["in_process", "ray_train"])
def test_search_trials_train_lora_with_its_rank_searched(launcher, data_dir, tmp_path):
    """``lora.r`` is a searched key like any other: each trial builds its LoRA model at its own rank (the trial's
    trainable-parameter count follows it), whichever launcher runs the trial."""
    from mlflow import MlflowClient

    from pipeline.tracking import PARENT_TAG, resolve_tracking_uri

    # the configured rank (4) is the first trial, the searched one (8) the second, whatever the searcher
    cfg = load_config(SMOKE, [f"run.root={tmp_path}", "run.name=tune", *LORA, "tune.num_samples=2",
                              f"tune.trial_launcher={launcher}", "tune.trial_overrides={train.max_steps: 2}",
                              "tune.search_space={lora.r: {choice: [8]}}"])
    runner.write_manifest(tmp_path / "tune", runner.read_manifest(data_dir.parent, "data"))
    manifest = runner.run_pipeline(cfg, stages=("tune",), log=lambda _: None)["tune"]
    trials = pd.read_csv(manifest.outputs["trials"])
    assert sorted(trials["lora.r"]) == [4, 8]
    assert json.loads(Path(manifest.outputs["best_config"]).read_text())["lora.r"] in (4, 8)
    client = MlflowClient(resolve_tracking_uri(cfg))
    parent = client.get_run(manifest.mlflow_run_id)
    runs = client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.`{PARENT_TAG}` = '{manifest.mlflow_run_id}'")
    assert len(runs) == 2 and {r.data.tags["tune.launcher"] for r in runs} == {launcher}
    trainable = sorted((int(r.data.metrics["lora/r"]), r.data.metrics["params/trainable"]) for r in runs)
    assert [rank for rank, _ in trainable] == [4, 8]
    assert trainable[1][1] > trainable[0][1], "the adapters grow with the rank"
