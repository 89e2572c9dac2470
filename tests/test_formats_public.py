"""The public preference schemas users bring, on fixture rows written in each dataset's real schema
(``tests/data/formats/SCHEMAS.md`` says where each schema was checked), and a column mapping for anything else."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from pipeline import formats as F

pytestmark = pytest.mark.unit
FIXTURES = Path(__file__).resolve().parent / "data" / "formats"


def rows_of(name: str) -> list[dict]:
    return [json.loads(line) for line in (FIXTURES / f"{name}.jsonl").read_text().splitlines() if line.strip()]


def normalise(row: dict, **options) -> tuple[list[dict], list[dict]]:
    return F.normalise_row(row, source="src", location="f.jsonl:1", options=F.RowOptions(**options))


@pytest.mark.parametrize("name,fmt", [("unified_feedback", F.UNIFIED_FEEDBACK), ("unified_feedback_all", F.UNIFIED_FEEDBACK),
                                      ("pku_saferlhf", F.PKU_SAFERLHF),
                                      ("arena_55k", F.ARENA), ("ultrafeedback_raw", F.ULTRAFEEDBACK),
                                      ("nectar", F.KWISE)])
def test_each_public_schema_is_detected_by_its_keys(name, fmt):
    assert {F.detect_format(row) for row in rows_of(name)} == {fmt}


# Each Unified-Feedback sub-source's rating range (highest minus lowest rating), written out from the builder's code
# (SCHEMAS.md): the margins are expected on one scale, the rating difference as a share of this range.
RANGES = {"lmsys/chatbot_arena_conversations": 1.0, "Anthropic/hh-rlhf": 1.0, "berkeley-nest/Nectar": 6.0,
          "flan": 9.0, "argilla/ultrafeedback-binarized-preferences-cleaned": 4.0}


def test_unified_feedback_prefers_the_higher_rating_with_the_difference_as_margin_and_quarantines_ties():
    for row in rows_of("unified_feedback"):
        records, bad = normalise(row)
        a, b = row["conv_A_rating"], row["conv_B_rating"]
        if a == b:
            assert records == [] and [q["reason"] for q in bad] == ["tie"]
            continue
        winner, loser = (row["conv_A"], row["conv_B"]) if a > b else (row["conv_B"], row["conv_A"])
        (record,) = records
        assert record["chosen"][-1]["content"] == winner[-1]["content"]
        assert record["rejected"][-1]["content"] == loser[-1]["content"]
        assert record["margin"] == abs(a - b) / RANGES[row["source"]] and record["id"] == row["id"]
        assert record["prompt"] == [{"role": m["role"], "content": m["content"]}
                                    for m in winner[: len(record["prompt"])]], "the shared turns are the prompt"
    assert sum(normalise(r)[1] != [] for r in rows_of("unified_feedback")) == 2  # rows 1 and 5: 0.5/0.5, 7.5/7.5


@pytest.mark.parametrize("follow", ["better", "safer"])
def test_pku_saferlhf_follows_the_configured_label(follow):
    for row in rows_of("pku_saferlhf"):
        (record,), bad = normalise(row, follow=follow)
        index = row[f"{follow}_response_id"]
        assert bad == [] and record["chosen"][-1]["content"] == row[f"response_{index}"]
        assert record["rejected"][-1]["content"] == row[f"response_{1 - index}"]
    differ = [r for r in rows_of("pku_saferlhf") if r["better_response_id"] != r["safer_response_id"]]
    assert differ, "the fixture must have a row where the two labels disagree"


def test_arena_decodes_json_turn_lists_follows_the_winner_and_quarantines_ties_and_missing_replies():
    results = [normalise(row) for row in rows_of("arena_55k")]
    assert [[q["reason"] for q in bad] for _, bad in results] == [[], ["tie"], ["empty_response"], [], ["tie"]]
    (first,), _ = results[0]
    assert first["chosen"][-1]["content"].startswith("1. Put your phone")  # winner_model_a
    (fourth,), _ = results[3]
    assert fourth["chosen"][-1]["content"] == "Divide by 3.6: 90 km/h = 25 m/s."  # b won; "\\/" decoded
    assert fourth["prompt"] == [{"role": "user", "content": "Convert 90 km/h to m/s."}]


def test_arena_multi_turn_conversation_keeps_every_turn_of_the_winner():
    row = dict(rows_of("arena_55k")[1], winner_model_a=1, winner_tie=0)  # the 3-turn row, judged for a
    (record,), bad = normalise(row)
    assert bad == [] and record["prompt"] == [{"role": "user", "content": "Suggest a name for a bakery."}]
    assert [m["content"] for m in record["chosen"]] == ["Morning Crumb", "Make it a pun.", "Bread Pitt",
                                                        "Now one that works in French too.", "Pain Staking"]
    assert record["rejected"][-1]["content"] == "Croissant Ever After"


def test_ultrafeedback_best_vs_a_random_lower_rated_one_by_overall_score_or_an_aspect():
    rows = rows_of("ultrafeedback_raw")
    for row in rows:
        (record,), bad = normalise(row)
        scores = [c["overall_score"] for c in row["completions"]]
        best = scores.index(max(scores))
        assert record["chosen"][-1]["content"] == row["completions"][best]["response"]
        assert record["margin"] == max(scores) - next(s for c, s in zip(row["completions"], scores, strict=True)
                                                      if c["response"] == record["rejected"][-1]["content"])
        again, _ = normalise(row)
        assert again == [record], "the random other is seeded by the row: reruns pick the same"
    # helpfulness Ratings are strings; honesty is "N/A" throughout row 2: nothing to compare there
    (helpful,), _ = normalise(rows[0], aspect="helpfulness")
    assert helpful["chosen"][-1]["content"] == rows[0]["completions"][0]["response"]  # Rating "5"
    records, bad = normalise(rows[1], aspect="honesty")
    assert records == [] and [q["reason"] for q in bad] == ["no_preference"]


def test_unified_feedback_margins_of_every_sub_source_land_on_one_scale():
    """The `all` configuration mixes 1/0 labels, Nectar's minus-ranks, overall_score (1-10), Argilla's mean ratings
    (1-5) and WebGPT's scores (-1..1): the margin is the difference as a share of the sub-source's rating range."""
    rows = rows_of("unified_feedback_all")
    results = [normalise(row) for row in rows]
    assert all(bad == [] for _, bad in results)
    margins = {row["source"]: records[0]["margin"] for row, (records, _) in zip(rows, results, strict=True)}
    expected = {"lmsys/chatbot_arena_conversations": 1.0, "Anthropic/hh-rlhf": 1.0,
                "berkeley-nest/Nectar": (-1.0 - -6.0) / 6, "openai/summarize_from_feedback(comparisons)": 1.0,
                "Dahoas/synthetic-instruct-gptj-pairwise": 1.0, "evol_instruct": (8.5 - 4.0) / 9,
                "argilla/ultrafeedback-binarized-preferences-cleaned": (4.75 - 2.25) / 4,
                "openai/webgpt_comparisons": (1.0 - -1.0) / 2}
    assert margins == pytest.approx(expected)
    assert all(0 < m <= 1 for m in margins.values())
    assert [records[0]["subset"] for records, _ in results] == [row["source"] for row in rows], \
        "the sub-source travels with the pair (stats.json counts margins per sub-source)"
    raw = {row["source"]: normalise(row, margin_scale="raw")[0][0]["margin"] for row in rows}
    assert raw["evol_instruct"] == 4.5 and raw["berkeley-nest/Nectar"] == 5.0, "raw keeps each sub-source's scale"
    (unknown,), bad = normalise(dict(rows[5], source="some/new-source"))
    assert bad == [] and unknown["margin"] is None, "no margin on a scale nobody documented"


def ultrafeedback_row(scores: list[float], instruction: str) -> dict:
    """A fixture row in UltraFeedback's schema with the given overall_scores."""
    row = json.loads(json.dumps(rows_of("ultrafeedback_raw")[0]))
    for completion, score in zip(row["completions"], scores, strict=True):
        completion["overall_score"] = score
    return dict(row, instruction=instruction)


