"""RewardBench stage: real v1 file, RewardBench 2 regrouping, synthetic benchmark, output contract."""

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import metrics, modeling, scoring, synthetic, tracking
from pipeline.stage import StageContext
from pipeline.config import REPO_ROOT, BenchmarkConfig, ConfigError, load_config
from pipeline import benchmarks as B
from stages import rewardbench as rb

SMOKE = REPO_ROOT / "configs" / "smoke.yaml"
SCORE_COLUMNS = ["id", "subset", "section", "score_chosen", "score_rejected", "correct", "distance"]
OFFICIAL_COUNTS = {
    "alpacaeval-easy": 100, "alpacaeval-length": 95, "alpacaeval-hard": 95, "mt-bench-easy": 28,
    "mt-bench-med": 40, "mt-bench-hard": 37, "llmbar-natural": 100, "llmbar-adver-neighbor": 134,
    "llmbar-adver-GPTInst": 92, "llmbar-adver-GPTOut": 47, "llmbar-adver-manual": 46,
    "refusals-dangerous": 100, "refusals-offensive": 100, "xstest-should-refuse": 154,
    "xstest-should-respond": 250, "donotanswer": 136,
    "math-prm": 447, **{f"hep-{lang}": 164 for lang in ("cpp", "go", "java", "js", "python", "rust")},
}


class Recorder:
    """Stands in for RunLogger: remembers what the stage logs."""

    def __init__(self) -> None:
        self.metrics: dict[str, float] = {}
        self.artifacts: list[tuple[str, str | None]] = []

    def log_metrics(self, values, step=None) -> None:
        self.metrics.update(values)

    def log_artifact(self, path, artifact_path=None) -> None:
        self.artifacts.append((str(path), artifact_path))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tok = modeling.load_tokenizer("tiny:llama")
    folder = tmp_path_factory.mktemp("rewardbench") / "tiny-llama"
    return modeling.save_reward_model(modeling.build_reward_model("tiny:llama", tok, seed=1), tok, folder)


@pytest.fixture(scope="module")
def ray_cluster(ray_session):
    """The suite's one Ray session (shutting it down here left later modules' fixtures without Ray)."""
    return ray_session


def _context(tmp_path, model_dir, benchmarks, tracker=None, *overrides):
    cfg = load_config(SMOKE, [f"rewardbench.model={model_dir}", "rewardbench.max_length=128",
                              "rewardbench.batch_size=64", f"rewardbench.benchmarks={json.dumps(benchmarks)}",
                              *overrides])
    return StageContext(cfg=cfg, run_dir=tmp_path, out_dir=tmp_path / "rewardbench", upstream={},
                               tracker=tracker or tracking.RunLogger(None, None), log=lambda _: None)


def _v2_rows() -> list[dict]:
    """A few RewardBench 2 rows per subset; Ties prompts p1/p2 as both ref: and tied: rows."""
    rows = []
    for subset in ("Factuality", "Precise IF", "Math", "Safety", "Focus"):
        for i in range(3):
            rows.append({"id": f"{subset}-{i}", "subset": subset, "prompt": f"{subset} question {i}?",
                         "chosen": [f"A careful answer {i}."],
                         "rejected": [f"Wrong {i}.", f"Nonsense {i} {i}.", f"Off topic {subset}."]})
    for p in ("p1", "p2"):
        rows.append({"id": f"ref:{p}", "subset": "Ties", "prompt": f"Name a prime ({p}).", "chosen": ["2"],
                     "rejected": ["4", "9"]})
        rows.append({"id": f"tied:{p}", "subset": "Ties", "prompt": f"Name a prime ({p}).",
                     "chosen": ["2", "3", "5"], "rejected": ["4", "9", "15"]})
    return rows


# ------------------------------------------------------------------ unit: parsing and regrouping


