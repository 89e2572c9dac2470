"""Regenerate the bad-rows fixtures: ``python tests/data/bad_rows/make_fixtures.py``.

Written with bytes on purpose: one line must contain invalid UTF-8, which no text editor keeps.
The expected reason per line lives in tests/test_formats.py (EXPECTED_MIXED); keep them in sync.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _j(obj: object) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8")


HH_GOOD = "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?\n\nAssistant: "

MIXED_LINES: list[bytes] = [
    # 1 good: RewardBench-style strings, CRLF line ending
    _j({"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Dog.", "id": 7, "subset": "demo"})
    + b"\r",
    # 2 invalid UTF-8 (0xE9 is Latin-1 'e acute', not UTF-8)
    b'{"prompt": "caf\xe9?", "chosen": "yes", "rejected": "no"}',
    # 3 good: HH transcript
    _j({"chosen": HH_GOOD + "6.", "rejected": HH_GOOD + "7."}),
    # 4 broken JSON
    b'{"prompt": "truncated", "chosen": "a", ',
    # 5 null field
    _j({"prompt": "Q?", "chosen": None, "rejected": "A."}),
    # 6 non-string content
    _j(
        {
            "chosen": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": 42}],
            "rejected": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}],
        }
    ),
    # 7 blank line: skipped, not a row
    b"   ",
    # 8 empty response
    _j({"prompt": "Q?", "chosen": "A.", "rejected": "   "}),
    # 9 chosen == rejected
    _j({"prompt": "Q?", "chosen": "Same.", "rejected": "Same."}),
    # 10 broken HH transcript (no turn markers)
    _j({"chosen": "Hello there, no markers here.", "rejected": "\n\nHuman: Hi\n\nAssistant: Hello"}),
    # 11 missing field
    _j({"prompt": "Q?", "chosen": "A."}),
    # 12 unknown format
    _j({"text": "hello", "label": 1}),
    # 13 good: ShareGPT row inside a JSONL file
    _j(
        {
            "conversations": [{"from": "human", "value": "Hi"}],
            "chosen": {"from": "gpt", "value": "Hello!"},
            "rejected": {"from": "gpt", "value": "Go away."},
        }
    ),
    # 14 good: HelpSteer2 preference
    _j({"prompt": "Q?", "response_1": "R1", "response_2": "R2", "preference_strength": 2}),
    # 15 HelpSteer2 with no preference
    _j({"prompt": "Q?", "response_1": "R1", "response_2": "R2", "preference_strength": 0}),
    # 16 good: rating pair
    _j({"prompt": "Q?", "chosen": "Good.", "rejected": "Bad.", "score_chosen": 8.5, "score_rejected": 3}),
    # 17 non-numeric score
    _j({"prompt": "Q?", "chosen": "Good.", "rejected": "Bad.", "score_chosen": "high", "score_rejected": 3}),
    # 18 valid JSON but not an object
    b"[1, 2, 3]",
    # 19 good: conversational with the prompt folded in
    _j(
        {
            "chosen": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}],
            "rejected": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "B."}],
        }
    ),
    # 20 bad role order: two consecutive user turns
    _j(
        {
            "prompt": [{"role": "user", "content": "Q1"}, {"role": "user", "content": "Q2"}],
            "chosen": [{"role": "assistant", "content": "A."}],
            "rejected": [{"role": "assistant", "content": "B."}],
        }
    ),
    # 21 HH transcript whose chosen final assistant turn is empty
    _j({"chosen": HH_GOOD, "rejected": HH_GOOD + "6."}),
    # 22 good: TRL conversational with explicit prompt
    _j(
        {
            "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q?"}],
            "chosen": [{"role": "assistant", "content": "A."}],
            "rejected": [{"role": "assistant", "content": "B."}],
        }
    ),
]

SHAREGPT_ROWS: list[dict[str, object]] = [
    {
        "conversations": [{"from": "human", "value": "Hi"}],
        "chosen": {"from": "gpt", "value": "Hello!"},
        "rejected": {"from": "gpt", "value": "Bye."},
    },
    {
        "conversations": [{"from": "human", "value": "Hi"}],
        "chosen": {"from": "gpt", "value": None},
        "rejected": {"from": "gpt", "value": "Bye."},
    },
    {
        "conversations": [
            {"from": "system", "value": "Be kind."},
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello."},
            {"from": "human", "value": "How are you?"},
        ],
        "chosen": {"from": "gpt", "value": "Fine, thanks."},
        "rejected": {"from": "gpt", "value": "Why?"},
    },
]


def main() -> None:
    (HERE / "mixed.jsonl").write_bytes(b"\n".join(MIXED_LINES) + b"\n")
    (HERE / "sharegpt_array.json").write_text(json.dumps(SHAREGPT_ROWS, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
