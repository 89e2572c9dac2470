"""The evidence a BT vs NormBT comparison rests on: paired statistics over pairs, distance bins shared by both
models, length-only controls, and the gradient mechanism the paper claims."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline import benchmarks, compare, losses, metrics, modeling

pytestmark = pytest.mark.unit


# ---------------------------------------------------------------- paired bootstrap, McNemar, MDE

def test_conditional_bootstrap_agrees_with_the_exact_bootstrap_distribution_on_a_small_table():
    a = np.array([[1, 1], [0, 1], [1, 0], [0, 0], [1, 1]], dtype=float)  # 5 pairs x 2 seeds
    b = np.array([[1, 1], [1, 1], [1, 1], [0, 1], [0, 1]], dtype=float)
    per_pair = (b - a).mean(axis=1)
    n = len(per_pair)
    # brute force: every one of the n^n resamples of pairs, each equally likely
    exact = np.array([per_pair[list(idx)].mean() for idx in itertools.product(range(n), repeat=n)])
    got = compare.conditional_bootstrap(a, b, n_boot=40_000, seed=1)
    assert got["diff"] == pytest.approx(per_pair.mean())
    assert got["se"] == pytest.approx(exact.std(), rel=0.03)
    step = 1.0 / (2 * n)  # the resampled means live on this grid: allow one grid step
    assert abs(got["ci_low"] - np.quantile(exact, 0.025)) <= step + 1e-12
    assert abs(got["ci_high"] - np.quantile(exact, 0.975)) <= step + 1e-12
    assert got["mde"] == pytest.approx((compare.Z_95 + compare.Z_80) * got["se"])
    assert (got["n_pairs"], got["n_seeds"]) == (5, 2)


def test_paired_bootstrap_keeps_a_pairs_seeds_together_and_skips_nan_rows():
    a = np.array([[1, 0], [1, 1], [np.nan, 1]])
    b = np.array([[1, 1], [0, 1], [1, 1]])
    got = compare.paired_bootstrap(a, b)
    assert got["n_pairs"] == 2 and got["diff"] == pytest.approx(((0.5) + (-0.5)) / 2)
    with pytest.raises(ValueError, match="shapes"):
        compare.paired_bootstrap(a, b[:2])


def test_paired_bootstrap_variance_parts_match_a_hand_computation():
    d = np.array([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 1.0, 1.0], [0.0, -1.0, 0.0]])  # b - a, 4 pairs x 3 seeds
    got = compare.paired_bootstrap(np.zeros_like(d), d)
    rows, cols = d.mean(axis=1), d.mean(axis=0)
    cell = ((d - rows[:, None] - cols[None, :] + d.mean()) ** 2).sum() / (3 * 2)
    assert got["se_seeds"] ** 2 == pytest.approx(cols.var(ddof=1) / 3)
    assert got["se_pairs"] ** 2 == pytest.approx(max(0.0, rows.var(ddof=1) - cell / 3) / 4)
    assert got["se"] ** 2 == pytest.approx(got["se_seeds"] ** 2 + got["se_pairs"] ** 2)
    from scipy import stats
    half = stats.t.ppf(0.975, got["df"]) * got["se"]
    assert (got["ci_low"], got["ci_high"]) == pytest.approx((d.mean() - half, d.mean() + half))
    one_seed = compare.paired_bootstrap(np.zeros((4, 1)), d[:, :1])
    assert one_seed["diff"] == pytest.approx(0.5) and math.isnan(one_seed["ci_low"]) and math.isnan(one_seed["se"])


def _simulated_scores(rng, n_pairs, n_seeds, seed_sd, true_diff):
    """Two losses' 1/0 correctness ``[n_pairs, n_seeds]``: a pair's difficulty shared by both, a small
    pair-by-loss propensity, a per-training-run (seed) shift of ``seed_sd`` accuracy, and ``true_diff``."""
    base = rng.uniform(0.3, 0.8, (n_pairs, 1))

    def scores(shift):
        p = base + rng.normal(0, 0.05, (n_pairs, 1)) + rng.normal(0, seed_sd, (1, n_seeds)) + shift
        return (rng.random((n_pairs, n_seeds)) < np.clip(p, 0, 1)).astype(float)

    return scores(0.0), scores(true_diff)


def test_the_interval_over_training_runs_covers_a_zero_difference_and_detects_five_points():
    """Calibration by simulation: no true difference, seed effects 0-3 accuracy points (100 simulations each),
    5 seeds of 1,000 pairs: the 95% interval covers 0 in >= 93% of the 400. A true 5-point difference at the
    seeds ``seeds_for_mde`` asks for (from one pilot run of 5 seeds): detected in >= 75% of 400."""
    rng = np.random.default_rng(0)
    covered = {}
    for i in range(400):
        seed_sd = (0.0, 0.01, 0.02, 0.03)[i % 4]
        got = compare.paired_bootstrap(*_simulated_scores(rng, 1000, 5, seed_sd, 0.0))
        covered.setdefault(seed_sd, []).append(got["ci_low"] <= 0.0 <= got["ci_high"])
    rates = {sd: float(np.mean(c)) for sd, c in covered.items()}
    assert np.mean([c for cs in covered.values() for c in cs]) >= 0.93, f"coverage by seed sd: {rates}"
    pilot = compare.paired_bootstrap(*_simulated_scores(rng, 1000, 5, 0.03, 0.05))
    seeds = int(pilot["seeds_for_mde"])
    detected = [compare.paired_bootstrap(*_simulated_scores(rng, 1000, seeds, 0.03, 0.05))["ci_low"] > 0.0
                for _ in range(400)]
    assert np.mean(detected) >= 0.75, f"detected {np.mean(detected)} at {seeds} seeds"


def test_holm_adjusts_a_family_of_p_values_step_down():
    got = compare.holm([0.01, 0.04, 0.03, np.nan, 0.005])  # m = 4 finite: 0.005*4, 0.01*3, 0.03*2, 0.04*1
    assert got[[4, 0, 2, 1]] == pytest.approx([0.02, 0.03, 0.06, 0.06])  # the last is raised to stay monotone
    assert math.isnan(got[3])
    assert compare.holm([0.5, 0.9])[1] == 1.0
    table = pd.DataFrame({"loss": ["n", "n", "m"], "versus": "bt", "p_value": [0.01, 0.02, 0.01]})
    assert compare.holm_by_comparison(table)["p_holm"].tolist() == pytest.approx([0.02, 0.02, 0.01])


def test_mcnemar_counts_each_pair_once_and_gives_the_exact_binomial_p_value():
    one_seed_a = np.array([[1], [1], [0], [0], [0], [0], [0], [1]], dtype=float)
    one_seed_b = np.array([[0], [1], [1], [1], [1], [1], [1], [1]], dtype=float)
    got = compare.mcnemar(one_seed_a, one_seed_b)  # the textbook case: 1 pair only a, 5 only b
    assert (got["only_a"], got["only_b"], got["pairs"]) == (1, 5, 8)
    assert got["p_value"] == pytest.approx(2 * (1 + 6) / 64)  # 2 * P(X <= 1 | n = 6, p = 1/2)
    # two seeds: a pair counts once, by which loss is right more often over its seeds
    a = np.array([[1, 1], [1, 0], [0, 0], [0, 0], [0, 0], [1, 1]], dtype=float)
    b = np.array([[1, 0], [1, 1], [1, 1], [1, 1], [1, 0], [1, 1]], dtype=float)
    got = compare.mcnemar(a, b)
    assert (got["only_a"], got["only_b"], got["pairs"]) == (1, 4, 6)
    assert got["p_value"] == pytest.approx(2 * (1 + 5) / 32)
    assert compare.mcnemar(a, a)["p_value"] == 1.0


def test_a_failed_trial_costs_its_seed_not_every_pair():
    frames = {(lab, s): pd.DataFrame({"id": ["x", "y", "y"], "section": "Chat", "correct": c})
              for lab, s, c in [("bt", 0, [1, 0, 1]), ("bt", 1, [1, 1, 0]), ("normbt", 0, [1, 1, 1])]}
    pairs, scores = compare.align_pairs(frames, ["bt", "normbt"], [0, 1])  # normbt seed 1 failed
    assert pairs["id"].tolist() == ["x", "y", "y"]  # a repeated id (RewardBench 2 Ties) is matched by occurrence
    assert np.isnan(scores["normbt"][:, 1]).all()
    row = compare.paired_table(pairs, scores, n_boot=200).set_index("scope").loc["all"]
    assert row["n_pairs"] == 3 and row["n_seeds"] == 1 and row["diff"] == pytest.approx(1 / 3)


# ---------------------------------------------------------------- shared distance bins

def test_pair_evidence_survives_a_benchmark_that_repeats_an_id(tmp_path):
    """RewardBench 2's Ties rows share an id: the reference model's distances must be matched to the pairs by id
    and occurrence (as ``align_pairs`` matches the trained models' rows), not by a ``.loc`` on a repeated id."""
    from pipeline.compare_analysis import Reference, pair_evidence, write_pair_evidence

    ids = ["a", "tie", "tie", "tie", "b", "c"]
    sections = ["Chat", "Ties", "Ties", "Ties", "Chat", "Math"]
    reference = pd.DataFrame({"id": ids, "section": sections, "correct": 1.0,
                              "distance": [0.5, 1.0, 2.0, 3.0, 4.0, 5.0]})
    controls = {"all": {"longer_wins": 0.5, "shorter_wins": 0.5, "n": 6}}
    rng = np.random.default_rng(0)
    score_files = {"rb2": {(lab, s): pd.DataFrame({"id": ids, "section": sections,
                                                   "correct": rng.integers(0, 2, 6).astype(float)})
                           for lab in ("bt", "normbt") for s in (0, 1)}}
    evidence = pair_evidence(score_files, {"rb2": Reference(reference, controls)}, ["bt", "normbt"], [0, 1],
                             n_boot=50, seed=0, distance_bins=2)
    bins = evidence["shared_bins"]
    assert bins.groupby("loss")["n_pairs"].sum().to_dict() == {"bt": 6, "normbt": 6}
    assert evidence["edges"]["rb2"] == pytest.approx([0.5, 2.5, 5.0])  # quantiles of all six, the ties included
    low_bin = bins[(bins["bin"] == 0) & (bins["loss"] == "bt")]
    assert low_bin["n_pairs"].item() == 3  # a, tie#0 (1.0), tie#1 (2.0): each occurrence keeps its own distance
    paired = evidence["paired_stats"].set_index("scope")
    assert paired.loc["all", "n_pairs"] == 6 and 0.0 <= paired.loc["all", "p_holm"] <= 1.0
    files = write_pair_evidence(evidence, tmp_path, "ref")
    assert json.loads(files["shared_bin_edges"].read_text())["reference_model"] == "ref"


def test_reference_distances_follow_each_occurrence_of_a_repeated_id():
    frames = {("bt", 0): pd.DataFrame({"id": ["t", "x", "t"], "section": "Ties", "correct": [1.0, 0.0, 1.0]})}
    pairs, _ = compare.align_pairs(frames, ["bt"], [0])
    reference = pd.DataFrame({"id": ["t", "x", "t"], "distance": [1.0, 2.0, 3.0]})
    assert compare.reference_distances(pairs, reference).tolist() == [1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match=r"lack 1 compared pair.*t#1"):
        compare.reference_distances(pairs, reference.iloc[:2])


def test_shared_bins_hold_the_same_pairs_for_every_model_and_count_disagreements():
    reference = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    edges = compare.shared_bin_edges(reference, 2)
    bins = compare.assign_bins(reference, edges)
    assert bins.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    bt = np.array([[0, 1], [0, 0], [1, 1], [1, 1], [1, 1], [1, 0], [1, 1], [1, 1]], dtype=float)
    normbt = np.array([[1, 1], [1, 0], [1, 1], [0, 1], [1, 1], [1, 1], [1, 1], [1, 1]], dtype=float)
    table = compare.shared_bin_table(bins, edges, {"bt": bt, "normbt": normbt})
    by = table.set_index(["bin", "loss"])
    assert by.loc[(0, "bt"), "n_pairs"] == by.loc[(0, "normbt"), "n_pairs"] == 4  # identical bins for both
    assert by.loc[(0, "bt"), "accuracy"] == pytest.approx(5 / 8)
    assert by.loc[(0, "normbt"), "accuracy"] == pytest.approx(6 / 8)
    # bin 0 cells where exactly one is right: (0,0) normbt, (1,0) normbt, (3,0) bt -> normbt wins 2 of 3
    assert by.loc[(0, "normbt"), "disagree"] == 3 and by.loc[(0, "normbt"), "won_share"] == pytest.approx(2 / 3)
    assert by.loc[(1, "normbt"), "disagree"] == 1 and by.loc[(1, "normbt"), "won_share"] == 1.0
    assert math.isnan(by.loc[(0, "bt"), "disagree"])


# ---------------------------------------------------------------- length controls

def _rb_rows():
    """RewardBench v1 rows (its real fields), lengths chosen for a hand count."""
    return [
        {"prompt": "p1", "chosen": "a long answer", "chosen_model": "m1", "rejected": "short",
         "rejected_model": "m2", "subset": "alpacaeval-easy", "id": 1},
        {"prompt": "p2", "chosen": "tiny", "chosen_model": "m1", "rejected": "a much longer one",
         "rejected_model": "m2", "subset": "alpacaeval-easy", "id": 2},
        {"prompt": "p3", "chosen": "same", "chosen_model": "m1", "rejected": "size",
         "rejected_model": "m2", "subset": "refusals-dangerous", "id": 3},
        {"prompt": "p4", "chosen": "no", "chosen_model": "m1", "rejected": "I will help with that",
         "rejected_model": "m2", "subset": "refusals-dangerous", "id": 4},
    ]


def test_length_controls_match_a_hand_count():
    rows = _rb_rows()
    examples = benchmarks.examples_frame(rows, "v1", "rb")
    frame = pd.DataFrame({"correct": [1.0, 0.0, 1.0, 1.0], "section": [benchmarks.section_of(r["subset"])
                                                                       for r in rows]})
    got = benchmarks.length_controls(examples, frame, "v1")
    assert got["Chat"] == {"longer_wins": 0.5, "shorter_wins": 0.5, "n": 2}
    assert got["Safety"] == {"longer_wins": 0.25, "shorter_wins": 0.75, "n": 2}  # a tie counts one half
    assert got["all"] == {"longer_wins": 0.375, "shorter_wins": 0.625, "n": 4}


def test_best_of_k_length_pick_shares_credit_among_tied_lengths():
    assert benchmarks.length_credit(["abcd"], ["ab", "abcd", "a"], "v2", longer=True) == 0.5
    assert benchmarks.length_credit(["abcd"], ["ab", "abc", "a"], "v2", longer=True) == 1.0
    assert benchmarks.length_credit(["abcd"], ["ab", "abc", "a"], "v2", longer=False) == 0.0


def test_longer_wins_nearly_every_alpacaeval_easy_pair_of_the_real_rewardbench_file(shared_data):
    path = shared_data / "rewardbench_v1" / "rewardbench_v1_filtered.jsonl"
    rows = [r for r in map(json.loads, path.read_text().splitlines()) if r["subset"] == "alpacaeval-easy"]
    examples = benchmarks.examples_frame(rows, "v1", "rb")
    frame = pd.DataFrame({"correct": np.ones(len(rows)), "section": "Chat"})
    got = benchmarks.length_controls(examples, frame, "v1")["all"]
    # counted in characters: 99 of the file's 100 pairs longer, one of equal length (half credit)
    assert got["n"] == 100 and got["longer_wins"] == pytest.approx(0.995)


# ---------------------------------------------------------------- the gradient mechanism

def _tiny_pairs(n: int = 24):
    tok = modeling.load_tokenizer("tiny:llama")
    model = modeling.build_reward_model("tiny:llama", tok, seed=0)
    rng = np.random.default_rng(0)
    words = ["good", "bad", "maybe", "yes", "no", "the", "answer", "is", "because", "so"]
    texts = [" ".join(rng.choice(words, size=rng.integers(2, 12))) for _ in range(2 * n)]
    ids = [tok(t)["input_ids"] for t in texts]
    batch = modeling.collate_pairs(ids[:n], ids[n:], tok.pad_token_id)
    return model, batch


def test_pair_gradient_norm_is_the_score_heads_real_per_pair_gradient():
    model, batch = _tiny_pairs(6)
    rc, rr, hc, hr = modeling.forward_pairs(model, batch)
    d = losses.pair_distances(hc, hr)
    mu = float(d.mean())
    weights = mu / (d + 1e-3)
    norms = losses.pair_gradient_norms(rc, rr, d, weights=weights)
    head = modeling.score_head(model)
    for i in range(3):
        model.zero_grad()
        rc, rr, _, _ = modeling.forward_pairs(model, batch)
        (weights[i] * losses.bt_per_pair(rc[i:i + 1], rr[i:i + 1])).sum().backward()
        assert head.weight.grad.norm().item() == pytest.approx(norms[i].item(), rel=1e-4)


def test_bt_gradient_grows_with_distance_and_normbt_flattens_it():
    model, batch = _tiny_pairs()
    with torch.no_grad():
        rc, rr, hc, hr = modeling.forward_pairs(model, batch)
    d = losses.pair_distances(hc, hr)
    bt = losses.pair_gradient_norms(rc, rr, d)
    normbt = losses.pair_gradient_norms(rc, rr, d, weights=float(d.mean()) / (d + 1e-3))
    bt_slope = metrics.loglog_slope(d.numpy(), bt.numpy())
    normbt_slope = metrics.loglog_slope(d.numpy(), normbt.numpy())
    assert bt_slope > 0.5, bt_slope
    assert abs(normbt_slope) < 0.2 and normbt_slope < bt_slope - 0.5, (normbt_slope, bt_slope)


@pytest.mark.unit
@pytest.mark.unit
def test_compare_table_keeps_rm_bench_difficulty_levels():
    names = ["rmb/overall", "rmb/hard", "rmb/chat/hard", "rmb/section/chat", "rmb/tie_rate", "a/overall"]
    assert compare.compare_metric_names(names, "val") == ["val", "a/overall", "rmb/overall", "rmb/hard",
                                                          "rmb/section/chat"]