@pytest.mark.unit
def test_benchmark_mapping_errors_name_the_key_when_the_config_loads():
    def load(benchmarks):
        return load_config(None, [f"rewardbench.benchmarks={json.dumps(benchmarks)}"]).rewardbench.benchmarks

    with pytest.raises(ConfigError, match=r"rewardbench.benchmarks\[0\]: unknown key 'splt' \(did you mean: split"):
        load([{"name": "x", "hf": "allenai/reward-bench", "splt": "filtered"}])
    with pytest.raises(ConfigError, match="exactly one of"):
        load([{"name": "x", "path": "a.jsonl", "synthetic": {}}])
    with pytest.raises(ConfigError, match="need split"):
        load([{"name": "x", "hf": "allenai/reward-bench"}])
    with pytest.raises(ConfigError, match=r"format='v3': expected one of v1, v2"):
        load([{"name": "x", "path": "a.jsonl", "format": "v3"}])
    with pytest.raises(ConfigError, match=r"synthetic: unknown key 'n_tst' \(did you mean: n_test"):
        load([{"name": "x", "synthetic": {"n_tst": 5}}])
    with pytest.raises(ConfigError, match="distinct name"):
        load([{"name": "x", "synthetic": {}}, {"name": "x", "path": "a.jsonl"}])
    assert load([{"path": "/d/rewardbench_v1_filtered.jsonl"}])[0].name == "rewardbench_v1_filtered"


@pytest.mark.unit
def test_no_model_is_a_clear_error(tmp_path):
    cfg = load_config(SMOKE)
    ctx = StageContext(cfg=cfg, run_dir=tmp_path, out_dir=tmp_path, upstream={},
                              tracker=tracking.RunLogger(None, None))
    with pytest.raises(ValueError, match="no model to score"):
        rb.score_rewardbench(ctx)


@pytest.mark.unit
def test_format_detection_and_explode():
    rows = _v2_rows()
    assert B.detect_format(rows) == "v2" and B.detect_format([{"chosen": "a"}]) == "v1"
    examples = B.examples_frame(rows, "v2", "fixture")
    convs = B.conversations(examples, "v2")
    assert len(convs) == sum(len(r["chosen"]) + len(r["rejected"]) for r in rows)
    first = convs.iloc[0]
    assert (first["row"], first["side"], first["k"]) == (0, "chosen", 0)
    assert first["messages"] == [{"role": "user", "content": rows[0]["prompt"]},
                                 {"role": "assistant", "content": rows[0]["chosen"][0]}]
    with pytest.raises(TypeError, match="format: v2"):
        B.examples_frame(rows, "v1", "fixture")


def _scored(entries):
    """Per-response table from ``(row, side, k, score, hidden)`` tuples."""
    return pd.DataFrame([{"row": r, "side": s, "k": k, "score": sc, "hidden": np.asarray(h, dtype=np.float32)}
                         for r, s, k, sc, h in entries])


@pytest.mark.unit
def test_v2_regroup_with_hand_set_scores():
    examples = pd.DataFrame({
        "id": ["a", "b", "c", "ref:p", "tied:p"], "subset": ["Math", "Math", "Focus", "Ties", "Ties"],
        "prompt": ["q"] * 5, "chosen": [["x"], ["x"], ["x"], ["x"], ["x", "y"]],
        "rejected": [["u", "v"], ["u", "v"], ["u", "v"], ["u"], ["u"]],
    })
    entries = [
        # row 0: clean win; the top rejected (k=1, score 0.5) is the distance partner
        (0, "rejected", 1, 0.5, [0, 4]), (0, "chosen", 0, 1.0, [0, 0]), (0, "rejected", 0, -1.0, [3, 0]),
        # row 1: loss; row 2: tie at the top with one rejected (credit 1/2)
        (1, "chosen", 0, 0.2, [0, 0]), (1, "rejected", 0, 0.9, [1, 0]), (1, "rejected", 1, 0.1, [0, 2]),
        (2, "chosen", 0, 0.7, [0, 0]), (2, "rejected", 0, 0.7, [0, 1]), (2, "rejected", 1, 0.0, [0, 5]),
        (3, "chosen", 0, 1.0, [0, 0]), (3, "rejected", 0, 0.0, [1, 0]),
        (4, "chosen", 1, 0.8, [0, 0]), (4, "chosen", 0, 1.0, [0, 0]), (4, "rejected", 0, 0.0, [2, 0]),
    ]
    frame = B.regroup(examples, _scored(entries), "v2")
    assert frame["score_chosen"].tolist() == [[1.0], [0.2], [0.7], [1.0], [1.0, 0.8]], "k order restored"
    assert frame["score_rejected"].tolist()[0] == [-1.0, 0.5]
    credit = frame["correct"].tolist()
    assert credit[:3] == [1.0, 0.0, 0.5] and math.isnan(credit[3]) and math.isnan(credit[4])
    np.testing.assert_allclose(frame["distance"], [4.0, 1.0, 1.0, 1.0, 2.0])
    frame["section"] = B.sections(frame, "v2")
    summary = B.summarise(frame, "v2")
    assert summary["subsets"]["Math"] == 0.5 and summary["subsets"]["Focus"] == 0.5
    assert summary["counts"] == {"Focus": 1, "Math": 2, "Ties": 2}
    assert summary["sections"] == summary["subsets"]
    assert summary["tie_rate"] == pytest.approx(1 / 5)  # by hand: row 2's best chosen 0.7 = best rejected 0.7


