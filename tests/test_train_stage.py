"""Train stage: invariances, NaN guard, Ray Train + DeepSpeed on 2 CPU workers, export, failure and resume."""

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

from pipeline import runner
from pipeline.config import load_config
from pipeline import train_loop as T

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]
REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.yaml"


@pytest.fixture(scope="module")
def data_dir(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("train-data")
    cfg = load_config(SMOKE, [f"run.root={root}", "tracking.enabled=false"])
    return Path(runner.run_pipeline(cfg, stages=("data",), log=lambda _: None)["data"].outputs["train"]).parent


def _local(data_dir, overrides, history=None, **kw):
    history = [] if history is None else history
    cfg = load_config(SMOKE, ["train.max_steps=3", *overrides])
    T.train_local(cfg, T.read_rows(str(data_dir / "train")), T.read_rows(str(data_dir / "validation")),
                  report=lambda m, checkpoint_dir=None, final=False: history.append(
                      dict(m, final=final, checkpointed=checkpoint_dir is not None)), **kw)
    return history


@pytest.mark.parametrize("loss", ["bt", "normbt"])
def test_accumulation_invariance(data_dir, loss):
    """micro 4 × accum 1, micro 1 × accum 4 and micro 2 × accum 2 see the same pairs per step and, with μ
    updated once per optimizer step from the whole batch, give the same loss curve (ZeRO-0 and ZeRO-1)."""
    curves = []
    for micro, accum, zero in ((4, 1, 0), (1, 4, 1), (2, 2, 0)):
        hist = _local(data_dir, [f"loss.name={loss}", f"train.micro_batch_size={micro}", f"train.grad_accum={accum}",
                                 f"train.zero_stage={zero}"])
        curves.append([(h["loss"], h.get("mu", 0.0)) for h in hist if not h["final"]])
    assert len(curves[0]) == 3
    for other in curves[1:]:
        torch.testing.assert_close(torch.tensor(other), torch.tensor(curves[0]), rtol=1e-4, atol=1e-5)


def test_nan_loss_stops_naming_the_step_and_never_checkpoints(data_dir, monkeypatch):
    monkeypatch.setenv("NORMBT_NAN_AT_STEP", "1")
    reports = []
    with pytest.raises(FloatingPointError, match="optimizer step 1"):
        _local(data_dir, ["train.zero_stage=0", "train.checkpoint_every=1"], history=reports)
    # the step before the poisoned one was checkpointed; the poisoned one reached neither a report nor a checkpoint
    assert [(r["step"], r["checkpointed"]) for r in reports] == [(1, True)]


def test_zero_stage_0_logs_the_gradient_norm_zero_2_logs(data_dir):
    """DeepSpeed's stage 0 clips fp32 gradients without keeping their norm: the loop measures it (the default's one
    worker trains under stage 0), so grad_norm is the same number as under stage 2, not NaN."""
    curves = {zero: [(h["loss"], h["grad_norm"]) for h in _local(data_dir, [f"train.zero_stage={zero}"])
                     if not h["final"]] for zero in (0, 2)}
    assert len(curves[0]) == 3 and all(math.isfinite(g) and g > 0 for _, g in curves[0])
    torch.testing.assert_close(torch.tensor(curves[0]), torch.tensor(curves[2]), rtol=1e-4, atol=1e-6)


def test_nan_loss_skip_policy_skips_one_step(data_dir, monkeypatch):
    monkeypatch.setenv("NORMBT_NAN_AT_STEP", "1")
    hist = _local(data_dir, ["train.zero_stage=0", "train.nan_policy=skip"])
    steps = [h["step"] for h in hist if not h["final"]]
    assert steps == [1, 3], "the poisoned step 2 (0-based 1) is skipped, the others train"
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in hist if not h["final"])


def test_a_prefix_run_trains_exactly_the_first_steps_of_the_longer_run(data_dir):
    """``train.stop_after_steps`` (the search's trials): the run stops early, but its lr schedule and data order are
    the whole run's, so each of its steps equals the longer run's; ``train.max_steps`` alone would fit the schedule
    to the shorter run (the lr decays sooner)."""
    def steps(overrides):
        return [(h["step"], h["lr"], h["loss"]) for h in _local(data_dir, ["train.zero_stage=0", *overrides])
                if not h["final"]]

    whole = steps(["train.max_steps=6"])
    prefix = steps(["train.max_steps=6", "train.stop_after_steps=3"])
    assert [s for s, _, _ in prefix] == [1, 2, 3]
    assert prefix == whole[:3]
    assert steps(["train.max_steps=3"])[2][1] < prefix[2][1], "a 3-step schedule has decayed further by step 3"