def test_ultrafeedback_rows_scored_8_8_5_3_always_give_a_pair_with_a_lower_rated_rejected():
    rows = [ultrafeedback_row([8.0, 8.0, 5.0, 3.0], f"Question {n}: name a colour.") for n in range(200)]
    results = [normalise(row) for row in rows]
    unpaired = [bad for records, bad in results if len(records) != 1]
    assert unpaired == [], f"{len(unpaired)} of 200 rows gave no pair, e.g. {unpaired[0]}"
    scores = {c["response"]: c["overall_score"] for c in rows[0]["completions"]}
    assert {scores[r["chosen"][-1]["content"]] for (r,), _ in results} == {8.0}
    assert {scores[r["rejected"][-1]["content"]] for (r,), _ in results} == {5.0, 3.0}, "drawn among the lower ones"
    assert [normalise(row) for row in rows[:20]] == results[:20], "the draw is seeded by the row: reruns agree"


@pytest.mark.parametrize("aspect,field", [("overall", "overall_score"), ("mean", "fine-grained_score")])
def test_ultrafeedback_pick_follows_the_binarised_rule_on_the_fixture_rows(aspect, field):
    """The best-rated completion (the first of equals) is chosen; the rejected is one rated below it. With
    ``aspect: mean`` the score is the mean of the aspect Ratings, which UltraFeedback also stores as
    ``fine-grained_score`` (N/A ratings left out): the expected scores are read from that field."""
    for n, row in enumerate(rows_of("ultrafeedback_raw")):
        scores = [c[field] for c in row["completions"]]
        best = scores.index(max(scores))
        records, bad = normalise(row, aspect=aspect)
        assert bad == [] and len(records) == 1, f"row {n}: {bad}"
        by_text = {c["response"]: s for c, s in zip(row["completions"], scores, strict=True)}
        (record,) = records
        assert record["chosen"][-1]["content"] == row["completions"][best]["response"], f"row {n}"
        assert by_text[record["rejected"][-1]["content"]] < max(scores), f"row {n}: the rejected is rated lower"
        assert record["margin"] == pytest.approx(max(scores) - by_text[record["rejected"][-1]["content"]])
    bug = rows_of("ultrafeedback_raw")[4]  # overall_score 10 on a wrong answer whose critique says so
    overall, mean = normalise(bug)[0][0], normalise(bug, aspect="mean")[0][0]
    assert overall["chosen"][-1]["content"] == bug["completions"][0]["response"]
    assert mean["chosen"][-1]["content"] == bug["completions"][1]["response"]