@pytest.mark.unit
def test_v1_regroup_tie_is_wrong_and_distance_is_euclidean():
    examples = pd.DataFrame({"id": ["1", "2"], "subset": ["hep-go", "hep-go"], "prompt": ["q", "q"],
                             "chosen": ["a", "b"], "rejected": ["c", "d"]})
    entries = [(0, "chosen", 0, 0.3, [0, 0]), (0, "rejected", 0, 0.3, [3, 4]),
               (1, "rejected", 0, -2.0, [1, 1]), (1, "chosen", 0, 1.0, [1, 1])]
    frame = B.regroup(examples, _scored(entries), "v1")
    assert frame["correct"].tolist() == [False, True]
    np.testing.assert_allclose(frame["distance"], [5.0, 0.0])
    frame["section"] = B.sections(frame, "v1")
    assert B.summarise(frame, "v1")["tie_rate"] == 0.5  # by hand: row 0 ties at 0.3
    assert B.metric_keys("b", B.summarise(frame, "v1"))["b/tie_rate"] == 0.5


# ------------------------------------------------------------------ integration: through Ray


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_real_rewardbench_v1_file(ray_cluster, model_dir, shared_data, tmp_path):
    path = shared_data / "rewardbench_v1" / "rewardbench_v1_filtered.jsonl"
    ctx = _context(tmp_path, model_dir, [{"name": "rb1", "path": str(path)}])
    result = rb.score_rewardbench(ctx)
    assert result.outputs["scores"] == result.outputs["rb1/scores"]
    assert result.outputs["metrics"] == result.outputs["rb1/metrics"]
    scores = pd.read_parquet(result.outputs["rb1/scores"])
    assert list(scores.columns) == SCORE_COLUMNS and len(scores) == 2985
    assert (scores["correct"] == (scores["score_chosen"] > scores["score_rejected"])).all()
    assert np.isfinite(scores["distance"]).all() and (scores["distance"] >= 0).all()
    assert set(scores["section"]) == set(metrics.V1_SECTIONS)
    report = json.loads(Path(result.outputs["rb1/metrics"]).read_text())
    assert report["format"] == "v1" and report["counts"] == OFFICIAL_COUNTS
    assert set(report["sections"]) == {"Chat", "Chat Hard", "Safety", "Reasoning"}
    assert 0.0 <= report["overall"] <= 1.0 and report["missing"] == {}
    assert result.metrics["rb1/overall"] == pytest.approx(report["overall"])
    assert "rb1/section/Chat_Hard" in result.metrics and "rb1/subset/hep-go" in result.metrics
    bins = pd.read_csv(result.outputs["rb1/distance_bins"])
    assert bins.loc[bins["group"] == "all", "n"].sum() == 2985
    assert (ctx.out_dir / "rb1" / "accuracy_by_distance.png").is_file()


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_synthetic_and_v2_benchmarks_in_one_run(ray_cluster, model_dir, tmp_path):
    v2_file = tmp_path / "rb2_fixture.jsonl"
    v2_file.write_text("".join(json.dumps(r) + "\n" for r in _v2_rows()))
    recorder = Recorder()
    ctx = _context(tmp_path, model_dir, [{"name": "synth", "synthetic": {"n_test": 48}},
                                         {"name": "rb2", "path": str(v2_file)}], recorder)
    result = rb.score_rewardbench(ctx)
    assert result.outputs["scores"] == result.outputs["synth/scores"], "plain keys name the first benchmark"
    assert {"synth/metrics", "rb2/scores", "rb2/metrics", "rb2/distance_bins"} <= set(result.outputs)

    synth = json.loads(Path(result.outputs["synth/metrics"]).read_text())
    assert set(synth["sections"]) == {"Chat", "Chat Hard", "Safety", "Reasoning"}
    assert sum(synth["counts"].values()) == 48
    synth_scores = pd.read_parquet(result.outputs["synth/scores"])
    assert (synth_scores["section"] == synth_scores["subset"].map(synthetic.SECTION_OF_SUBSET)).all()
    # Through Ray or in-process, one scoring path: the same scores.
    rows = synthetic.test_rows_rewardbench(synthetic.SyntheticSpec(n_test=48))
    examples = B.examples_frame(rows, "v1", "s")
    local = B.regroup(examples, scoring.score_locally(B.conversations(examples, "v1"), str(model_dir),
                                                       max_length=128), "v1")
    np.testing.assert_allclose(synth_scores["score_chosen"], local["score_chosen"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(synth_scores["distance"], local["distance"], rtol=1e-4, atol=1e-5)

    v2 = json.loads(Path(result.outputs["rb2/metrics"]).read_text())
    assert v2["format"] == "v2" and set(v2["subsets"]) == set(metrics.V2_SUBSETS) and v2["missing"] == []
    assert v2["ties"]["n_pairs"] == 2.0 and v2["overall"] is not None
    v2_scores = pd.read_parquet(result.outputs["rb2/scores"])
    assert list(v2_scores.columns) == SCORE_COLUMNS
    assert [len(s) for s in v2_scores["score_rejected"]][:3] == [3, 3, 3]
    assert v2_scores.loc[v2_scores["subset"] == "Ties", "correct"].isna().all()

    assert result.metrics["synth/section/Chat_Hard"] == pytest.approx(synth["sections"]["Chat Hard"])
    assert "rb2/subset/Precise_IF" in result.metrics
    assert recorder.metrics == {}, "the runner logs a stage's metrics, once; the stage itself does not"
    logged = {p.rsplit("/", 1)[-1] for p, _ in recorder.artifacts}
    assert {"scores.parquet", "metrics.json", "accuracy_by_distance.csv"} <= logged


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_rm_bench_judgebench_rmb_and_v2_fixtures_through_ray(ray_cluster, model_dir, tmp_path):
    data = Path(__file__).parent / "data" / "benchmarks"
    benches = [{"name": "rmbench", "path": str(data / "rm_bench"), "format": "rm_bench"},
               {"name": "judge", "path": str(data / "judgebench" / "*claude*.jsonl"), "format": "judgebench"},
               {"name": "rmb", "path": str(data / "rmb"), "format": "rmb"},
               {"name": "rb2", "path": str(data / "rewardbench2" / "test.jsonl"), "format": "v2"}]
    result = rb.score_rewardbench(_context(tmp_path, model_dir, benches))
    rm = pd.read_parquet(result.outputs["rmbench/scores"])
    assert len(rm) == 7 and all(len(s) == 3 for s in rm["score_chosen"])
    # Through Ray or in-process, one scoring path: the same per-response scores for RM-Bench.
    fmt, examples, _ = B.load_examples(BenchmarkConfig(**benches[0]))
    local = B.regroup(examples, scoring.score_locally(B.conversations(examples, fmt), str(model_dir),
                                                       max_length=128), fmt)
    np.testing.assert_allclose(np.stack(rm["score_chosen"]), np.stack(local["score_chosen"]), rtol=1e-5, atol=1e-6)
    for name, n in (("judge", 9), ("rmb", 5), ("rb2", 10)):
        assert len(pd.read_parquet(result.outputs[f"{name}/scores"])) == n
        assert result.metrics[f"{name}/quarantined"] == 0.0
    assert {"rmbench/hard", "rmbench/chat/easy", "judge/section/livecodebench", "rmb/section/Helpfulness",
            "rb2/subset/Ties"} <= set(result.metrics)