def _ray_train(tmp_path, name, overrides, data_dir):
    cfg = load_config(SMOKE, [f"run.root={tmp_path}", f"run.name={name}", "train.max_steps=6", *overrides])
    run_dir = tmp_path / name
    (run_dir / "data").mkdir(parents=True)
    data_manifest = runner.read_manifest(data_dir.parent, "data")
    runner.write_manifest(run_dir, data_manifest)
    return cfg, runner.run_pipeline(cfg, stages=("train",), log=lambda _: None)["train"], run_dir


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "model.safetensors"))


def _plain_validation_rewards(model_dir, data_dir):
    """Validation rewards from the export loaded by plain transformers, and its config.json."""
    from transformers import AutoModelForSequenceClassification

    from pipeline import modeling

    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    config = json.loads((Path(model_dir) / "config.json").read_text())
    rows = T.read_rows(str(data_dir / "validation"))
    with torch.no_grad():
        batch = T.collate(rows, model.config.pad_token_id, torch.device("cpu"))
        rewards, _ = modeling.forward_rewards(model, batch["input_ids"], batch["attention_mask"])
    return rewards, config


def _metric_history(cfg, run_id, key):
    from mlflow import MlflowClient

    from pipeline.tracking import resolve_tracking_uri

    return [m.value for m in sorted(MlflowClient(resolve_tracking_uri(cfg)).get_metric_history(run_id, key),
                                    key=lambda m: m.step)]


@pytest.fixture(scope="module")
def baseline(data_dir, tmp_path_factory):
    """2 workers, ZeRO-2, uninterrupted: the reference run."""
    return _ray_train(tmp_path_factory.mktemp("base"), "base", [], data_dir)


def test_two_workers_zero2_trains_and_exports_a_plain_hf_model(baseline, data_dir):
    cfg, manifest, run_dir = baseline
    assert set(manifest.outputs) == {"model", "checkpoint", "metrics", "validation_rewards", "gradient_pairs"}
    rewards, config = _plain_validation_rewards(manifest.outputs["model"], data_dir)
    # The plain-transformers model reproduces the training-time validation rewards stored at export.
    assert abs(rewards.mean().item() - config["reward_mean"]) < 1e-4
    assert abs(rewards.std(unbiased=False).item() - config["reward_std"]) < 1e-4
    final = json.loads(Path(manifest.outputs["metrics"]).read_text())["final"]
    assert final["step"] == 6 and 0.0 <= final["val_accuracy"] <= 1.0
    import pandas as pd

    gradient_pairs = pd.read_csv(manifest.outputs["gradient_pairs"])  # every step's rank-0 first micro-batch
    assert list(gradient_pairs.columns) == ["distance", "grad_norm"]
    assert len(gradient_pairs) == final["grad/pairs"] == 6 * cfg.train.micro_batch_size
    assert math.isfinite(final["grad/distance_slope"])
    assert 0.0 <= final["data_wait_fraction"] < 1.0  # the data-wait figure is recorded per run
    # Each of the 6 reports (train.log_every 1) waited for Ray Train's controller to poll the workers, every 2 s
    # by default: 1.7 s a report, 13.8 s of a 35 s smoke train stage in the loop's "other" time. Polled every
    # 0.1 s, the 6 take well under half a second each.
    assert final["phase/loop_other_s"] < 3.0, final
    assert len(_metric_history(cfg, manifest.mlflow_run_id, "loss")) == 6
    assert len(_metric_history(cfg, manifest.mlflow_run_id, "data_wait_fraction")) == 7  # 6 steps + final


def test_a_changed_config_retrains_in_the_same_run_directory(baseline, data_dir, tmp_path):
    """Rerunning the train stage after a config change trains the new config from scratch (it once loaded the
    previous run's final checkpoint from the shared Ray storage, trained nothing and exported the old weights)."""
    cfg, manifest, run_dir = baseline
    shutil.copytree(run_dir / "ray_storage", tmp_path / run_dir.name / "ray_storage")  # the earlier run's checkpoints
    new_cfg, changed, _ = _ray_train(tmp_path, run_dir.name, ["train.lr=1e-3"], data_dir)
    assert changed.hash != manifest.hash
    assert len(_metric_history(new_cfg, changed.mlflow_run_id, "loss")) == 6  # six steps trained, none skipped
    old, new = _weights(manifest.outputs["model"]), _weights(changed.outputs["model"])
    assert any(not torch.equal(old[k], new[k]) for k in old)