def test_ultrafeedback_a_row_with_nothing_rated_below_the_best_is_counted_as_no_lower_rated():
    records, bad = normalise(ultrafeedback_row([7.0, 7.0, 7.0, 7.0], "Say hi."))
    assert records == [] and [q["reason"] for q in bad] == ["no_lower_rated"]
    assert "none below the best" in bad[0]["detail"]


def test_ultrafeedback_all_pairs_quarantines_each_tied_pair():
    row = rows_of("ultrafeedback_raw")[0]  # overall 8.5, 4.0, 8.5, 2.0
    records, bad = normalise(row, pairs="all_pairs")
    assert len(records) == 5 and [q["reason"] for q in bad] == ["tie"]  # 6 pairs, the 8.5/8.5 one tied
    assert all(r["margin"] > 0 for r in records) and len({r["id"] for r in records}) == 5


def test_kwise_rankings_best_vs_each_other_by_default_and_all_pairs_with_ties():
    rows = rows_of("nectar")
    for row in rows:
        records, bad = normalise(row)
        best = min(row["answers"], key=lambda a: a["rank"])["answer"]
        assert bad == [] and len(records) == len(row["answers"]) - 1
        assert {r["chosen"][-1]["content"] for r in records} == {best}
        assert records[0]["prompt"][-1]["role"] == "user", "the open 'Assistant:' of the transcript is dropped"
    multi, _ = normalise(rows[1])
    assert [m["role"] for m in multi[0]["prompt"]] == ["user", "assistant", "user"]
    ranks = [a["rank"] for a in rows[3]["answers"]]
    records, bad = normalise(rows[3], pairs="all_pairs")
    pairs = list(itertools.combinations(ranks, 2))
    assert len(bad) == sum(a == b for a, b in pairs) == 1 and len(records) == len(pairs) - 1


