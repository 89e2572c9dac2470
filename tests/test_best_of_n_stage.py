"""Best-of-N stage: prompt sources, config errors, the estimator on a known proxy, and the stage end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import bon_math, generation, modeling, runner, tracking
from pipeline.artifacts import Manifest
from pipeline.config import ConfigError, load_config
from stages import best_of_n

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"
TABLE_COLUMNS = ["n", "kl", "gold_mean", "gold_ci_low", "gold_ci_high", "proxy_mean", "oracle_gold_mean"]


def _context(tmp_path: Path, overrides: list[str], upstream: dict | None = None,
             lines: list[str] | None = None) -> runner.StageContext:
    cfg = load_config(SMOKE, [f"run.root={tmp_path}", "tracking.enabled=false", *overrides])
    return runner.StageContext(cfg=cfg, run_dir=tmp_path, out_dir=tmp_path / "best_of_n", upstream=upstream or {},
                               tracker=tracking.RunLogger(None, None),
                               log=(lines.append if lines is not None else lambda _: None))


def _save_tiny_reward_model(folder: Path, seed: int) -> str:
    tok = modeling.load_tokenizer("tiny:llama")
    model = modeling.build_reward_model("tiny:llama", tok, seed=seed)
    return str(modeling.save_reward_model(model, tok, folder))


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ----------------------------------------------------------------- unit: no Ray


@pytest.mark.unit
def test_oracle_like_proxy_makes_the_gold_curve_rise_and_random_proxy_does_not():
    """The measurement the stage exists for: a proxy that tracks gold beats random selection."""
    rng = np.random.default_rng(0)
    num_prompts, n_max = 200, 16
    gold = rng.normal(size=(num_prompts, n_max))
    rows = [{"prompt_id": f"p{k}", "candidate_id": j, "gold": gold[k, j],
             "good_proxy": gold[k, j] + 0.3 * rng.normal(), "random_proxy": rng.normal()}
            for k in range(num_prompts) for j in range(n_max)]
    frame = pd.DataFrame(rows)
    good = best_of_n.estimate(frame.rename(columns={"good_proxy": "proxy"}), n_max, n_boot=200, seed=0)
    random = best_of_n.estimate(frame.rename(columns={"random_proxy": "proxy"}), n_max, n_boot=200, seed=0)
    assert list(good.columns) == TABLE_COLUMNS and good["n"].tolist() == [1, 2, 4, 8, 16]
    assert np.all(np.diff(good["gold_mean"]) > 0), "gold must rise with n for an oracle-like proxy"
    assert good["gold_mean"].iloc[-1] - good["gold_mean"].iloc[0] > 1.0
    assert np.all(good["oracle_gold_mean"] >= good["gold_mean"] - 1e-12)
    assert abs(random["gold_mean"].iloc[-1] - random["gold_mean"].iloc[0]) < 0.2, "random selection gains nothing"
    assert random["gold_ci_low"].iloc[-1] < good["gold_mean"].iloc[-1]
    assert good["gold_mean"].iloc[0] == pytest.approx(gold.mean())  # n=1 is the policy's own mean


@pytest.mark.unit
def test_write_outputs_contract_without_ray(tmp_path):
    frame = pd.DataFrame({"prompt_id": np.repeat(["a", "b", "c"], 4), "candidate_id": np.tile(range(4), 3),
                          "text": "x", "proxy": np.arange(12.0), "gold": np.tile([0.0, 1.0], 6), "extra": 1})
    table = best_of_n.estimate(frame, 4, n_boot=50, seed=0)
    outputs = best_of_n.write_outputs(frame, table, tmp_path / "out", settings={"n_max": 4})
    assert set(outputs) == {"candidates", "results", "plot"}
    assert list(pd.read_parquet(outputs["candidates"]).columns) == list(best_of_n.CANDIDATE_COLUMNS)
    assert list(pd.read_csv(outputs["results"]).columns) == TABLE_COLUMNS
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["n_max"] == 4 and [r["n"] for r in saved["rows"]] == [1, 2, 4]
    assert Path(outputs["plot"]).read_bytes()[:4] == b"\x89PNG"
    metrics = bon_math.summary_metrics(table)
    assert metrics["bon/gain"] == pytest.approx(metrics["bon/gold_at_nmax"] - metrics["bon/gold_at_1"])


@pytest.mark.unit
def test_verdict_compares_the_best_n_interval_with_random_selection():
    # n=4 has the highest mean but n=2 the interval that clears random selection (as measured on the default)
    table = pd.DataFrame({"n": [1, 2, 4], "kl": 0.0, "gold_mean": [0.50, 0.546, 0.55],
                          "gold_ci_low": [0.47, 0.508, 0.495], "gold_ci_high": [0.53, 0.58, 0.6],
                          "proxy_mean": 0.0, "oracle_gold_mean": 1.0})
    metrics = bon_math.summary_metrics(table)
    assert (metrics["bon/peak_n"], metrics["bon/clearest_n"], metrics["bon/beats_random"]) == (4, 2, 1.0)
    assert bon_math.verdict(metrics).startswith("the reward model beats random selection: gold 0.546 at n=2")
    assert (metrics["bon/beats_random_up_to"], metrics["bon/overoptimised"]) == (2, 0.0)
    table.loc[1, "gold_ci_low"] = 0.49  # no interval clears 0.50 any more
    metrics = bon_math.summary_metrics(table)
    assert metrics["bon/beats_random"] == 0.0 and "does NOT beat" in bon_math.verdict(metrics)
    only_random = table.iloc[:1]
    assert bon_math.summary_metrics(only_random)["bon/beats_random"] == 0.0


@pytest.mark.unit
def test_summary_says_up_to_which_n_selection_helps_and_when_gold_falls_past_its_peak():
    # The shape the embedded default shows: above random up to n=8, then the proxy is exploited.
    table = pd.DataFrame({"n": [1, 2, 4, 8, 16], "kl": 0.0, "gold_mean": [0.50, 0.58, 0.62, 0.57, 0.48],
                          "gold_ci_low": [0.47, 0.55, 0.58, 0.52, 0.42], "gold_ci_high": [0.53, 0.61, 0.66, 0.62, 0.54],
                          "proxy_mean": 0.0, "oracle_gold_mean": 1.0})
    metrics = bon_math.summary_metrics(table)
    assert (metrics["bon/beats_random_up_to"], metrics["bon/peak_n"], metrics["bon/overoptimised"]) == (8, 4, 1.0)
    assert "over-optimisation" in bon_math.verdict(metrics)
    table.loc[4, "gold_ci_high"] = 0.63  # the fall is inside n=16's interval: not claimed
    assert bon_math.summary_metrics(table)["bon/overoptimised"] == 0.0


class _RecordingTracker:
    """Stands in for tracking.RunLogger: records what the stage logs."""

    def __init__(self) -> None:
        self.artifacts: list[tuple[str, str | None]] = []
        self.metrics: list[tuple[dict, int | None]] = []

    def log_artifact(self, path, artifact_path=None) -> None:
        self.artifacts.append((str(path), artifact_path))

    def log_metrics(self, metrics, step=None) -> None:
        self.metrics.append((dict(metrics), step))


@pytest.mark.unit
def test_outputs_are_logged_as_artifacts_and_curves_as_metric_series(tmp_path):
    frame = pd.DataFrame({"prompt_id": np.repeat(["a", "b"], 4), "candidate_id": np.tile(range(4), 2),
                          "text": "x", "proxy": np.arange(8.0), "gold": np.tile([0.0, 1.0], 4)})
    table = best_of_n.estimate(frame, 4, n_boot=20, seed=0)
    outputs = best_of_n.write_outputs(frame, table, tmp_path / "best_of_n", settings={})
    recorder = _RecordingTracker()
    ctx = runner.StageContext(cfg=load_config(SMOKE), run_dir=tmp_path, out_dir=tmp_path / "best_of_n",
                              upstream={}, tracker=recorder)
    best_of_n.track_outputs(ctx, outputs, table)
    logged = {Path(path).name for path, _ in recorder.artifacts}
    assert logged == {"candidates.parquet", "results.csv", "results.json", "plot.png"}
    assert [step for _, step in recorder.metrics] == [1, 2, 4]
    assert recorder.metrics[-1][0]["bon/curve_gold"] == pytest.approx(table["gold_mean"].iloc[-1])


@pytest.mark.unit
def test_prompt_files_first_num_prompts_strings_and_message_lists(tmp_path):
    rows = [{"prompt": "What is 2 + 2?"},
            {"id": "own", "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]},
            {"prompt": "third"}, {"prompt": "never read"}]
    jsonl = _write_jsonl(tmp_path / "p.jsonl", rows)
    prompts = best_of_n.load_prompts(_prompts({"path": str(jsonl)}), 3)
    assert [p["prompt_id"] for p in prompts] == ["p.jsonl#0", "own", "p.jsonl#2"]
    assert prompts[0]["messages"] == [{"role": "user", "content": "What is 2 + 2?"}]
    assert prompts[1]["prompt"] == "Hi" and len(prompts[1]["messages"]) == 2
    parquet = tmp_path / "p.parquet"
    pd.DataFrame({"prompt": [p["messages"] for p in prompts]}).to_parquet(parquet)  # one Arrow type per column
    from_parquet = best_of_n.load_prompts(_prompts({"path": str(parquet)}), 3)
    assert [p["messages"] for p in from_parquet] == [p["messages"] for p in prompts]
    assert [p["prompt_id"] for p in from_parquet] == ["p.parquet#0", "p.parquet#1", "p.parquet#2"]


@pytest.mark.unit
def test_bad_prompt_rows_fail_with_their_location(tmp_path):
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok"}, {"text": "no prompt field"}])
    with pytest.raises(ValueError, match=r"bad.jsonl:2 has no 'prompt' field"):
        best_of_n.load_prompts(_prompts({"path": str(bad)}), 5)
    ends_with_assistant = _write_jsonl(tmp_path / "a.jsonl", [{"prompt": [{"role": "assistant", "content": "x"}]}])
    with pytest.raises(ValueError, match="must end with a user turn"):
        best_of_n.load_prompts(_prompts({"path": str(ends_with_assistant)}), 5)


@pytest.mark.unit
def test_synthetic_prompts_come_from_the_test_split_with_answers():
    prompts = best_of_n.load_prompts(_prompts({"synthetic": {"seed": 1}}), 4)
    assert len(prompts) == 4 and all(p["prompt_id"].startswith("reason-test-") for p in prompts)
    assert all(isinstance(p["answer"], int) and p["messages"][0]["role"] == "user" for p in prompts)


@pytest.mark.unit
@pytest.mark.parametrize("prompts, message", [
    ({"synthetic": {}, "path": "x.jsonl"}, "exactly one of"),
    ({"pth": "x.jsonl"}, "unknown key"),
    ({"synthetic": {"n_tests": 3}}, "n_tests"),
    ({"synthetic": {}, "split": "train"}, "do not apply to synthetic"),
])
def test_prompt_source_config_errors(prompts, message):
    with pytest.raises(ConfigError, match=message):
        _prompts(prompts)


@pytest.mark.unit
def test_verifier_gold_needs_synthetic_prompts_and_errors_come_before_any_work(tmp_path):
    ctx = _context(tmp_path, ["best_of_n.prompts={path: prompts.jsonl}", "best_of_n.policy=hf",
                              "best_of_n.policy_model=tiny:llama", "best_of_n.reward_model=rm"])
    with pytest.raises(ConfigError, match="gold=verifier needs"):
        best_of_n.run_best_of_n(ctx)
    ctx = _context(tmp_path, ["best_of_n.prompts={path: prompts.jsonl}", "best_of_n.gold=rm",
                              "best_of_n.gold_model=g", "best_of_n.reward_model=rm"])
    with pytest.raises(ConfigError, match="policy=synthetic only answers"):
        best_of_n.run_best_of_n(ctx)


@pytest.mark.unit
def test_reward_model_from_config_else_train_stage_else_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no reward model"):
        best_of_n.run_best_of_n(_context(tmp_path, []))
    trained = Manifest(stage="train", hash="h", outputs={"model": "/runs/x/train/model"})
    assert best_of_n.resolve_reward_model(_context(tmp_path, [], {"train": trained})) == "/runs/x/train/model"
    chosen = _context(tmp_path, ["best_of_n.reward_model=/my/rm"], {"train": trained})
    assert best_of_n.resolve_reward_model(chosen) == "/my/rm"


@pytest.mark.unit
def test_prompt_seed_is_stable_and_prompt_specific():
    assert generation.prompt_seed(0, "a") == generation.prompt_seed(0, "a")
    assert len({generation.prompt_seed(0, "a"), generation.prompt_seed(0, "b"), generation.prompt_seed(1, "a")}) == 3


def _prompts(mapping: dict):
    """``best_of_n.prompts`` as the config builds it from YAML."""
    import json

    return load_config(None, [f"best_of_n.prompts={json.dumps(mapping)}"]).best_of_n.prompts


# ----------------------------------------------------------------- integration: local Ray


@pytest.fixture(scope="module")
def ray_cluster(ray_session):
    """The suite's one Ray session (shutting it down here left later modules' fixtures without Ray)."""
    return ray_session


@pytest.fixture(scope="module")
def tiny_reward_models(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("reward_models")
    return _save_tiny_reward_model(root / "proxy", seed=0), _save_tiny_reward_model(root / "gold", seed=1)


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_offline_default_path_synthetic_policy_verifier_gold(ray_cluster, tiny_reward_models, tmp_path):
    proxy_rm, _ = tiny_reward_models
    lines: list[str] = []
    ctx = _context(tmp_path, [f"best_of_n.reward_model={proxy_rm}", "best_of_n.num_prompts=16",
                              "best_of_n.n_max=8", "best_of_n.bootstrap=200"], lines=lines)
    result = best_of_n.run_best_of_n(ctx)

    assert set(result.outputs) == {"candidates", "results", "plot"}
    assert all(Path(p).is_file() and Path(p).parent == ctx.out_dir for p in result.outputs.values())
    table = pd.read_csv(result.outputs["results"])
    assert list(table.columns) == TABLE_COLUMNS and table["n"].tolist() == [1, 2, 4, 8]
    assert table["kl"].iloc[0] == 0.0
    assert table["kl"].tolist() == pytest.approx([bon_math.kl_best_of_n(n) for n in (1, 2, 4, 8)])
    assert (table["oracle_gold_mean"] >= table["gold_mean"] - 1e-12).all()
    assert (table["gold_ci_low"] <= table["gold_mean"]).all() and (table["gold_mean"] <= table["gold_ci_high"]).all()
    candidates = pd.read_parquet(result.outputs["candidates"])
    assert list(candidates.columns) == list(best_of_n.CANDIDATE_COLUMNS) and len(candidates) == 16 * 8
    assert set(candidates["gold"]) <= {0.0, 1.0} and np.isfinite(candidates["proxy"]).all()
    assert candidates.groupby("prompt_id")["candidate_id"].apply(sorted).map(list).eq([list(range(8))] * 16).all()
    assert table["gold_mean"].iloc[0] == pytest.approx(candidates["gold"].mean())  # n=1: the policy's accuracy
    assert set(result.metrics) == {"bon/gold_at_1", "bon/gold_at_nmax", "bon/gain", "bon/oracle_at_nmax",
                                   "bon/peak_n", "bon/gold_at_peak", "bon/clearest_n", "bon/clearest_gold",
                                   "bon/clearest_ci_low", "bon/beats_random", "bon/beats_random_up_to",
                                   "bon/overoptimised"}
    assert any(line.startswith("best-of-n: the reward model") for line in lines)
    assert result.metrics["bon/gold_at_1"] == pytest.approx(table["gold_mean"].iloc[0])
    assert any(line.startswith("best-of-n: gold@1=") and "oracle" in line for line in lines)


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_hf_policy_generates_in_a_ray_actor_pool_and_rm_gold(ray_cluster, tiny_reward_models, tmp_path):
    proxy_rm, gold_rm = tiny_reward_models
    prompts = _write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "What is 3 + 4?"},
                                                        {"prompt": "Name a colour."},
                                                        {"prompt": [{"role": "user", "content": "Say hi."}]},
                                                        {"prompt": "not used"}])
    ctx = _context(tmp_path, [f"best_of_n.prompts={{path: {prompts}}}", "best_of_n.policy=hf",
                              "best_of_n.policy_model=tiny:llama", "best_of_n.gold=rm",
                              f"best_of_n.gold_model={gold_rm}", f"best_of_n.reward_model={proxy_rm}",
                              "best_of_n.n_max=2", "best_of_n.max_new_tokens=4", "best_of_n.num_prompts=3",
                              "best_of_n.bootstrap=50"])
    result = best_of_n.run_best_of_n(ctx)

    assert all(Path(p).is_file() for p in result.outputs.values())
    candidates = pd.read_parquet(result.outputs["candidates"])
    assert candidates["prompt_id"].tolist() == ["prompts.jsonl#0"] * 2 + ["prompts.jsonl#1"] * 2 + \
        ["prompts.jsonl#2"] * 2
    assert candidates["candidate_id"].tolist() == [0, 1] * 3
    assert np.isfinite(candidates[["proxy", "gold"]].to_numpy()).all()
    assert not np.allclose(candidates["proxy"], candidates["gold"]), "proxy and gold are different models"
    assert pd.read_csv(result.outputs["results"])["n"].tolist() == [1, 2]