def test_one_worker_matches_two_workers(baseline, data_dir, tmp_path):
    cfg, manifest, _ = baseline
    one_cfg, one, _ = _ray_train(tmp_path, "one", ["train.num_workers=1", "train.micro_batch_size=8",
                                                   "train.zero_stage=0"], data_dir)
    two_curve = _metric_history(cfg, manifest.mlflow_run_id, "loss")
    one_curve = _metric_history(one_cfg, one.mlflow_run_id, "loss")
    torch.testing.assert_close(torch.tensor(one_curve), torch.tensor(two_curve), rtol=1e-4, atol=1e-5)


def test_killed_worker_resumes_to_the_same_weights(baseline, data_dir, tmp_path):
    """A worker dies hard after step 5; Ray restarts the group from its last registered checkpoint (step 4, or
    step 2 if the controller had not registered step 4's when the worker died), and the result equals the
    uninterrupted run: no batch trained twice or skipped."""
    marker = tmp_path / "killed-once"
    os.environ["NORMBT_FAIL_AT_STEP"] = f"5:{marker}"
    try:
        cfg, resumed, _ = _ray_train(tmp_path, "resumed", ["train.checkpoint_every=2", "train.max_failures=1"],
                                     data_dir)
    finally:
        del os.environ["NORMBT_FAIL_AT_STEP"]
    assert marker.read_text() == "5", "the injected failure must have happened"
    # steps 1-5 logged, then 5-6 again from step 4's checkpoint (3-6 from step 2's); from scratch: 5 + 6
    assert len(_metric_history(cfg, resumed.mlflow_run_id, "loss")) in (7, 9), "resumed from a checkpoint"
    _, manifest, _ = baseline
    ref, got = _weights(manifest.outputs["model"]), _weights(resumed.outputs["model"])
    assert ref.keys() == got.keys()
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=1e-4, atol=1e-5, msg=key)


def test_decoder_with_pad_as_eos_trains_under_zero3_on_ray_and_rewardbench_scores_like_training(ray_session,
                                                                                                 tmp_path):
    """The decoder path as users run it: a local Llama-family folder (byte-level BPE, pad = EOS, a chat template
    with a date), the data stage, 2 Ray Train workers under ZeRO-3, the export; RewardBench's scoring of the
    validation pairs equals the training-time rewards of the same pairs (``validation_rewards``)."""
    import pandas as pd

    from pipeline import synthetic
    from pipeline.decoders import make_decoder

    folder = make_decoder(tmp_path / "llama", "llama")
    common = [f"run.root={tmp_path}", f"model.name_or_path={folder}", "train.zero_stage=3", "train.max_steps=3",
              "data.max_length=512", "rewardbench.max_length=512", "tracking.enabled=false",
              "data.sources=[{synthetic: {n_train: 64, n_validation: 33, n_test: 64}}]"]
    cfg = load_config(SMOKE, common)
    manifests = runner.run_pipeline(cfg, stages=("data", "train"), log=lambda _: None)
    trained = pd.read_parquet(manifests["train"].outputs["validation_rewards"])
    ids = pd.read_parquet(manifests["data"].outputs["validation"])["id"].tolist()
    assert trained["row"].tolist() == list(range(len(ids))) and len(ids) % 2 == 1, "unequal ranks: an odd split"
    spec = cfg.data.sources[0].synthetic
    texts = {r["id"]: r for r in synthetic.generate(spec, "validation")}
    bench = tmp_path / "validation_pairs.jsonl"
    bench.write_text("".join(json.dumps({"id": i, "prompt": texts[i]["prompt"][-1]["content"],
                                         "chosen": texts[i]["chosen"][-1]["content"],
                                         "rejected": texts[i]["rejected"][-1]["content"]}) + "\n" for i in ids))
    cfg = load_config(SMOKE, [*common, f"rewardbench.benchmarks=[{{name: val, path: {bench}}}]"])
    scored = runner.run_pipeline(cfg, stages=("rewardbench",), log=lambda _: None)["rewardbench"]
    scores = pd.read_parquet(scored.outputs["val/scores"]).set_index("id").loc[ids]
    torch.testing.assert_close(torch.tensor(scores["score_chosen"].to_numpy()),
                               torch.tensor(trained["reward_chosen"].to_numpy()), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor(scores["score_rejected"].to_numpy()),
                               torch.tensor(trained["reward_rejected"].to_numpy()), rtol=1e-5, atol=1e-5)
    weights = _weights(manifests["train"].outputs["model"])
    assert weights["score.weight"].shape == (1, 64) and not any(k.endswith((".gamma", ".beta")) for k in weights)


