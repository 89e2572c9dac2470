"""Tune stage: search-space mapping, concurrency, intervals (unit); the loss comparison on Ray (integration).

The 3-trial ASHA search on the smoke config is asserted end to end in ``test_full.py``."""

import json
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import runner
from pipeline.config import ConfigError, PipelineConfig, flatten, from_flat, load_config
from pipeline import compare as C
from stages import tune as T

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.yaml"
# Two optimizer steps per trial: a validation pass at step 1 (ASHA's rung) and the final one at step 2.
TRIAL_OVERRIDES = ["tune.trial_overrides={train.max_steps: 2}"]


# ------------------------------------------------------------------ unit: pure helpers


@pytest.mark.unit
def test_search_space_maps_each_domain():
    from ray.tune.search.sample import Categorical, Float, Integer

    cfg = load_config(None, ["tune.search_space={loss.beta: {uniform: [0.5, 0.99]}, train.lr: {loguniform: [1e-5, 1e-3]},"
                             " loss.name: {choice: [bt, normbt]}, train.grad_accum: {randint: [1, 4]}}"])
    space = T.search_space(cfg.tune.search_space)
    assert isinstance(space["loss.beta"], Float) and (space["loss.beta"].lower, space["loss.beta"].upper) == (0.5, 0.99)
    assert isinstance(space["train.lr"], Float) and "LogUniform" in type(space["train.lr"].get_sampler()).__name__
    assert isinstance(space["loss.name"], Categorical) and space["loss.name"].categories == ["bt", "normbt"]
    assert isinstance(space["train.grad_accum"], Integer) and space["train.grad_accum"].upper == 4
    for _ in range(20):
        assert 1e-5 <= space["train.lr"].sample() <= 1e-3 and space["train.grad_accum"].sample() in (1, 2, 3)


@pytest.mark.unit
@pytest.mark.parametrize("spec, message", [
    ("{gaussian: [0, 1]}", "unknown key 'gaussian'"), ("{uniform: [1.0]}", r"\[low, high\]"),
    ("{uniform: [2, 1]}", "low < high"), ("{loguniform: [0, 1]}", "low > 0"), ("{choice: []}", "non-empty"),
    ("{randint: [1.5, 3]}", "expects int"), ("0.5", "expects a mapping"), ("{uniform: [0, 1], choice: [1]}", "exactly one")])
