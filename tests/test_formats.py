"""Unit tests for pipeline.formats: canonical records, quarantine reasons, readers, real files."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from pipeline import formats as F

pytestmark = pytest.mark.unit

BAD_ROWS = Path(__file__).resolve().parent / "data" / "bad_rows"
SHARED = Path(os.environ.get("NORMBT_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def bot(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def system(text: str) -> dict[str, str]:
    return {"role": "system", "content": text}


def norm(row: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    """Normalise a row that must be good; fail with the quarantine record otherwise."""
    kwargs.setdefault("source", "src")
    kwargs.setdefault("location", "f.jsonl:1")
    records, bad = F.normalise_row(row, **kwargs)
    assert bad == [], bad
    assert len(records) == 1, records
    return dict(records[0])


def reason_of(row: Any, **kwargs: Any) -> str:
    """Normalise a row that must be bad; return its reason code."""
    records, bad = F.normalise_row(row, source="src", location="f.jsonl:1", **kwargs)
    assert records == [], records
    assert len(bad) == 1 and set(bad[0]) == F.QUARANTINE_KEYS
    return bad[0]["reason"]


def expected(prompt: list, chosen: list, rejected: list, *, id: str, subset=None, margin=None) -> dict:
    return {
        "id": id,
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "source": "src",
        "location": "f.jsonl:1",
        "subset": subset,
        "margin": margin,
    }


# ---------------------------------------------------------------------------------------------
# Constants and detection
# ---------------------------------------------------------------------------------------------
def test_reasons_are_exported_constants() -> None:
    assert F.REASONS == (
        "invalid_json",
        "invalid_utf8",
        "missing_field",
        "bad_type",
        "empty_response",
        "identical_responses",
        "no_preference",
        "broken_transcript",
        "unknown_format",
        "tie",
        "inverted",
        "no_lower_rated",
        "over_length",
        "contaminated",
        "subsampled",
    )
    assert F.NO_PREFERENCE in F.REASONS and F.OVER_LENGTH in F.REASONS


@pytest.mark.parametrize(
    ("row", "fmt"),
    [
        ({"prompt": "q", "chosen": "a", "rejected": "b"}, "strings"),
        ({"prompt": "q", "chosen": None, "rejected": "b"}, "strings"),
        ({"chosen": [user("q"), bot("a")], "rejected": [user("q"), bot("b")]}, "conversational"),
        ({"prompt": [user("q")], "chosen": [bot("a")], "rejected": [bot("b")]}, "conversational"),
        ({"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: b"}, "hh"),
        ({"conversations": [], "chosen": {}, "rejected": {}}, "sharegpt"),
        ({"prompt": "q", "response_1": "a", "response_2": "b", "preference_strength": 1}, "helpsteer2"),
        ({"prompt": "q", "chosen": [bot("a")], "rejected": [bot("b")], "score_chosen": 2}, "rating"),
        ({"text": "x"}, "unknown"),
        ({"prompt": "only a prompt"}, "unknown"),
    ],
)
def test_detect_format(row: dict, fmt: str) -> None:
    assert F.detect_format(row) == fmt


def test_detect_format_of_non_dict_is_unknown() -> None:
    assert F.detect_format([1, 2]) == F.UNKNOWN  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# One exact canonical record per format
# ---------------------------------------------------------------------------------------------
def test_strings_rewardbench_row() -> None:
    row = {
        "prompt": "Q?",
        "chosen": "Good.",
        "chosen_model": "m1",
        "rejected": "Bad.",
        "rejected_model": "m2",
        "subset": "alpacaeval-easy",
        "id": 3692,
    }
    assert norm(row) == expected(
        [user("Q?")], [bot("Good.")], [bot("Bad.")], id="3692", subset="alpacaeval-easy"
    )


def test_conversational_with_folded_prompt() -> None:
    row = {
        "chosen": [system("S"), user("Q1"), bot("A1"), user("Q2"), bot("good")],
        "rejected": [system("S"), user("Q1"), bot("A1"), user("Q2"), bot("bad")],
    }
    prompt = [system("S"), user("Q1"), bot("A1"), user("Q2")]
    assert norm(row) == expected(prompt, [bot("good")], [bot("bad")], id="471bd5f32453308f")


def test_conversational_with_explicit_prompt() -> None:
    row = {"prompt": [user("Q")], "chosen": [{"role": "assistant", "content": "A"}], "rejected": [bot("B")]}
    assert norm(row) == expected([user("Q")], [bot("A")], [bot("B")], id="3b6648204fb05885")


def test_conversational_prompt_string_repeated_inside_lists() -> None:
    # UltraFeedback-binarized style: a prompt string *and* the prompt folded into both lists.
    row = {"prompt": "Q", "chosen": [user("Q"), bot("A")], "rejected": [user("Q"), bot("B")]}
    assert norm(row) == expected([user("Q")], [bot("A")], [bot("B")], id="3b6648204fb05885")


def test_hh_transcript() -> None:
    head = "\n\nHuman: Hi\n\nAssistant:  Hello!\n\nHuman: Joke?\n\nAssistant: "
    row = {"chosen": head + "Knock knock.", "rejected": head + "No."}
    prompt = [user("Hi"), bot("Hello!"), user("Joke?")]
    assert norm(row) == expected(prompt, [bot("Knock knock.")], [bot("No.")], id="84261cd936636f03")


def test_hh_transcripts_diverging_before_final_turn() -> None:
    # As in a few real HH rows: one side has two assistant turns after the shared prefix.
    row = {
        "chosen": "\n\nHuman: Q\n\nAssistant: A1\n\nAssistant: A2",
        "rejected": "\n\nHuman: Q\n\nAssistant: B",
    }
    assert norm(row) == expected([user("Q")], [bot("A1"), bot("A2")], [bot("B")], id="7ec1643f1c2d5aba")


def test_hh_diverging_at_user_turn_is_broken() -> None:
    row = {
        "chosen": "\n\nHuman: Q\n\nAssistant: A\n\nHuman: X\n\nAssistant: 1",
        "rejected": "\n\nHuman: Q\n\nAssistant: A\n\nHuman: Y\n\nAssistant: 2",
    }
    assert reason_of(row) == F.BROKEN_TRANSCRIPT


def test_sharegpt_row() -> None:
    row = {
        "conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"}],
        "chosen": {"from": "gpt", "value": "A"},
        "rejected": {"from": "gpt", "value": "B"},
    }
    assert norm(row) == expected([system("S"), user("Q")], [bot("A")], [bot("B")], id="2357de7d57671051")


def test_sharegpt_row_level_system_prompt() -> None:
    row = {
        "system": "S",
        "conversations": [{"from": "human", "value": "Q"}],
        "chosen": {"from": "gpt", "value": "A"},
        "rejected": {"from": "bot", "value": "B"},
    }
    assert norm(row)["prompt"] == [system("S"), user("Q")]


@pytest.mark.parametrize(("strength", "chosen", "rejected"), [(-2, "R1", "R2"), (3, "R2", "R1")])
def test_helpsteer2_preference(strength: int, chosen: str, rejected: str) -> None:
    row = {
        "split": "train",
        "prompt": "Q",
        "response_1": "R1",
        "response_2": "R2",
        "preference_strength": strength,
    }
    record = norm(row)
    assert record["chosen"] == [bot(chosen)] and record["rejected"] == [bot(rejected)]
    assert record["margin"] == float(abs(strength)) and isinstance(record["margin"], float)
    assert record["prompt"] == [user("Q")]


def test_helpsteer2_multi_turn_prompt() -> None:
    row = {
        "prompt": "Q1\n<extra_id_1>Assistant\nA1\n<extra_id_1>User\nQ2",
        "response_1": "R1",
        "response_2": "R2",
        "preference_strength": -1,
    }
    assert norm(row) == expected(
        [user("Q1"), bot("A1"), user("Q2")], [bot("R1")], [bot("R2")], id="b8c43d0b729882b5", margin=1.0
    )


def test_helpsteer2_zero_strength_is_no_preference() -> None:
    row = {"prompt": "Q", "response_1": "R1", "response_2": "R2", "preference_strength": 0}
    assert reason_of(row) == F.NO_PREFERENCE


def test_rating_with_message_lists() -> None:
    row = {
        "prompt": "Q",
        "chosen": [user("Q"), bot("A")],
        "rejected": [user("Q"), bot("B")],
        "score_chosen": 9.0,
        "score_rejected": 6.5,
        "prompt_id": "abc",
    }
    assert norm(row) == expected([user("Q")], [bot("A")], [bot("B")], id="3b6648204fb05885", margin=2.5)


@pytest.mark.parametrize("score", ["9", None, True, float("nan"), [1]])
def test_rating_non_numeric_score_is_bad_type(score: Any) -> None:
    row = {"prompt": "Q", "chosen": "A", "rejected": "B", "score_chosen": score, "score_rejected": 1}
    assert reason_of(row) == F.BAD_TYPE


# ---------------------------------------------------------------------------------------------
# Ids, overrides, odd containers
# ---------------------------------------------------------------------------------------------
def test_hash_id_is_stable_and_depends_on_source() -> None:
    row = {"prompt": "Q", "chosen": "A", "rejected": "B"}
    first = norm(row)["id"]
    assert first == norm(dict(row))["id"] == "3b6648204fb05885"
    assert len(first) == 16
    assert norm(row, source="other")["id"] != first


def test_hash_id_recipe() -> None:
    # sha1(source + NUL + canonical JSON of [prompt, chosen, rejected]), first 16 hex chars.
    payload = json.dumps(
        [[user("Q")], [bot("A")], [bot("B")]], sort_keys=True, ensure_ascii=False, separators=(",", ":")
    )
    digest = hashlib.sha1(f"src\x00{payload}".encode()).hexdigest()[:16]
    assert norm({"prompt": "Q", "chosen": "A", "rejected": "B"})["id"] == digest


def test_format_override_and_bad_override() -> None:
    row = {"prompt": "Q", "chosen": "A", "rejected": "B"}
    assert norm(row, fmt="strings")["chosen"] == [bot("A")]
    assert reason_of(row, fmt="sharegpt") == F.MISSING_FIELD  # forced format, its key is missing
    with pytest.raises(ValueError, match="unknown preference format"):
        F.normalise_row(row, fmt="nope", source="s", location="l")


def test_numpy_containers_from_ray_batches() -> None:
    np = pytest.importorskip("numpy")
    row = {
        "chosen": np.array([user("Q"), bot("A")], dtype=object),
        "rejected": np.array([user("Q"), bot("B")], dtype=object),
        "id": np.int64(5),
    }
    record = norm(row)
    assert record["prompt"] == [user("Q")] and record["id"] == "5"


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({"prompt": "Q", "chosen": "A\ud800", "rejected": "B"}, F.INVALID_UTF8),
        ({"prompt": "Q", "chosen": [{"role": "tool", "content": "x"}], "rejected": "B"}, F.BROKEN_TRANSCRIPT),
        ({"prompt": "Q", "chosen": [{"content": "x"}], "rejected": "B"}, F.MISSING_FIELD),
        ({"prompt": [bot("hi")], "chosen": [bot("A")], "rejected": [bot("B")]}, F.BROKEN_TRANSCRIPT),
        ({"prompt": "Q", "chosen": " A ", "rejected": "A"}, F.IDENTICAL_RESPONSES),
        ({"prompt": "Q", "chosen": "A", "rejected": "B", "id": {"x": 1}}, F.BAD_TYPE),
        ({"prompt": "Q", "chosen": "A", "rejected": 3}, F.BAD_TYPE),
        # chosen is a strict prefix of rejected: nothing left to compare after the shared prompt
        (
            {"chosen": [user("Q"), bot("A")], "rejected": [user("Q"), bot("A"), user("more"), bot("B")]},
            F.BROKEN_TRANSCRIPT,
        ),
        ([1, 2], F.BAD_TYPE),
    ],
)
def test_bad_rows_in_memory(row: Any, reason: str) -> None:
    assert reason_of(row) == reason


# ---------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------
def test_jsonl_reader_locations_blank_lines_and_bom() -> None:
    data = b'\xef\xbb\xbf{"a": 1}\n\n  \n{"b": 2}\r\n{bad\n"str"\n'
    rows = list(F.iter_jsonl_bytes(data, "x.jsonl"))
    assert [loc for loc, _ in rows] == ["x.jsonl:1", "x.jsonl:4", "x.jsonl:5", "x.jsonl:6"]
    assert rows[0][1] == {"a": 1} and rows[1][1] == {"b": 2}
    assert rows[2][1]["reason"] == F.INVALID_JSON and F.is_quarantine(rows[2][1])
    assert rows[3][1]["reason"] == F.INVALID_JSON and "str" in rows[3][1]["detail"]


def test_gzip_helper() -> None:
    raw = b'{"a": 1}\n'
    assert F.read_bytes_maybe_gzip(gzip.compress(raw), "x.jsonl.gz") == raw
    assert F.read_bytes_maybe_gzip(raw, "x.jsonl.gz") == raw  # already decompressed upstream
    assert F.read_bytes_maybe_gzip(raw, "x.jsonl") == raw
    with pytest.raises(F.BadRow):
        F.read_bytes_maybe_gzip(gzip.compress(raw)[:12], "x.jsonl.gz")
    [(loc, bad)] = list(F.iter_file_rows(gzip.compress(raw)[:12], "x.jsonl.gz"))
    assert loc == "x.jsonl.gz" and bad["reason"] == F.INVALID_JSON


def test_json_array_reader_shapes() -> None:
    wrapped = json.dumps({"data": [{"a": 1}, 5]}).encode()
    rows = list(F.iter_json_array_bytes(wrapped, "w.json"))
    assert rows[0] == ("w.json#0", {"a": 1})
    assert rows[1][0] == "w.json#1" and rows[1][1]["reason"] == F.INVALID_JSON

    jsonl = b'{"a": 1}\n{"a": oops}\n'
    assert [loc for loc, _ in F.iter_json_array_bytes(jsonl, "j.json")] == ["j.json:1", "j.json:2"]

    [(loc, bad)] = list(F.iter_json_array_bytes(b'[{"a": 1}, {"a": ', "c.json"))
    assert loc == "c.json" and bad["reason"] == F.INVALID_JSON and "not valid JSON" in bad["detail"]

    latin1 = b'[{"a": "ok"}, {"a": "caf\xe9"}]'
    rows = list(F.iter_json_array_bytes(latin1, "u.json"))
    assert rows[0][1] == {"a": "ok"} and rows[1][1]["reason"] == F.INVALID_UTF8


def test_indexed_rows_locations() -> None:
    assert [loc for loc, _ in F.iter_indexed_rows([{}, {}], "t.parquet")] == ["t.parquet#0", "t.parquet#1"]


# ---------------------------------------------------------------------------------------------
# Bad-rows corpus
# ---------------------------------------------------------------------------------------------
# Line number -> expected reason (None = good row).  Line 7 is blank and is not a row.
EXPECTED_MIXED: dict[int, str | None] = {
    1: None,
    2: F.INVALID_UTF8,
    3: None,
    4: F.INVALID_JSON,
    5: F.BAD_TYPE,  # null chosen
    6: F.BAD_TYPE,  # int content
    8: F.EMPTY_RESPONSE,
    9: F.IDENTICAL_RESPONSES,
    10: F.BROKEN_TRANSCRIPT,  # HH without markers
    11: F.MISSING_FIELD,
    12: F.UNKNOWN_FORMAT,
    13: None,
    14: None,
    15: F.NO_PREFERENCE,
    16: None,
    17: F.BAD_TYPE,  # score "high"
    18: F.INVALID_JSON,  # JSON array, not an object
    19: None,
    20: F.BROKEN_TRANSCRIPT,  # consecutive user turns
    21: F.EMPTY_RESPONSE,  # HH empty final assistant turn
    22: None,
}


def _read(path: Path) -> tuple[list, list]:
    return F.normalise_file_bytes(path.read_bytes(), str(path), source="bad_rows")


def test_mixed_corpus_reasons_per_line() -> None:
    path = BAD_ROWS / "mixed.jsonl"
    records, quarantined = _read(path)
    got = {int(r["location"].rsplit(":", 1)[1]): None for r in records}
    got.update({int(q["location"].rsplit(":", 1)[1]): q["reason"] for q in quarantined})
    assert got == EXPECTED_MIXED
    rows_in_file = sum(1 for line in path.read_bytes().split(b"\n") if line.strip())
    assert len(records) + len(quarantined) == rows_in_file == len(EXPECTED_MIXED)
    assert all(q["source"] == "bad_rows" and q["detail"] for q in quarantined)


def test_mixed_corpus_details_name_the_field() -> None:
    _, quarantined = _read(BAD_ROWS / "mixed.jsonl")
    details = {int(q["location"].rsplit(":", 1)[1]): q["detail"] for q in quarantined}
    assert details[5] == "field 'chosen' is null"
    assert "field 'chosen'[1].content" in details[6]
    assert "field 'rejected'" in details[11]
    assert "field 'score_chosen'" in details[17]


def test_sharegpt_array_with_one_bad_row() -> None:
    records, quarantined = _read(BAD_ROWS / "sharegpt_array.json")
    assert [r["location"].rsplit("#", 1)[1] for r in records] == ["0", "2"]
    [bad] = quarantined
    assert bad["location"].endswith("sharegpt_array.json#1")
    assert (bad["reason"], bad["detail"]) == (F.BAD_TYPE, "field 'chosen'.value is null")


# ---------------------------------------------------------------------------------------------
# Strict mode
# ---------------------------------------------------------------------------------------------
def test_strict_row_names_file_line_and_field() -> None:
    path = BAD_ROWS / "mixed.jsonl"
    rows = dict(F.iter_jsonl_bytes(path.read_bytes(), str(path)))
    with pytest.raises(F.BadRow) as info:
        F.normalise_row(rows[f"{path}:5"], source="s", location=f"{path}:5", strict=True)
    message = str(info.value)
    assert "mixed.jsonl" in message and ":5" in message and "'chosen'" in message
    assert (info.value.reason, info.value.field) == (F.BAD_TYPE, "chosen")
    assert isinstance(info.value, ValueError)


def test_strict_batch_stops_at_first_bad_line() -> None:
    path = BAD_ROWS / "mixed.jsonl"
    with pytest.raises(ValueError, match=r"mixed\.jsonl:2: invalid_utf8"):
        F.normalise_file_bytes(path.read_bytes(), str(path), source="s", strict=True)


# ---------------------------------------------------------------------------------------------
# Real public files (skipped when the shared data folder is absent)
# ---------------------------------------------------------------------------------------------
def _real(relative: str) -> Path:
    path = SHARED / relative
    if not path.is_file():
        pytest.skip(f"shared data file not found: {path}")
    return path


def _normalise_real(relative: str, source: str) -> tuple[list, list]:
    path = _real(relative)
    return F.normalise_file_bytes(path.read_bytes(), str(path), source=source)


def test_real_rewardbench_v1() -> None:
    records, quarantined = _normalise_real("rewardbench_v1/rewardbench_v1_filtered.jsonl", "rewardbench_v1")
    assert (len(records), len(quarantined)) == (2985, 0)
    subsets = Counter(r["subset"] for r in records)
    assert len(subsets) == 23 and subsets["math-prm"] == 447 and subsets["alpacaeval-easy"] == 100
    assert sum(r["id"] == "3692" for r in records) == 2  # duplicated upstream; ids need not be unique
    assert all(len(r["prompt"]) == 1 and r["prompt"][0]["role"] == "user" for r in records)


# HH-RLHF: the only rows quarantined are those whose final assistant turn is really empty
# ("...\n\nAssistant: " at the end of the transcript). Quirks that stay good rows: consecutive
# Assistant turns (a "Human:" marker lost its blank line upstream), and chosen/rejected that
# diverge before their last turn (prompt = common prefix, responses = several assistant turns).
HH_EXPECTED_QUARANTINE = {
    "hh_rlhf/helpful_train_sample.jsonl": (500, {248: "rejected"}),
    "hh_rlhf/harmless_train_sample.jsonl": (500, {}),
    "hh_rlhf/harmless-base_test.jsonl.gz": (
        2312,
        {87: "chosen", 517: "chosen", 926: "chosen", 1104: "chosen"},
    ),
}


@pytest.mark.parametrize("relative", sorted(HH_EXPECTED_QUARANTINE))
def test_real_hh_rlhf(relative: str) -> None:
    total, bad_lines = HH_EXPECTED_QUARANTINE[relative]
    records, quarantined = _normalise_real(relative, "hh_rlhf")
    assert len(records) + len(quarantined) == total
    assert len(quarantined) == len(bad_lines)
    for q in quarantined:
        line = int(q["location"].rsplit(":", 1)[1])
        assert q["reason"] == F.EMPTY_RESPONSE
        assert q["detail"] == f"field '{bad_lines[line]}' has an empty final assistant turn"
    assert all(r["prompt"][-1]["role"] == "user" and r["chosen"][0]["role"] == "assistant" for r in records)


def test_real_dpo_en_demo_sharegpt() -> None:
    records, quarantined = _normalise_real("dpo_demo/dpo_en_demo.json", "dpo_en_demo")
    assert (len(records), len(quarantined)) == (300, 0)
    assert records[0]["location"].endswith("dpo_en_demo.json#0")
    assert sum(r["prompt"][0]["role"] == "system" for r in records) == 80