STALE_LOCK_SCRIPT = """
from pipeline import modeling, synthetic
from pipeline.config import load_config
from pipeline.train_loop import train_local

tok = modeling.load_tokenizer("tiny:bert")
rows = []
for r in synthetic.generate(synthetic.SyntheticSpec(n_train=16), "train")[:16]:
    ids = {s: modeling.encode_messages(tok, r["prompt"] + r[s]) for s in ("chosen", "rejected")}
    rows.append({"chosen_ids": ids["chosen"], "rejected_ids": ids["rejected"], "margin": None,
                 "chosen_len": len(ids["chosen"]), "rejected_len": len(ids["rejected"])})
cfg = load_config(None, ["model.name_or_path=tiny:bert", "train.max_steps=1", "train.micro_batch_size=8"])
train_local(cfg, rows, rows[:8], report=lambda m, checkpoint_dir=None, final=False: None)
print("trained")
"""


@pytest.mark.timeout(300)
def test_a_lock_left_by_a_process_killed_while_compiling_does_not_hang_the_next_run(tmp_path):
    """A worker killed while DeepSpeed JIT-compiled its CPU shared-memory op left ``lock`` in torch's extensions
    folder; every later DeepSpeed start in that environment waited on it forever (a suite's training tests ran
    to their time-outs). Training must start whatever that folder holds."""
    import subprocess
    import sys

    extensions = tmp_path / "torch_extensions"
    (extensions / "deepspeed_shm_comm").mkdir(parents=True)
    (extensions / "deepspeed_shm_comm" / "lock").touch()  # what the killed compiler left
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions), "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1"}
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        env.pop(key, None)
    try:
        done = subprocess.run([sys.executable, "-c", STALE_LOCK_SCRIPT], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=150)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"training waited on the stale lock for 150 s:\n{(err.stderr or b'')[-2000:]!r}")
    assert done.returncode == 0 and "trained" in done.stdout, done.stderr[-3000:]
    assert (extensions / "deepspeed_shm_comm" / "lock").exists()  # left alone: not ours to delete


def test_the_terminal_shows_each_progress_line_once_and_no_per_report_dump(tmp_path):
    """What a user reads while training (the real entry point, the default log level): each worker's progress line
    once (Ray Train's print patch printed every one twice), none of Ray Train's per-report metric dumps, no
    transformers load reports or Ray Data dataset lines, and none of the notices a user cannot act on (the search's
    trials run before it, so Tune's warnings would show too)."""
    import re
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_TRAIN_ENABLE_PRINT_PATCH", None)
    env.pop("RAY_DEDUP_LOGS", None)
    # Which lines Ray's de-duplication merges depends on when they arrive (within its window, 5 s by default):
    # a long window makes its merging certain here rather than a matter of this machine's speed.
    env["RAY_DEDUP_LOGS_AGG_WINDOW_S"] = "60"
    done = subprocess.run([sys.executable, "run_pipeline.py", "--config", "configs/smoke.yaml", "--stages", "data,tune,train",
                           "--run-dir", str(tmp_path / "run"), "train.max_steps=4", "tracking.enabled=false"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    lines = re.findall(r"RayTrainWorker pid=(\d+)\)\S*\s+step (\d+)/4 ", out)
    assert sorted({step for _, step in lines}) == ["1", "2", "3", "4"], out[-3000:]
    assert len(lines) == len(set(lines)), f"progress lines repeated:\n{out[-3000:]}"
    # Ray's log de-duplication took progress lines that differ only in their numbers for repeats: it held most
    # of them back and printed "[repeated 2x across cluster] (Ray deduplicates logs by default ...)" instead
    assert "across cluster" not in out and "deduplicates logs" not in out, out[-3000:]
    assert "Reporting training result" not in out
    # nor the libraries' own chatter (every worker's model-load report, Ray Data's line per dataset)
    assert "LOAD REPORT" not in out and "execution finished" not in out, out[-3000:]
    for notice in ("Token authentication is enabled",  # ray.init's, for the token mode it chose itself
                   "``concurrency`` is deprecated",  # Ray Data's argument
                   "all_gather_into_tensor` is deprecated",  # torch's, for the collectives DeepSpeed calls
                   "Progress bars disabled",  # Ray Data's, in the driver and every worker
                   "max_concurrent_trials` will be ignored"):  # Tune's, given a random search's generator
        assert notice not in out, out[-3000:]
