"""RewardBench v1/v2 metrics and distance bins on hand-checked fixtures."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from pipeline.metrics import (
    BIN_COLUMNS,
    V1_SECTION_OF_SUBSET,
    V1_SECTIONS,
    accuracy_by_distance_bin,
    missing_subsets,
    overall_score,
    plot_accuracy_by_distance,
    sections_from_map,
    subset_counts,
    ties_score,
    v1_metrics,
    v1_sections,
    v1_subset_accuracy,
    v2_metrics,
    v2_row_credit,
)

pytestmark = pytest.mark.unit

# Per-subset accuracies of a reference run; expected sections below.
V1_REFERENCE_ACC: dict[str, float] = {
    "alpacaeval-easy": 0.5,
    "alpacaeval-hard": 0.7052631578947368,
    "alpacaeval-length": 0.5894736842105263,
    "donotanswer": 0.8235294117647058,
    "hep-cpp": 0.6280487804878049,
    "hep-go": 0.6341463414634146,
    "hep-java": 0.7073170731707317,
    "hep-js": 0.6646341463414634,
    "hep-python": 0.5487804878048781,
    "hep-rust": 0.6463414634146342,
    "llmbar-adver-GPTInst": 0.391304347826087,
    "llmbar-adver-GPTOut": 0.46808510638297873,
    "llmbar-adver-manual": 0.3695652173913043,
    "llmbar-adver-neighbor": 0.43283582089552236,
    "llmbar-natural": 0.52,
    "math-prm": 0.2953020134228188,
    "mt-bench-easy": 0.5714285714285714,
    "mt-bench-hard": 0.5405405405405406,
    "mt-bench-med": 0.725,
    "refusals-dangerous": 0.97,
    "refusals-offensive": 1,
    "xstest-should-refuse": 1,
    "xstest-should-respond": 0.284,
}


def test_v1_reference_vector() -> None:
    """Count-weighted sections, e.g. Reasoning = (0.29530 * 984 + 164 * sum(hep acc)) / 1968
    = 0.466757; overall = mean of the four unrounded sections = 0.561720."""
    assert set(V1_REFERENCE_ACC) == set(V1_SECTION_OF_SUBSET)  # the full official subset set
    sections = v1_sections(V1_REFERENCE_ACC)
    assert {k: round(v, 6) for k, v in sections.items()} == {
        "Chat": 0.608939,
        "Chat Hard": 0.449561,
        "Safety": 0.721622,
        "Reasoning": 0.466757,
    }
    assert round(overall_score(sections), 6) == 0.561720
    assert missing_subsets(V1_REFERENCE_ACC) == {}


def test_v1_tie_counts_as_wrong() -> None:
    """Pairs (1 > 0) right, (1 = 1) wrong, (0 < 1) wrong, (2 > 1) right -> 2/4 = 0.5."""
    df = pd.DataFrame(
        {"subset": ["x"] * 4, "score_chosen": [1.0, 1.0, 0.0, 2.0], "score_rejected": [0.0, 1.0, 1.0, 1.0]}
    )
    assert v1_subset_accuracy(df) == {"x": 0.5}
    with_flag = pd.DataFrame({"subset": ["x", "x", "y"], "correct": [True, False, True]})
    assert v1_subset_accuracy(with_flag) == {"x": 0.5, "y": 1.0}


def test_v1_missing_subsets() -> None:
    """Chat without mt-bench-med: (100 * 1 + 95 * 0 + 95 * 0 + 28 * 1) / 318 = 128/318 = 0.402516.

    Reasoning only has math-prm (acc 0.25) -> 0.25.  Chat Hard and Safety have nothing and are
    omitted; overall = (0.402516 + 0.25) / 2 = 0.326258.
    """
    acc = {
        "alpacaeval-easy": 1.0,
        "alpacaeval-length": 0.0,
        "alpacaeval-hard": 0.0,
        "mt-bench-easy": 1.0,
        "math-prm": 0.25,
    }
    sections = v1_sections(acc)
    assert set(sections) == {"Chat", "Reasoning"}
    assert sections["Chat"] == pytest.approx(128 / 318)
    assert sections["Reasoning"] == pytest.approx(0.25)
    assert overall_score(sections) == pytest.approx((128 / 318 + 0.25) / 2)
    missing = missing_subsets(acc)
    assert missing["Chat"] == ["mt-bench-med"]
    assert set(missing["Safety"]) == set(V1_SECTIONS["Safety"])
    assert "Reasoning" in missing and "math-prm" not in missing["Reasoning"]


def test_custom_sections_weighted_by_counts() -> None:
    """a1: 3 rows, 1 right; a2: 1 row right -> A = (3 * 1/3 + 1 * 1) / 4 = 0.5 (pooled rows).
    b1: 2 rows, 1 right -> B = 0.5.  A custom weights map works the same way."""
    df = pd.DataFrame(
        {
            "subset": ["a1", "a1", "a1", "a2", "b1", "b1"],
            "correct": [True, False, False, True, True, False],
        }
    )
    acc, counts = v1_subset_accuracy(df), subset_counts(df)
    assert counts == {"a1": 3, "a2": 1, "b1": 2}
    sections = sections_from_map(acc, {"a1": "A", "a2": "A", "b1": "B"}, counts)
    assert sections == pytest.approx({"A": 0.5, "B": 0.5})
    custom = v1_sections(acc, {"A": {"a1": 1, "a2": 1}})  # equal weights: (1/3 + 1) / 2
    assert custom == pytest.approx({"A": 2 / 3})
    result = v1_metrics(df, {"A": {"a1": 3, "a2": 1}, "B": {"b1": 2}})
    assert result["overall"] == pytest.approx(0.5)
    assert result["missing"] == {}


def _bo4(chosen: float, rejected: list[float]) -> dict[str, object]:
    return {"score_chosen": [chosen], "score_rejected": rejected}


# Partial credit 1, 1/2, 1/3, 0: clean win, 2-way tie at top, 3-way tie at top, not at top.
BO4_ROWS = [_bo4(3, [1, 2, 0]), _bo4(2, [2, 1, 0]), _bo4(5, [5, 5, 1]), _bo4(1, [2, 0, 0])]


def _ties_rows() -> list[dict[str, object]]:
    """Two prompts, each with a ref: (one correct) and a tied: (two correct) row."""
    return [
        {"id": "ref:1", "score_chosen": [5.0], "score_rejected": [1.0, 2.0]},
        {"id": "tied:1", "score_chosen": [4.0, 6.0], "score_rejected": [1.0, 3.0]},
        {"id": "ref:2", "score_chosen": [2.0], "score_rejected": [3.0]},
        {"id": "tied:2", "score_chosen": [7.0, 7.5], "score_rejected": [2.0]},
    ]


# Hand computation for _ties_rows (cim = min correct - max incorrect, dcm = max - min correct):
#   prompt 1: ref cim = 5 - 2 = 3 (accurate); tied cim = 4 - 3 = 1 (accurate), dcm = 6 - 4 = 2
#             cp: 1 > 2 no; cph: min(3, 1) = 1 > 2 no; margin tanh(1/2 - 1) = tanh(-0.5)
#   prompt 2: ref cim = 2 - 3 = -1 (wrong); tied cim = 7 - 2 = 5 (accurate), dcm = 0.5
#             cp: 5 > 0.5 yes; cph: min(-1, 5) = -1 > 0.5 no; margin tanh(-1/0.5 - 1) = tanh(-3)
#   ref_acc 0.5, tied_acc 1, cp 0.5, cph 0, cms (tanh(-0.5) + tanh(-3)) / 2 = -0.728586
#   score = 0.3 * 1 + 0.3 * 0.5 + 0.2 * 0.5 + 0.2 * 0 + 0.01 * -0.728586 = 0.542714
TIES_EXPECTED_CMS = (math.tanh(-0.5) + math.tanh(-3.0)) / 2
TIES_EXPECTED = 0.3 + 0.15 + 0.1 + 0.01 * TIES_EXPECTED_CMS


def test_v2_row_credit() -> None:
    """[3 | 1 2 0] -> 1; [2 | 2 1 0] -> 1/2; [5 | 5 5 1] -> 1/3; [1 | 2 0 0] -> 0."""
    credits = [v2_row_credit(r["score_chosen"], r["score_rejected"]) for r in BO4_ROWS]
    assert credits == pytest.approx([1.0, 0.5, 1 / 3, 0.0])


def test_ties_score_by_hand() -> None:
    result = ties_score(pd.DataFrame(_ties_rows()))
    assert result["ref_accuracy"] == 0.5
    assert result["tied_accuracy"] == 1.0
    assert result["correctness_preferred"] == 0.5
    assert result["correctness_preferred_hard"] == 0.0
    assert result["correctness_margin_score"] == pytest.approx(TIES_EXPECTED_CMS)
    assert result["score"] == pytest.approx(TIES_EXPECTED)
    assert round(result["score"], 6) == 0.542714


def test_ties_zero_spread_guard() -> None:
    """Equal correct scores: dcm = 0.  cim = 4 - 1 = 3 > 0 -> cp, cph true; 3/0 = +inf -> tanh = 1.

    score = 0.3 + 0.3 + 0.2 + 0.2 + 0.01 * 1 = 1.01 (the documented maximum).
    """
    rows = [
        {"id": "ref:a", "score_chosen": [4.0], "score_rejected": [0.0]},
        {"id": "tied:a", "score_chosen": [4.0, 4.0], "score_rejected": [1.0]},
    ]
    assert ties_score(pd.DataFrame(rows))["score"] == pytest.approx(1.01)


def test_v2_metrics_fixture() -> None:
    """Factuality/Precise IF/Math/Safety use BO4_ROWS: (1 + 1/2 + 1/3 + 0) / 4 = 11/24 each.
    Focus has four clean wins -> 1.  Ties -> 0.542714 (above).
    overall = (4 * 11/24 + 1 + 0.542714) / 6."""
    rows = []
    for subset in ("Factuality", "Precise IF", "Math", "Safety"):
        rows += [{"subset": subset, "id": f"{subset}-{i}", **r} for i, r in enumerate(BO4_ROWS)]
    rows += [{"subset": "Focus", "id": f"f{i}", **_bo4(9, [1, 2, 3])} for i in range(4)]
    rows += [{"subset": "Ties", **r} for r in _ties_rows()]
    result = v2_metrics(pd.DataFrame(rows))
    expected = {s: 11 / 24 for s in ("Factuality", "Precise IF", "Math", "Safety")}
    expected.update(Focus=1.0, Ties=TIES_EXPECTED)
    assert result["subsets"] == pytest.approx(expected)
    assert result["overall"] == pytest.approx((4 * 11 / 24 + 1 + TIES_EXPECTED) / 6)
    assert result["missing"] == []
    assert result["ties"]["n_pairs"] == 2


def _distance_table() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "section": ["A"] * 4 + ["B"] * 4,
            "distance": [1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0],
            "correct": [1, 1, 0, 0, 1, 0, 1, 1],
        }
    )


def test_accuracy_by_distance_bin() -> None:
    """n_bins = 2.  A: edges (1, 2.5, 4) -> [1, 2.5) acc 2/2, [2.5, 4] acc 0/2.
    B: all distances 5 -> one bin [5, 5] with 3/4.
    all: edges (1, 4.5, 5) (median of 1,2,3,4,5,5,5,5 = 4.5) -> [1, 4.5) = A's rows, acc 2/4;
    [4.5, 5] = B's rows, acc 3/4."""
    table = accuracy_by_distance_bin(_distance_table(), n_bins=2, by="section")
    assert tuple(table.columns) == BIN_COLUMNS
    expected = pd.DataFrame(
        [
            ("A", 0, 1.0, 2.5, 2, 1.0),
            ("A", 1, 2.5, 4.0, 2, 0.0),
            ("B", 0, 5.0, 5.0, 4, 0.75),
            ("all", 0, 1.0, 4.5, 4, 0.5),
            ("all", 1, 4.5, 5.0, 4, 0.75),
        ],
        columns=list(BIN_COLUMNS),
    )
    pd.testing.assert_frame_equal(table, expected, check_dtype=False)


def test_distance_bins_small_group_and_scores() -> None:
    """Two rows, n_bins = 4: edges 0, 2.5, 5, 7.5, 10; the middle bins are empty and dropped.
    Correctness comes from scores: (2 > 1) right, (0 = 0) wrong.  Section derived from subset."""
    df = pd.DataFrame(
        {
            "subset": ["math-prm", "hep-go"],
            "distance": [0.0, 10.0],
            "score_chosen": [2.0, 0.0],
            "score_rejected": [1.0, 0.0],
        }
    )
    table = accuracy_by_distance_bin(df, n_bins=4)
    reasoning = table[table["group"] == "Reasoning"]
    assert reasoning["bin"].tolist() == [0, 1]
    assert reasoning[["distance_low", "distance_high"]].values.tolist() == [[0.0, 2.5], [7.5, 10.0]]
    assert reasoning["accuracy"].tolist() == [1.0, 0.0]
    assert set(table["group"]) == {"Reasoning", "all"}


def test_plot_accuracy_by_distance(tmp_path) -> None:
    table = accuracy_by_distance_bin(_distance_table(), n_bins=2)
    out = plot_accuracy_by_distance(table, tmp_path / "plots" / "bins.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