def test_search_space_rejects_bad_specs_naming_the_key_when_the_config_loads(spec, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(None, [f"tune.search_space={{loss.beta: {spec}}}"])
    assert "loss.beta" in str(err.value)


@pytest.mark.unit
def test_concurrency_from_cluster_resources():
    cfg = PipelineConfig()  # 2 workers × 0.5 CPU + 0.1 for the trial function, 0.5 CPU kept for Ray Data
    assert T.derive_concurrency({"CPU": 2.0}, cfg) == 1
    assert T.derive_concurrency({"CPU": 8.0}, cfg) == 6  # (8 - 0.5) / 1.1
    assert T.derive_concurrency({"CPU": 1.0}, cfg) == 1  # never below one
    assert T.derive_concurrency({"CPU": 2.0}, from_flat({"train.num_workers": 1}, base=cfg)) == 2
    assert T.derive_concurrency({"CPU": 64.0}, from_flat({"tune.max_concurrent_trials": 3}, base=cfg)) == 3
    gpu = from_flat({"train.use_gpu": True, "train.num_workers": 2}, base=cfg)
    assert T.derive_concurrency({"CPU": 32.0, "GPU": 4.0}, gpu) == 2


@pytest.mark.unit
def test_trials_run_in_process_unless_they_train_on_several_gpus():
    cfg = PipelineConfig()
    assert T.trial_launcher(cfg) == "in_process"
    assert T.trial_launcher(from_flat({"train.use_gpu": True, "train.num_workers": 1}, base=cfg)) == "in_process"
    assert T.trial_launcher(from_flat({"train.use_gpu": True, "train.num_workers": 8}, base=cfg)) == "ray_train"
    assert T.trial_launcher(from_flat({"tune.trial_launcher": "ray_train"}, base=cfg)) == "ray_train"
    # in process, a trial's actor holds its workers' CPUs (no 0.1-CPU driver beside them)
    assert T.trial_resources(cfg, "in_process") == {"cpu": 1.0}
    assert T.trial_resources(cfg, "ray_train") == {"cpu": T.TRIAL_CPUS}
    assert T.derive_concurrency({"CPU": 4.5}, cfg, "in_process") == 4
    assert T.derive_concurrency({"CPU": 4.5}, cfg, "ray_train") == 3
    gpu = from_flat({"train.use_gpu": True, "train.num_workers": 1}, base=cfg)
    assert T.trial_resources(gpu, "in_process") == {"cpu": 0.5, "gpu": 1}
    assert T.derive_concurrency({"CPU": 64.0, "GPU": 3.0}, gpu, "in_process") == 3


@pytest.mark.unit
def test_one_process_trains_the_same_global_batch_and_steps():
    from pipeline.train_loop import one_process_config, one_process_threads, plan_steps

    cfg = from_flat({"train.num_workers": 4, "train.micro_batch_size": 3, "train.grad_accum": 2}, base=PipelineConfig())
    one = one_process_config(cfg)
    assert (one.train.num_workers, one.train.micro_batch_size, one.train.grad_accum) == (1, 12, 2)
    assert plan_steps(one, 1000) == plan_steps(cfg, 1000)
    assert one_process_threads(cfg) == 4  # each worker with 0.5 CPU computed with one thread
    assert one_process_threads(from_flat({"train.cpus_per_worker": 8}, base=cfg)) == 32


@pytest.mark.unit
def test_eval_cadence_gives_asha_a_metric_when_eval_every_is_off():
    assert T.eval_cadence(100, 0, 4) == 25
    assert T.eval_cadence(2, 0, 4) == 1
    assert T.eval_cadence(100, 10, 4) == 10  # a configured cadence is kept


@pytest.mark.unit
def test_t_interval():
    mean, low, high, n = C.t_interval([1.0, 2.0, 3.0])
    half = 4.302652729911275 / math.sqrt(3)  # t_{0.975, 2} · s / √n with s = 1
    assert (mean, n) == (2.0, 3) and low == pytest.approx(2.0 - half) and high == pytest.approx(2.0 + half)
    assert C.t_interval([0.5, 0.5]) == (0.5, 0.5, 0.5, 2)
    mean, low, high, n = C.t_interval([0.7, float("nan")])
    assert (mean, n) == (0.7, 1) and math.isnan(low) and math.isnan(high)
    assert C.t_interval([])[3] == 0


@pytest.mark.unit
def test_compare_table_pairs_the_difference_by_seed():
    # Seed effects shared by both losses: the paired interval is tight although each loss's own is wide.
    records = [{"loss": loss, "seed": s, "val_accuracy": base + shift}
               for s, base in enumerate([0.5, 0.7, 0.9]) for loss, shift in (("bt", 0.0), ("normbt", 0.05))]
    records.append({"loss": "normbt", "seed": 3, "val_accuracy": 0.1})  # no bt partner: not in the difference
    table = C.compare_table(records, ["val_accuracy"], ["bt", "normbt"]).set_index("loss")
    assert list(table.index) == ["bt", "normbt", "diff"]
    assert table.loc["diff", "mean"] == pytest.approx(0.05) and table.loc["diff", "n"] == 3
    assert table.loc["diff", "ci_high"] - table.loc["diff", "ci_low"] == pytest.approx(0.0, abs=1e-9)
    assert table.loc["bt", "ci_high"] - table.loc["bt", "ci_low"] > 0.5
    assert table.loc["normbt", "n"] == 4


@pytest.mark.unit
def test_compare_grid_and_labels():
    cfg = load_config(None, ["tune.seeds=2", "train.seed=10",
                             "tune.losses=[{loss.name: bt}, {loss.name: normbt, loss.beta: 0.5}]"])
    grid = C.compare_grid(cfg)
    assert [(g["loss"], g["seed"]) for g in grid] == [("bt", 10), ("bt", 11), ("name=normbt,beta=0.5", 10),
                                                      ("name=normbt,beta=0.5", 11)]
    assert grid[3]["overrides"] == {"loss.name": "normbt", "loss.beta": 0.5, "train.seed": 11, "model.seed": 11}
    with pytest.raises(ValueError, match="at least two"):
        C.compare_grid(load_config(None, ["tune.losses=[{loss.name: bt}]"]))


@pytest.mark.unit
def test_each_setting_searches_its_own_lr_on_validation_then_trains_its_seeds_there():
    cfg = load_config(None, ["tune.seeds=2", "tune.compare_lr_grid=[1e-4, 3e-4]", "tune.compare_lr_seeds=2",
                             "tune.losses=[{loss.name: bt}, {loss.name: normbt}, {loss.name: bt, train.lr: 5e-5}]",
                             "tune.trial_overrides={train.max_steps: 3}"])
    search = C.lr_search_grid(cfg)  # the setting with its own lr is not searched
    assert [(g["loss"], g["lr"], g["seed"]) for g in search] == [
        ("bt", 1e-4, 0), ("bt", 1e-4, 1), ("bt", 3e-4, 0), ("bt", 3e-4, 1),
        ("normbt", 1e-4, 0), ("normbt", 1e-4, 1), ("normbt", 3e-4, 0), ("normbt", 3e-4, 1)]
    assert search[2]["overrides"] == {"loss.name": "bt", "train.lr": 3e-4, "train.seed": 0, "model.seed": 0}
    val = {("bt", 1e-4): [0.6, 0.7], ("bt", 3e-4): [0.7, 0.6], ("normbt", 1e-4): [0.5, 0.6],
           ("normbt", 3e-4): [0.8, float("nan")]}  # bt: a tie (the smaller lr wins); normbt: one seed failed
    records = [{"loss": g["loss"], "lr": g["lr"], "seed": g["seed"], "val_accuracy": val[(g["loss"], g["lr"])][g["seed"]],
                "status": "COMPLETED" if g["seed"] == 0 or g["loss"] == "bt" else "ERROR"} for g in search]
    table, chosen = C.choose_lrs(records, "val_accuracy")
    assert chosen == {"bt": 1e-4, "normbt": 3e-4}
    assert table.set_index(["loss", "lr"]).loc[("normbt", 3e-4), "n"] == 1
    assert table["chosen"].sum() == 2
    grid = C.compare_grid(cfg, chosen)
    assert {g["loss"]: g["lr"] for g in grid} == {"bt": 1e-4, "normbt": 3e-4, "name=bt,train.lr=5e-5": 5e-5}
    assert grid[2]["overrides"]["train.lr"] == 3e-4 and grid[2]["setting"] == {"loss.name": "normbt"}
    assert {g["lr"] for g in C.compare_grid(cfg)} == {cfg.train.lr, 5e-5}  # no search: train.lr, or the setting's own
    with pytest.raises(RuntimeError, match="normbt"):
        C.choose_lrs([{**r, "status": "ERROR"} if r["loss"] == "normbt" else r for r in records], "val_accuracy")
    with pytest.raises(ConfigError, match="compare_lr_grid"):
        load_config(None, ["tune.compare_lr_grid=[0.0]"])


@pytest.mark.unit
def test_trial_status_and_best_trial_choice():
    from types import SimpleNamespace

    def result(trial, metrics, error=None):
        return SimpleNamespace(metrics={"trial_id": trial, **metrics}, config={"train.lr": 0.1}, error=error,
                               path=f"/x/normbt_trial_{trial}_0_lr=0.1", metrics_dataframe=None)

    records = [T._trial_record(r, "val_accuracy") for r in (
        result("ab12c_00000", {"done": True, "final": 1, "val_accuracy": 0.6, T.CHECKPOINT_KEY: "/ck/0"}),
        result("ab12c_00001", {"done": True, "final": 0, "val_accuracy": 0.9}),  # stopped early by ASHA
        result("ab12c_00002", {"done": True, "final": 1, "val_accuracy": 0.7, T.CHECKPOINT_KEY: "/ck/2"}),
        result("ab12c_00003", {}, error=RuntimeError("worker died\nTrainingFailedError: boom")),
        result("ab12c_00004", {"done": False, "val_accuracy": 0.95}))]  # cut by Ctrl-C
    assert [r["status"] for r in records] == ["COMPLETED", "STOPPED", "COMPLETED", "ERROR", "UNFINISHED"]
    assert records[3]["error"] == "TrainingFailedError: boom" and records[1]["checkpoint"] == ""
    best = T._best(records, "val_accuracy")
    assert best["trial_id"] == "ab12c_00002" and best["checkpoint"] == "/ck/2"  # completed beats a stopped 0.9
    assert T._best([records[1]], "val_accuracy")["trial_id"] == "ab12c_00001"  # fallback: none completed


class _Collect(logging.Handler):
    """What a logger lets through, read as text and then forgotten."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.texts: list[str] = []

    def emit(self, record):
        self.texts.append(record.getMessage())

    def read(self) -> str:
        text, self.texts = "\n".join(self.texts), []
        return text


@pytest.fixture
def tune_generator_warnings():
    # A handler on Tune's own logger, not a captured stream: Ray's stream handler keeps whichever stderr it first
    # saw, which in a full test run is an earlier test's, so capsys saw nothing there (CI, stop 36). Nor caplog:
    # its handler sits on the root logger, and Ray's "ray" logger does not propagate to it.
    seen = _Collect()
    tune_log = logging.getLogger("ray.tune.search.variant_generator")
    tune_log.addHandler(seen)
    yield seen
    tune_log.removeHandler(seen)


@pytest.mark.integration  # imports Ray Tune (no cluster)
def test_a_start_outside_the_searched_domain_is_said_in_words_not_as_tunes_warning(tune_generator_warnings):
    """The default starts its search at lr 1e-5, below the searched [5e-5, 2e-4]: Tune's generator warned
    "Pre-set value `1e-05` is not within valid values" in the user's terminal. The stage says it in words and drops
    that warning while its search runs; other warnings, and the same one afterwards, still print."""
    from types import SimpleNamespace

    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    cfg = load_config(str(Path(__file__).resolve().parents[1] / "configs" / "default.yaml"), [])
    start = {k: v for k, v in flatten(cfg).items() if k in cfg.tune.search_space}
    tune.register_trainable("start_probe", lambda config: None)  # no Ray cluster: the generator only checks the name
    seen = tune_generator_warnings

    def first_trial(point):
        generator = BasicVariantGenerator(points_to_evaluate=[point], random_state=0)
        generator.add_configurations({"t": {"run": "start_probe", "config": T.search_space(cfg.tune.search_space),
                                            "num_samples": 2}})
        return generator.next_trial()

    first_trial(start)
    assert "Pre-set value `1e-05` is not within valid values of parameter `train.lr`" in seen.read()
    said = []
    outside = T._say_start_outside(SimpleNamespace(log=said.append), T.search_space(cfg.tune.search_space), start)
    assert outside == ["train.lr"] and said == [
        "  tune: the search's first trial is the configured train.lr=1e-05, outside the searched domain (the start "
        "the search has to beat, not a value it draws)"]
    with T._start_warning_dropped(outside):
        assert first_trial(start).config["train.lr"] == 1e-5  # still tried first, as configured
        assert "Pre-set value" not in seen.read()
        first_trial({**start, "loss.beta": 2.0})  # a key the stage did not speak for keeps Tune's warning
        assert "parameter `loss.beta`" in seen.read()
    first_trial(start)
    assert "parameter `train.lr`" in seen.read(), "the filter ends with the search"
    assert T._say_start_outside(SimpleNamespace(log=said.append), T.search_space(cfg.tune.search_space),
                                {**start, "train.lr": 1e-4}) == []
    assert len(said) == 1  # nothing to say when the start lies inside


@pytest.mark.unit
def test_compare_plot_is_written(tmp_path):
    table = C.compare_table([{"loss": loss, "seed": s, "val_accuracy": 0.6 + 0.1 * s + (loss == "normbt") * 0.02,
                              "synthetic/section/Chat": 0.9} for s in range(3) for loss in ("bt", "normbt")],
                            ["val_accuracy", "synthetic/section/Chat"], ["bt", "normbt"])
    path = C.plot_compare(table, tmp_path / "compare.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------ integration: Tune over Ray Train


@pytest.fixture(scope="module")
def data_manifest(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("tune-data")
    cfg = load_config(SMOKE, [f"run.root={root}", "tracking.enabled=false"])
    return runner.run_pipeline(cfg, stages=("data",), log=lambda _: None)["data"]


def _run_tune(tmp_path, data_manifest, overrides):
    cfg = load_config(SMOKE, [f"run.root={tmp_path}", "run.name=tune", "tracking.enabled=true", *TRIAL_OVERRIDES,
                              *overrides])
    runner.write_manifest(tmp_path / "tune", data_manifest)
    return cfg, runner.run_pipeline(cfg, stages=("tune",), log=print)["tune"]


def _child_runs(cfg, parent_id):
    from mlflow import MlflowClient

    from pipeline.tracking import PARENT_TAG, resolve_tracking_uri

    client = MlflowClient(resolve_tracking_uri(cfg))
    experiment = client.get_run(parent_id).info.experiment_id
    return client.search_runs([experiment], filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'")


def _assert_cpus_released(ray, timeout_s=30.0):
    """Trap 4: no trial may leave CPUs reserved (a stopped trial's placement group) for what runs next."""
    import time

    deadline = time.monotonic() + timeout_s
    while ray.available_resources().get("CPU", 0.0) < ray.cluster_resources()["CPU"] - 1e-6:
        assert time.monotonic() < deadline, f"CPUs still reserved: {ray.available_resources()}"
        time.sleep(1.0)


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_search_trials_train_one_after_another_in_one_reused_process(tmp_path, data_manifest, ray_session):
    """The default launcher: no Ray Train run per trial. Both trials of the search train in the same Tune actor
    (imports and process start paid once), report to ASHA, and the best one's checkpoint holds the export."""
    cfg, manifest = _run_tune(tmp_path, data_manifest, ["tune.num_samples=2"])
    trials = pd.read_csv(manifest.outputs["trials"])
    assert len(trials) == 2 and set(trials["status"]) <= {"COMPLETED", "STOPPED"}
    assert (trials["status"] == "COMPLETED").any()
    assert Path(manifest.outputs["best_checkpoint"], "model", "config.json").is_file()
    runs = _child_runs(cfg, manifest.mlflow_run_id)
    assert len(runs) == 2
    assert {r.data.tags["tune.launcher"] for r in runs} == {"in_process"}
    assert len({r.data.tags["tune.pid"] for r in runs}) == 1, "the second trial reused the first one's process"
    assert all(r.info.status == "FINISHED" or r.data.tags.get("tune.status") == "STOPPED" for r in runs)
    finished = [r for r in runs if "phase/steps_s" in r.data.metrics]
    assert finished and all(r.data.metrics["step"] == 2 for r in finished)
    _assert_cpus_released(ray_session)


@pytest.mark.integration
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("launcher", ["in_process", pytest.param("ray_train", marks=pytest.mark.slow)])
def test_compare_reports_means_and_paired_intervals(tmp_path, data_manifest, ray_session, launcher):
    """Both trial launchers: trials in Tune's own process (the CPU default), and every trial a TorchTrainer (what
    trials on several GPUs use; 9 min on 2 cores, so in the slow tier)."""
    bench = json.dumps([{"name": "synthetic", "synthetic": {"n_test": 32}}])
    cfg, manifest = _run_tune(tmp_path, data_manifest, [
        "tune.mode=compare", "tune.seeds=2", f"rewardbench.benchmarks={bench}", "rewardbench.max_length=128",
        "rewardbench.batch_size=64", f"tune.trial_launcher={launcher}", "tune.compare_lr_grid=[1e-4, 3e-4]"])
    assert set(manifest.outputs) == {"compare_table", "compare_plot", "best_config", "trials", "gradient_plot",
                                     "paired_stats", "shared_bins", "length_controls", "shared_bin_edges",
                                     "lr_search"}
    lr_search = pd.read_csv(manifest.outputs["lr_search"])  # each loss's lr chosen on validation first
    assert len(lr_search) == 4 and lr_search.groupby("loss")["chosen"].sum().to_dict() == {"bt": 1, "normbt": 1}
    chosen = dict(zip(lr_search.loc[lr_search["chosen"], "loss"], lr_search.loc[lr_search["chosen"], "lr"]))
    table = pd.read_csv(manifest.outputs["compare_table"])
    assert list(table.columns) == ["loss", "metric", "mean", "ci_low", "ci_high", "n", "lr"]
    assert table.groupby("loss")["lr"].first().dropna().to_dict() == pytest.approx(chosen)
    assert set(table["loss"]) == {"bt", "normbt", "diff"}
    metrics = set(table["metric"])
    assert {"val_accuracy", "synthetic/overall", "grad/distance_slope"} <= metrics
    assert any(m.startswith("synthetic/section/") for m in metrics)
    for loss in ("bt", "normbt", "diff"):
        assert set(table.loc[table["loss"] == loss, "metric"]) == metrics
    assert (table["n"] == 2).all()
    assert np.isfinite(table[["mean", "ci_low", "ci_high"]].to_numpy()).all()
    assert ((table["ci_low"] <= table["mean"] + 1e-12) & (table["mean"] <= table["ci_high"] + 1e-12)).all()
    wide = table.pivot(index="metric", columns="loss", values="mean")
    np.testing.assert_allclose(wide["diff"], wide["normbt"] - wide["bt"], atol=1e-9)  # every seed paired
    assert Path(manifest.outputs["compare_plot"]).stat().st_size > 0
    assert Path(manifest.outputs["gradient_plot"]).stat().st_size > 0

    # pair-level evidence: 32 synthetic pairs x 2 seeds, both losses binned by the same reference distances
    paired = pd.read_csv(manifest.outputs["paired_stats"]).set_index("scope")
    everything = paired.loc["all"]
    assert (everything["loss"], everything["versus"], everything["n_pairs"], everything["n_seeds"]) == \
        ("normbt", "bt", 32, 2)
    assert everything["ci_low"] <= everything["diff"] <= everything["ci_high"] and everything["mde"] >= 0
    assert 0.0 <= everything["p_value"] <= 1.0
    bins = pd.read_csv(manifest.outputs["shared_bins"])
    per_loss = bins.pivot(index="bin", columns="loss", values="n_pairs")
    assert (per_loss["bt"] == per_loss["normbt"]).all() and per_loss["bt"].sum() == 32
    lengths = pd.read_csv(manifest.outputs["length_controls"]).set_index("section")
    assert lengths.loc["all", "n"] == 32 and 0.0 <= lengths.loc["all", "longer_wins"] <= 1.0
    assert {"accuracy:bt", "accuracy:normbt"} <= set(lengths.columns)

    trials = pd.read_csv(manifest.outputs["trials"])
    assert sorted(zip(trials["loss"], trials["seed"])) == [("bt", 0), ("bt", 1), ("normbt", 0), ("normbt", 1)]
    assert (trials["status"] == "COMPLETED").all() and trials["synthetic/overall"].notna().all()
    winner = "normbt" if wide.loc["val_accuracy", "normbt"] > wide.loc["val_accuracy", "bt"] else "bt"
    assert json.loads(Path(manifest.outputs["best_config"]).read_text()) == {"loss.name": winner,
                                                                             "train.lr": chosen[winner]}
    assert trials.groupby("loss")["lr"].first().to_dict() == pytest.approx(chosen)
    assert manifest.metrics["compare/diff/val_accuracy_mean"] == pytest.approx(wide.loc["val_accuracy", "diff"])
    runs = _child_runs(cfg, manifest.mlflow_run_id)  # 4 lr-search trials (validation only) and 4 compare trials
    assert len(runs) == 8 and sum("synthetic/overall" in r.data.metrics for r in runs) == 4
    _assert_cpus_released(ray_session)


@pytest.mark.unit
def test_a_rerun_reads_back_the_scores_it_finished_and_scores_only_the_rest(tmp_path, monkeypatch):
    """A compare run stopped while scoring (10 models × 9 min on real data) scored every model again when rerun;
    now a benchmark whose score files a finished scoring marked (same model, same stage hash) is read back, and a
    half-written or differently-keyed one is scored again."""
    import dataclasses
    from types import SimpleNamespace

    import pipeline.benchmarks as B
    from pipeline import tracking
    from pipeline.stage import StageContext

    calls = []

    def fake_score(bench, model_path, ctx):
        calls.append((bench.name, model_path))
        folder = ctx.out_dir / bench.name
        folder.mkdir(parents=True, exist_ok=True)
        frame = pd.DataFrame({"id": ["p1", "p2"], "correct": [1.0, float(len(calls) % 2)]})
        frame.to_parquet(folder / "scores.parquet")
        (folder / "metrics.json").write_text(json.dumps({"length_controls": {"all": {"longer_wins": 0.5}}}))
        return {f"{bench.name}/scores": str(folder / "scores.parquet")}, {f"{bench.name}/overall": frame.correct.mean()}

    monkeypatch.setattr(B, "score_benchmark", fake_score)
    checkpoint = tmp_path / "checkpoint"
    (checkpoint / "model").mkdir(parents=True)
    lines = []
    ctx = StageContext(cfg=PipelineConfig(), run_dir=tmp_path, out_dir=tmp_path / "tune", upstream={},
                       tracker=tracking.RunLogger(None, None), log=lines.append)
    trial = {"loss": "bt", "seed": 0, "checkpoint": str(checkpoint), "mlflow_run_id": ""}
    benches = [SimpleNamespace(name="hh"), SimpleNamespace(name="rb")]

    first, _ = T._score_trial(ctx, trial, benches, "gradients.csv", "hash-1")
    assert [c[0] for c in calls] == ["hh", "rb"]
    (tmp_path / "tune" / "scores" / "bt-seed0" / "rb" / T.SCORED_MARKER).unlink()  # stopped before rb was marked
    again, _ = T._score_trial(ctx, trial, benches, "gradients.csv", "hash-1")
    assert [c[0] for c in calls] == ["hh", "rb", "rb"], "hh read back, the unmarked rb scored again"
    assert list(again) == ["hh", "rb"] and again["hh"][0] == first["hh"][0]
    pd.testing.assert_frame_equal(again["hh"][1], first["hh"][1])
    assert any("hh for bt-seed0 already scored" in line for line in lines)
    T._score_trial(ctx, trial, benches, "gradients.csv", "hash-2")  # another stage hash: nothing reused
    assert [c[0] for c in calls] == ["hh", "rb", "rb", "hh", "rb"]
    T._score_trial(ctx, {**trial, "checkpoint": str(tmp_path)}, benches, "gradients.csv", "hash-2")
    assert len(calls) == 7, "another checkpoint: scored again"

    def stopped_midway(bench, model_path, ctx):
        fake_score(bench, model_path, ctx)
        raise KeyboardInterrupt  # the files are rewritten, the marker not yet
    monkeypatch.setattr(B, "score_benchmark", stopped_midway)
    with pytest.raises(KeyboardInterrupt):
        T._score_trial(ctx, trial, benches, "gradients.csv", "hash-1")  # hh's files now hold this attempt's scores
    monkeypatch.setattr(B, "score_benchmark", fake_score)
    T._score_trial(ctx, {**trial, "checkpoint": str(tmp_path)}, benches, "gradients.csv", "hash-2")
    assert [c[0] for c in calls[8:]] == ["hh"], "hh's old marker went before its files changed; rb's still holds"
    calls.clear()

    ref_ctx = dataclasses.replace(ctx, cfg=from_flat({"tune.reference_model": str(checkpoint / "model")}, base=ctx.cfg))
    T._reference_scores(ref_ctx, benches, "h")
    reference_again, name = T._reference_scores(ref_ctx, benches, "h")
    assert len(calls) == 2, "the reference model scored each benchmark once"
    assert reference_again["hh"].length_controls == {"all": {"longer_wins": 0.5}}
    assert name == str(checkpoint / "model")