def test_rating_format_quarantines_ties_and_inverted_pairs():
    row = {"prompt": "q?", "chosen": "good", "rejected": "bad", "score_chosen": 7.0, "score_rejected": 7.0}
    assert [q["reason"] for q in normalise(row)[1]] == ["tie"]
    (kept,), _ = normalise(row, ties="keep")
    assert kept["margin"] == 0.0
    assert [q["reason"] for q in normalise(dict(row, score_chosen=3.0))[1]] == ["inverted"]


def test_an_unseen_schema_loads_with_a_column_mapping_alone():
    pairwise = {"question": "Name a prime.", "good_answer": "7 is prime.", "bad_answer": "9 is prime.", "uid": 4}
    (record,), bad = normalise(pairwise, columns={"prompt": "question", "chosen": "good_answer",
                                                  "rejected": "bad_answer", "id": "uid"})
    assert bad == [] and record["chosen"][-1]["content"] == "7 is prime." and record["id"] == "4"
    labelled = {"q": [{"role": "user", "content": "2+2?"}], "r1": "4", "r2": "5", "pref": "B", "m": 2}
    mapping = {"prompt": "q", "first": "r1", "second": "r2", "label": "pref", "first_is_better": "A", "tie": "=",
               "margin": "m"}
    (record,), _ = normalise(labelled, columns=mapping)
    assert (record["chosen"][-1]["content"], record["rejected"][-1]["content"], record["margin"]) == ("5", "4", 2.0)
    assert [q["reason"] for q in normalise(dict(labelled, pref="="), columns=mapping)[1]] == ["tie"]
    records, bad = normalise(pairwise, columns={"prompt": "question", "chosen": "good", "rejected": "bad_answer"})
    assert records == [] and bad[0]["reason"] == "missing_field" and "column 'good'" in bad[0]["detail"]


def test_pku_ids_stored_as_floats_still_pick_the_right_response():
    row = dict(rows_of("pku_saferlhf")[1], better_response_id=1.0)  # a Parquet column with a gap stores 1.0
    (record,), bad = normalise(row)
    assert bad == [] and record["chosen"][-1]["content"] == row["response_1"]
    assert [q["reason"] for q in normalise(dict(row, better_response_id=0.5))[1]] == ["bad_type"]


def test_a_column_mapping_never_turns_a_missing_or_unknown_label_into_a_preference():
    row = {"q": "2+2?", "r1": "4", "r2": "5", "pref": None}
    mapping = {"prompt": "q", "first": "r1", "second": "r2", "label": "pref", "first_is_better": 1}
    assert [q["reason"] for q in normalise(row, columns=mapping)[1]] == ["missing_field"]
    (record,), _ = normalise(dict(row, pref="1"), columns=mapping)  # "1" in the data, 1 in the config
    assert record["chosen"][-1]["content"] == "4"
    strict = {**mapping, "second_is_better": 2}
    assert normalise(dict(row, pref=2), columns=strict)[0][0]["chosen"][-1]["content"] == "5"
    assert [q["reason"] for q in normalise(dict(row, pref=3), columns=strict)[1]] == ["bad_type"]
    assert [q["reason"] for q in normalise(dict(row, pref=True), columns=strict)[1]] == ["bad_type"]


def test_pairs_of_a_ranked_row_get_distinct_ids_even_when_two_answers_read_the_same():
    row = {"prompt": "Name a prime.", "answers": [{"answer": "7.", "rank": 1}, {"answer": "11.", "rank": 2},
                                                   {"answer": "11.", "rank": 3}]}
    records, bad = normalise(row, pairs="all_pairs")
    assert len(records) == 2 and len({r["id"] for r in records}) == 2  # 7 > 11 twice: two distinct pairs
    assert [q["reason"] for q in bad] == ["identical_responses"]  # 11 vs 11
