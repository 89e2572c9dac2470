"""What the embedded default promises, checked where it can be without training (the trained numbers, five
seeds and the timings are measured in the README and benchmarks/README.md, not asserted here)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline import bon_math, synthetic
from pipeline.config import load_config
from pipeline.synthetic.spec import SECTION_OF_SUBSET

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def cfg():
    return load_config(str(Path(__file__).resolve().parents[1] / "configs" / "default.yaml"), [])


def test_validation_measures_every_section_and_shares_no_prompt_with_train(cfg):
    """The data stage keeps no prompt on both sides: before validation reserved its own prompts, the small
    chat_hard and safety pools were all used by train, and validation measured reasoning and chat only."""
    spec = cfg.data.sources[0].synthetic
    train = {r["prompt"][0]["content"] for r in synthetic.generate(spec, "train")}
    validation = synthetic.generate(spec, "validation")
    assert not [r["id"] for r in validation if r["prompt"][0]["content"] in train]
    sections = {SECTION_OF_SUBSET[r["subset"]] for r in validation}
    assert sections == {"Chat", "Chat Hard", "Safety", "Reasoning"}
    reasoning = sum(SECTION_OF_SUBSET[r["subset"]] == "Reasoning" for r in validation) / len(validation)
    assert 0.4 < reasoning < 0.6  # the mix's half: validation is not a reasoning-only score


def _gold_by_n(cfg, score) -> dict[int, float]:
    bon = cfg.best_of_n
    pools = []
    for p in synthetic.reasoning_prompts(bon.prompts.synthetic, "test", 64):
        texts = synthetic.sample_candidates(p, bon.n_max, error_rate=bon.error_rate, coarse_share=bon.coarse_share,
                                            seed=bon.seed)
        pools.append((np.array([score(t, j) for j, t in enumerate(texts)]),
                      np.array([synthetic.verify(p, t) for t in texts])))
    table = bon_math.best_of_n_table(pools, bon_math.n_grid(bon.n_max), n_boot=50)
    return dict(zip(table["n"], table["gold_mean"]))


def test_the_policy_fails_in_ways_a_reward_model_of_this_benchmark_can_catch(cfg):
    """Designed together: a reward model that has learnt only what the benchmark's chat-truncated and
    safety-comply pairs teach (a finished answer beats a cut-off one or a non-answer) and nothing about arithmetic
    already lifts Best-of-N gold with n; one that knows nothing keeps it flat. The default's trained model does
    better than the first (README: the five-seed table)."""
    rng = np.random.default_rng(0)

    def finished_only(text: str, j: int) -> float:
        return float(text.rstrip().endswith(".") and any(c.isdigit() for c in text)) + rng.random() * 1e-3

    knows = _gold_by_n(cfg, finished_only)
    assert knows[4] > knows[1] + 0.1 and knows[16] > knows[1] + 0.1
    blind = _gold_by_n(cfg, lambda text, j: rng.random())
    assert abs(blind[16] - blind[1]) < 0.1


def test_the_libraries_chatter_is_off_by_default_and_back_with_verbose(cfg, monkeypatch):
    from pipeline.raycluster import quiet_env

    monkeypatch.delenv("TRANSFORMERS_VERBOSITY", raising=False)
    monkeypatch.delenv("RAY_DEDUP_LOGS", raising=False)
    assert cfg.run.log_level == "WARNING"
    assert quiet_env(cfg.run.log_level) == {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                                            "MLFLOW_LOGGING_LEVEL": "WARNING", "RAY_DATA_LOG_LEVEL": "WARNING",
                                            "RAY_AIR_NEW_OUTPUT": "0", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
                                            "RAY_DEDUP_LOGS": "0"}
    assert quiet_env("INFO") == {}
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "info")  # the user's own choice wins
    assert quiet_env("WARNING")["TRANSFORMERS_VERBOSITY"] == "info"


def test_the_search_starts_from_a_baseline_it_must_beat_and_its_winner_is_continued_not_retrained(cfg):
    """The default's search is worth its time. Its first trial is the configured lr, outside the searched domain
    (a baseline, said as such by the stage); every trial trains the first 40 steps of the final run's own 100 (a
    prefix, not a schedule of its own), which the final run, one rank of the same 16 pairs, continues instead of
    training again. A change that breaks the prefix (another batch layout, a trial horizon of its own) makes the
    final run start from step 0 again: this test says so before a 3-minute run does."""
    from pipeline.continuation import continuation_problem
    from pipeline.config import flatten, from_flat
    from pipeline.train_loop import last_step, plan_steps
    from stages.tune import TrialSetup, trained_config, trial_launcher

    low, high = cfg.tune.search_space["train.lr"].loguniform
    assert not low <= cfg.train.lr <= high and cfg.tune.start_from_config
    base = from_flat(dict(cfg.tune.trial_overrides), base=cfg)
    horizon, _ = plan_steps(cfg, 1600)
    assert cfg.data.sources[0].synthetic.n_train == 1600 and (horizon, last_step(base, horizon)) == (100, 40)
    setup = TrialSetup(cfg=base, data=None, storage_path="unused", tracker=None, mode="search", digest="d",
                       launcher=trial_launcher(base))
    drawn = {"train.lr": 1.2e-4, "loss.beta": 0.63, "loss.eps": 1.3e-4}
    final = flatten(from_flat(drawn, base=cfg))
    assert cfg.train.continue_search
    assert continuation_problem(flatten(trained_config(setup, drawn)), final, run_last_step=horizon) is None


def test_the_report_shows_the_plain_loss_falling_not_hidden_under_the_weighted_one(tmp_path, monkeypatch):
    """The default's NormBT weighted loss jumps to 10 where μ/d is large, and shared the loss panel's scale with the
    plain BT loss, which then looked flat. The plain loss now has its panel, with its running mean (the trend of a
    per-batch loss); the weighted loss sits with the weights that drive it."""
    from pipeline import report
    from pipeline.artifacts import Manifest

    steps = [5.0, 10.0, 15.0, 20.0, 25.0]
    history = {"pair_loss": (steps, [0.69, 0.70, 0.52, 0.61, 0.40]), "loss": (steps, [0.9, 1.3, 10.2, 0.6, 0.5]),
               "weight_mean": (steps, [1.0, 2.0, 14.0, 1.0, 1.0]), "val_loss": ([25.0], [0.45])}
    monkeypatch.setattr(report, "metric_history", lambda uri, run_id, keys: {k: v for k, v in history.items() if k in keys})
    drawn = []
    monkeypatch.setattr(report, "_figure", lambda panels, path, bands=None: drawn.append(panels) or path)
    cfg = load_config(None, [])
    train = Manifest(stage="train", hash="h", outputs={}, mlflow_run_id="r")
    report._training(cfg, {"train": train}, tmp_path, "sqlite:///unused.db")
    (title, first), *rest = drawn[0]
    assert "plain BT loss" in title and "loss" not in first and set(first) == {"pair_loss", report.SMOOTHED, "val_loss"}
    assert first[report.SMOOTHED][1] == pytest.approx([0.69, 0.695, 0.6367, 0.63, 0.5575], abs=1e-4)
    assert any("loss" in series and "weight_mean" in series for _, series in rest)


def test_scoring_runs_on_every_core_the_training_worker_had(cfg):
    """A scoring actor computes with as many torch threads as it has CPUs (Ray sets OMP_NUM_THREADS to them).
    At the library's 1 CPU the default's one scoring actor used one of the two cores: scoring 2,048 Best-of-N
    candidates took 16.7 s on one thread and 10.9 s on two (AMD EPYC, benchmarks/README.md)."""
    for section in (cfg.rewardbench, cfg.best_of_n):
        assert section.cpus_per_actor == cfg.train.cpus_per_worker == 2
    assert cfg.ray.num_cpus - cfg.best_of_n.cpus_per_actor >= 0.5  # Ray Data's tasks keep room beside it


def test_best_of_n_scoring_actors_fit_in_half_the_cluster_at_their_cpus(monkeypatch):
    import ray

    from pipeline.generation import actor_count

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0})
    assert actor_count(False, 100) == 8
    assert actor_count(False, 100, cpus_per_actor=2) == 4
    assert actor_count(False, 3, cpus_per_actor=2) == 3
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 3.0})
    assert actor_count(False, 100, cpus_per_actor=2) == 1  # at least one


def test_a_scoring_actor_larger_than_the_local_cluster_is_refused_before_ray_starts():
    from pipeline.preflight import problems

    cfg = load_config(None, ["ray.num_cpus=3", "best_of_n.cpus_per_actor=4"])
    assert any("best_of_n.cpus_per_actor = 4" in p for p in problems(cfg, ("best_of_n",)))
    assert not any("cpus_per_actor" in p for p in problems(cfg, ("rewardbench",)))
