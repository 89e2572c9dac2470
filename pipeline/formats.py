"""Normalise public preference-data formats into one canonical record.

Every input row ends up in exactly one of two places:

* a canonical :class:`Record` (``id``, ``prompt``, ``chosen``, ``rejected``, ``source``,
  ``location``, ``subset``, ``margin``), or
* a :class:`QuarantineRecord` (``source``, ``location``, ``reason``, ``detail``) whose ``reason``
  is one of :data:`REASONS`.

Bad data never raises (unless ``strict=True``), so a Ray Data ``map_batches``/``flat_map`` over
millions of rows cannot be killed by one malformed line, and no row disappears silently.

The module is pure Python + stdlib on purpose: it runs inside Ray workers and in unit tests
without a cluster.  Containers coming from Arrow/numpy batches (numpy arrays, numpy scalars)
are accepted through duck typing, without importing numpy.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import numbers
import re
import random
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypedDict

# --------------------------------------------------------------------------------------------
# Reason codes
# --------------------------------------------------------------------------------------------
INVALID_JSON = "invalid_json"
INVALID_UTF8 = "invalid_utf8"
MISSING_FIELD = "missing_field"
BAD_TYPE = "bad_type"
EMPTY_RESPONSE = "empty_response"
IDENTICAL_RESPONSES = "identical_responses"
NO_PREFERENCE = "no_preference"
BROKEN_TRANSCRIPT = "broken_transcript"
UNKNOWN_FORMAT = "unknown_format"
TIE = "tie"  # equal ratings or ranks, or a tie label: no preference to learn
INVERTED = "inverted"  # a rating row whose 'chosen' side scored lower than its 'rejected' side
NO_LOWER_RATED = "no_lower_rated"  # k responses, none rated below the best: no rejected to draw (best_vs_random)
OVER_LENGTH = "over_length"  # assigned later by the tokeniser stage, never here
CONTAMINATED = "contaminated"  # assigned later by the data stage (data.decontaminate), never here
SUBSAMPLED = "subsampled"  # assigned later by the data stage (a source weight below 1), never here

REASONS: tuple[str, ...] = (
    INVALID_JSON,
    INVALID_UTF8,
    MISSING_FIELD,
    BAD_TYPE,
    EMPTY_RESPONSE,
    IDENTICAL_RESPONSES,
    NO_PREFERENCE,
    BROKEN_TRANSCRIPT,
    UNKNOWN_FORMAT,
    TIE,
    INVERTED,
    NO_LOWER_RATED,
    OVER_LENGTH,
    CONTAMINATED,
    SUBSAMPLED,
)

# --------------------------------------------------------------------------------------------
# Format names (the same strings are accepted from config to override detection)
# --------------------------------------------------------------------------------------------
STRINGS = "strings"
CONVERSATIONAL = "conversational"
HH = "hh"
SHAREGPT = "sharegpt"
HELPSTEER2 = "helpsteer2"
RATING = "rating"
UNIFIED_FEEDBACK = "unified_feedback"
PKU_SAFERLHF = "pku_saferlhf"
ARENA = "arena"
ULTRAFEEDBACK = "ultrafeedback"
KWISE = "kwise"
COLUMNS = "columns"  # a user's column mapping (RowOptions.columns); never detected
AUTO = "auto"
UNKNOWN = "unknown"  # returned by detect_format(); not a valid override

FORMATS: tuple[str, ...] = (STRINGS, CONVERSATIONAL, HH, SHAREGPT, HELPSTEER2, RATING, UNIFIED_FEEDBACK,
                            PKU_SAFERLHF, ARENA, ULTRAFEEDBACK, KWISE, COLUMNS)
ASPECTS = ("helpfulness", "honesty", "instruction_following", "truthfulness")


@dataclass(frozen=True)
class RowOptions:
    """Per-source choices of how rows become pairs (the data stage fills them from ``data.sources[i]``)."""

    follow: str = "better"  # PKU-SafeRLHF: better_response_id or safer_response_id
    aspect: str = "overall"  # UltraFeedback: overall_score, the mean of the aspect Ratings, or one aspect's Rating
    pairs: str = "auto"  # best_vs_random | best_vs_rest | all_pairs (auto: per format)
    ties: str = "quarantine"  # or keep (rating format: train as given, margin 0)
    columns: Mapping[str, Any] | None = None  # the column mapping of format 'columns'
    margin_scale: str = "range"  # Unified-Feedback: rating difference / the sub-source's rating range, or raw

SYSTEM, USER, ASSISTANT = "system", "user", "assistant"

# Lower-cased role spellings seen in public datasets -> canonical role.
_ROLE_ALIASES: dict[str, str] = {
    "system": SYSTEM,
    "user": USER,
    "human": USER,
    "assistant": ASSISTANT,
    "gpt": ASSISTANT,
    "bot": ASSISTANT,
    "model": ASSISTANT,
}

QUARANTINE_KEYS = frozenset({"source", "location", "reason", "detail"})
_GZIP_MAGIC = b"\x1f\x8b"
_UTF8_BOM = b"\xef\xbb\xbf"


class Message(TypedDict):
    """One conversation turn."""

    role: str
    content: str


class Record(TypedDict):
    """The canonical preference record produced for every good row."""

    id: str
    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]
    source: str
    location: str
    subset: str | None
    margin: float | None


class QuarantineRecord(TypedDict):
    """Where a bad row went and why."""

    source: str
    location: str
    reason: str
    detail: str


# (prompt turns, chosen turns, rejected turns, margin) as extracted from one raw row.
_Parts = tuple[list[Message], list[Message], list[Message], float | None]
Located = tuple[str, Any]  # (location, raw row dict or QuarantineRecord)


class BadRow(ValueError):
    """A row that cannot become a canonical record.

    Subclasses ``ValueError`` so strict-mode callers can catch either.  ``field`` is the
    top-level input field at fault (``None`` for whole-line problems such as broken JSON).
    """

    def __init__(self, reason: str, detail: str, field: str | None = None, location: str | None = None):
        super().__init__(reason, detail, field, location)
        self.reason = reason
        self.detail = detail
        self.field = field
        self.location = location

    def __str__(self) -> str:
        prefix = f"{self.location}: " if self.location else ""
        return f"{prefix}{self.reason}: {self.detail}"


def make_quarantine(source: str, location: str, reason: str, detail: str) -> QuarantineRecord:
    """Build a quarantine record (``reason`` must be one of :data:`REASONS`)."""
    if reason not in REASONS:
        raise ValueError(f"unknown quarantine reason {reason!r}")
    return {"source": source, "location": location, "reason": reason, "detail": detail}


def is_quarantine(obj: Any) -> bool:
    """True if ``obj`` is a quarantine record (readers emit them inline with raw rows)."""
    return isinstance(obj, Mapping) and set(obj) == QUARANTINE_KEYS and obj.get("reason") in REASONS


def location_for_line(path: str, line: int) -> str:
    """Location of a line-oriented row; ``line`` is 1-based."""
    return f"{path}:{line}"


def location_for_index(path: str, index: int) -> str:
    """Location of a row-indexed row (JSON array, Parquet, HF dataset); ``index`` is 0-based."""
    return f"{path}#{index}"


# --------------------------------------------------------------------------------------------
# Small value helpers
# --------------------------------------------------------------------------------------------
def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _field(row: Mapping[str, Any], name: str) -> Any:
    """Fetch a required top-level field."""
    if name not in row:
        raise BadRow(MISSING_FIELD, f"field '{name}' is missing", name)
    return row[name]


def _as_list(value: Any) -> list[Any] | None:
    """Return ``value`` as a list if it is list-like (list, tuple, numpy array), else None."""
    if isinstance(value, (list, tuple)):
        return list(value)
    # numpy arrays arrive from Ray's default batch format; avoid importing numpy for them.
    if not isinstance(value, (str, bytes, Mapping)) and hasattr(value, "tolist"):
        converted = value.tolist()
        return converted if isinstance(converted, list) else None
    return None


def _text(value: Any, where: str, field: str) -> str:
    """Validate one content/text value: a str that can be encoded as UTF-8."""
    if not isinstance(value, str):
        expected = "" if value is None else ", expected a string"
        raise BadRow(BAD_TYPE, f"{where} is {_type_name(value)}{expected}", field)
    # Lone surrogates come from "\\ud800"-style JSON escapes or from surrogateescape decoding;
    # they would crash Arrow/tokenisers later, so they count as invalid UTF-8 here.
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise BadRow(INVALID_UTF8, f"{where} is not valid UTF-8 ({exc.reason} at {exc.start})", field) from None
    return str(value)  # plain str even if a subclass (numpy.str_) came in


def _number(value: Any, where: str, field: str) -> float:
    """Validate a finite real number (bools and numeric strings are rejected)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise BadRow(BAD_TYPE, f"{where} is {_type_name(value)}, expected a number", field)
    number = float(value)
    if not math.isfinite(number):  # json.loads accepts NaN/Infinity; they would poison the loss
        raise BadRow(BAD_TYPE, f"{where} is {number}, expected a finite number", field)
    return number


# --------------------------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------------------------
def _role(value: Any, where: str, field: str) -> str:
    """Map a role spelling (``human``, ``gpt``, ...) to system/user/assistant."""
    if not isinstance(value, str):
        raise BadRow(BAD_TYPE, f"{where} is {_type_name(value)}, expected a role string", field)
    role = _ROLE_ALIASES.get(value.strip().lower())
    if role is None:
        # Tool/function turns have no place in a pairwise reward-model conversation.
        raise BadRow(BROKEN_TRANSCRIPT, f"{where} has unsupported role {value!r}", field)
    return role


def _message(obj: Any, field: str, index: int | None) -> Message:
    """Normalise one message given as {role, content} or ShareGPT {from, value}."""
    where = f"field '{field}'" + ("" if index is None else f"[{index}]")
    if not isinstance(obj, Mapping):
        raise BadRow(BAD_TYPE, f"{where} is {_type_name(obj)}, expected a message object", field)
    role_key = "role" if "role" in obj else "from" if "from" in obj else None
    content_key = "content" if "content" in obj else "value" if "value" in obj else None
    if role_key is None:
        raise BadRow(MISSING_FIELD, f"{where} has no 'role' (or 'from')", field)
    if content_key is None:
        raise BadRow(MISSING_FIELD, f"{where} has no 'content' (or 'value')", field)
    role = _role(obj[role_key], f"{where}.{role_key}", field)
    return {"role": role, "content": _text(obj[content_key], f"{where}.{content_key}", field)}


def _turns(value: Any, field: str, default_role: str) -> list[Message]:
    """Turn a field into messages: a plain string, one message object, or a list of messages."""
    if isinstance(value, str):
        return [{"role": default_role, "content": _text(value, f"field '{field}'", field)}]
    if isinstance(value, Mapping):  # ShareGPT stores the single response as one object
        return [_message(value, field, None)]
    items = _as_list(value)
    if items is None:
        expected = "" if value is None else ", expected a string or a list of messages"
        raise BadRow(BAD_TYPE, f"field '{field}' is {_type_name(value)}{expected}", field)
    return [_message(item, field, i) for i, item in enumerate(items)]


# --------------------------------------------------------------------------------------------
# Transcript parsers
# --------------------------------------------------------------------------------------------
# HH-RLHF turns start with "\n\nHuman:" / "\n\nAssistant:"; a bare "Human:" is also accepted at
# the very start.  Markers without the blank line ("...  Human: hi") are text, as in the source.
_HH_MARKER = re.compile(r"(?:^|\n\n)(Human|Assistant):")
_HH_ROLES = {"Human": USER, "Assistant": ASSISTANT}

# HelpSteer2 multi-turn prompts: "{user 1}\n<extra_id_1>Assistant\n{assistant 1}\n<extra_id_1>User\n{user 2}".
_HS2_MARKER = re.compile(r"\n?<extra_id_1>(User|Assistant)\n?")
_HS2_ROLES = {"User": USER, "Assistant": ASSISTANT}


def _parse_hh(text: str, field: str) -> list[Message]:
    """Split an HH-RLHF transcript into turns (contents stripped of marker padding)."""
    if not text.strip():
        raise BadRow(EMPTY_RESPONSE, f"field '{field}' is an empty transcript", field)
    marks = list(_HH_MARKER.finditer(text))
    if not marks:
        raise BadRow(BROKEN_TRANSCRIPT, f"field '{field}' has no 'Human:'/'Assistant:' turn markers", field)
    if text[: marks[0].start()].strip():
        raise BadRow(BROKEN_TRANSCRIPT, f"field '{field}' has text before the first turn marker", field)
    ends = [m.start() for m in marks[1:]] + [len(text)]
    return [
        {"role": _HH_ROLES[m.group(1)], "content": text[m.end() : end].strip()}
        for m, end in zip(marks, ends, strict=True)
    ]


def _parse_helpsteer2_prompt(text: str) -> list[Message]:
    """Split a HelpSteer2 prompt into turns; single-turn prompts have no markers."""
    parts = _HS2_MARKER.split(text)
    # re.split with one group gives [user1, role, text, role, text, ...].
    turns: list[Message] = [{"role": USER, "content": parts[0]}]
    for role, content in zip(parts[1::2], parts[2::2], strict=True):
        turns.append({"role": _HS2_ROLES[role], "content": content})
    return turns


# --------------------------------------------------------------------------------------------
# Format detection
# --------------------------------------------------------------------------------------------
def detect_format(row: Mapping[str, Any]) -> str:
    """Name the format of ``row`` (one of :data:`FORMATS`) or return :data:`UNKNOWN`.

    The checks go from the most specific signature key to the least specific, so each row
    matches exactly one format.  Detection only looks at keys and container types; a row with
    the right keys but bad values is detected and then quarantined with a precise reason
    (e.g. a null ``chosen``), rather than reported as ``unknown_format``.
    """
    if not isinstance(row, Mapping):
        return UNKNOWN
    if "conversations" in row:
        return SHAREGPT
    if "conv_A" in row or "conv_B" in row:
        return UNIFIED_FEEDBACK
    if "response_0" in row or "better_response_id" in row or "safer_response_id" in row:
        return PKU_SAFERLHF
    if "response_a" in row or "winner_model_a" in row:
        return ARENA
    if "completions" in row:
        return ULTRAFEEDBACK
    if "answers" in row:
        return KWISE
    if "response_1" in row or "response_2" in row:
        return HELPSTEER2
    if "score_chosen" in row or "score_rejected" in row:
        return RATING
    if "chosen" not in row and "rejected" not in row:
        return UNKNOWN
    if any(_as_list(row.get(key)) is not None for key in ("prompt", "chosen", "rejected")):
        return CONVERSATIONAL
    if "prompt" in row:
        return STRINGS
    return HH  # chosen/rejected strings without a prompt: full transcripts


# --------------------------------------------------------------------------------------------
# Per-format extraction: raw row -> (prompt, chosen, rejected, margin) before prefix splitting
# --------------------------------------------------------------------------------------------
def _extract_strings(row: Mapping[str, Any]) -> _Parts:
    """RewardBench v1 / TRL standard: prompt, chosen, rejected strings."""
    prompt = _turns(_field(row, "prompt"), "prompt", USER)
    chosen = _turns(_field(row, "chosen"), "chosen", ASSISTANT)
    return prompt, chosen, _turns(_field(row, "rejected"), "rejected", ASSISTANT), None


def _extract_conversational(row: Mapping[str, Any]) -> _Parts:
    """Message lists, prompt either folded into chosen/rejected or given explicitly."""
    prompt = _turns(row["prompt"], "prompt", USER) if "prompt" in row else []
    chosen = _turns(_field(row, "chosen"), "chosen", ASSISTANT)
    return prompt, chosen, _turns(_field(row, "rejected"), "rejected", ASSISTANT), None


def _extract_hh(row: Mapping[str, Any]) -> _Parts:
    """Anthropic HH-RLHF: two full transcripts; the prompt is found by prefix splitting."""
    chosen = _parse_hh(_text(_field(row, "chosen"), "field 'chosen'", "chosen"), "chosen")
    rejected = _parse_hh(_text(_field(row, "rejected"), "field 'rejected'", "rejected"), "rejected")
    return [], chosen, rejected, None


def _extract_sharegpt(row: Mapping[str, Any]) -> _Parts:
    """ShareGPT / LLaMA-Factory: conversations + single chosen/rejected message objects."""
    prompt = _turns(_field(row, "conversations"), "conversations", USER)
    system = row.get("system")
    if system is not None and _text(system, "field 'system'", "system").strip():
        prompt = [{"role": SYSTEM, "content": str(system)}, *prompt]
    chosen = _turns(_field(row, "chosen"), "chosen", ASSISTANT)
    return prompt, chosen, _turns(_field(row, "rejected"), "rejected", ASSISTANT), None


def _reply(text: str) -> list[Message]:
    """A single assistant turn."""
    return [{"role": ASSISTANT, "content": text}]


def _extract_helpsteer2(row: Mapping[str, Any]) -> _Parts:
    """HelpSteer2 preference: sign of preference_strength picks the winner, abs() is the margin."""
    raw_prompt = _field(row, "prompt")
    if isinstance(raw_prompt, str):
        prompt = _parse_helpsteer2_prompt(_text(raw_prompt, "field 'prompt'", "prompt"))
    else:
        prompt = _turns(raw_prompt, "prompt", USER)
    first = _text(_field(row, "response_1"), "field 'response_1'", "response_1")
    second = _text(_field(row, "response_2"), "field 'response_2'", "response_2")
    strength = _number(
        _field(row, "preference_strength"), "field 'preference_strength'", "preference_strength"
    )
    if strength == 0:
        raise BadRow(NO_PREFERENCE, "field 'preference_strength' is 0 (no preference)", "preference_strength")
    # Negative strength means response_1 is preferred (HelpSteer2-Preference convention).
    chosen, rejected = (first, second) if strength < 0 else (second, first)
    return prompt, _reply(chosen), _reply(rejected), abs(strength)


def _extract_rating(row: Mapping[str, Any], options: RowOptions) -> _Parts:
    """Scored pairs (e.g. UltraFeedback-binarized): margin = score_chosen - score_rejected. Equal scores are a tie
    (quarantined unless ``ties: keep``); a 'chosen' side that scored lower is quarantined as inverted."""
    high = _number(_field(row, "score_chosen"), "field 'score_chosen'", "score_chosen")
    low = _number(_field(row, "score_rejected"), "field 'score_rejected'", "score_rejected")
    if high == low and options.ties != "keep":
        raise BadRow(TIE, f"fields 'score_chosen' and 'score_rejected' are both {high}", "score_chosen")
    if high < low:
        raise BadRow(INVERTED, f"field 'score_chosen' ({high}) is below 'score_rejected' ({low})", "score_chosen")
    prompt, chosen, rejected, _ = _extract_conversational(row)
    return prompt, chosen, rejected, high - low


#: Unified-Feedback: each sub-source keeps its own rating scale. The width of each scale (highest minus lowest rating
#: a response can get), keyed by the row's ``source``, read from the dataset's builder (github.com/jdf-prog/
#: UnifiedFeedback, process_and_upload_dataset.py at commit 514a566828dca9b627f7d5eacbf2a675cc7c8073):
UNIFIED_FEEDBACK_RATING_RANGE: dict[str, float] = {
    "lmsys/chatbot_arena_conversations": 1.0,  # winner 1.0, loser 0.0 (a tie is 0.5 / 0.5)
    "Anthropic/hh-rlhf": 1.0,  # chosen 1.0, rejected 0.0
    "openai/summarize_from_feedback(comparisons)": 1.0,  # the human's choice 1, the other 0
    "Dahoas/synthetic-instruct-gptj-pairwise": 1.0,  # chosen 1, rejected 0
    "berkeley-nest/Nectar": 6.0,  # minus the rank: -1 (best) .. -7
    "argilla/ultrafeedback-binarized-preferences-cleaned": 4.0,  # Argilla's mean of the 1-5 aspect ratings
    "openai/webgpt_comparisons": 2.0,  # score_0 / score_1 in [-1, 1]
    # the UltraFeedback config keeps UltraFeedback's own 'source'; its rating is overall_score, 1-10
    **dict.fromkeys(("evol_instruct", "false_qa", "flan", "sharegpt", "truthful_qa", "ultrachat"), 9.0),
}


def _unified_feedback_margin(row: Mapping[str, Any], difference: float, options: RowOptions) -> float | None:
    """The rating difference on one scale for every sub-source: divided by the sub-source's rating range
    (``margin_scale: range``, so margins lie in (0, 1]: 1 for every binary-label sub-source, a share of the scale
    for rated ones), or as given (``raw``). A sub-source whose scale is not known gets no margin (None): the data
    stage then counts it under ``data.missing_margin`` rather than mixing an unknown scale in.

    Scaled rather than refused: the paper trains on the mixed ``all`` configuration, where raw differences are 1
    for half the sub-sources and up to 6 or 9 for two of them, so those two would dominate the margin term; a
    refusal would leave ``loss.use_margin`` unusable there. The range keeps each sub-source's order and relative
    strength, and a 1/0 label (no strength stated) counts as a full-scale preference."""
    if options.margin_scale == "raw":
        return difference
    scale = UNIFIED_FEEDBACK_RATING_RANGE.get(row.get("source")) if isinstance(row.get("source"), str) else None
    return None if scale is None else difference / scale


def _extract_unified_feedback(row: Mapping[str, Any], options: RowOptions) -> _Parts:
    """llm-blender/Unified-Feedback: two full conversations and their ratings; the higher one is chosen. The margin
    is the rating difference on one scale (:func:`_unified_feedback_margin`). Equal ratings (an arena tie is
    0.5 / 0.5) are a tie."""
    a = _turns(_field(row, "conv_A"), "conv_A", ASSISTANT)
    b = _turns(_field(row, "conv_B"), "conv_B", ASSISTANT)
    rating_a = _number(_field(row, "conv_A_rating"), "field 'conv_A_rating'", "conv_A_rating")
    rating_b = _number(_field(row, "conv_B_rating"), "field 'conv_B_rating'", "conv_B_rating")
    if rating_a == rating_b:
        raise BadRow(TIE, f"fields 'conv_A_rating' and 'conv_B_rating' are both {rating_a}", "conv_A_rating")
    chosen, rejected = (a, b) if rating_a > rating_b else (b, a)
    return [], chosen, rejected, _unified_feedback_margin(row, abs(rating_a - rating_b), options)


def _extract_pku(row: Mapping[str, Any], options: RowOptions) -> _Parts:
    """PKU-SafeRLHF: ``better_response_id`` or ``safer_response_id`` (``follow``), 0 or 1, names the chosen one."""
    key = f"{options.follow}_response_id"
    index = _field(row, key)
    if isinstance(index, bool) or not isinstance(index, numbers.Real) or index not in (0, 1):
        raise BadRow(BAD_TYPE, f"field '{key}' is {index!r}, expected 0 or 1", key)
    index = int(index)  # a Parquet column with a missing value stores 1 as 1.0
    prompt = _turns(_field(row, "prompt"), "prompt", USER)
    responses = [_text(_field(row, f"response_{i}"), f"field 'response_{i}'", f"response_{i}") for i in (0, 1)]
    return prompt, _reply(responses[index]), _reply(responses[1 - index]), None


def _json_turns(value: Any, field: str) -> list[Any]:
    """Arena-style turns: a JSON-encoded list of strings (entries may be null), a list, or one plain string."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise BadRow(BAD_TYPE, f"field '{field}' looks like a JSON list but does not parse: {exc}", field) from None
    if isinstance(value, str):
        return [value]
    items = _as_list(value)
    if items is None:
        raise BadRow(BAD_TYPE, f"field '{field}' is {_type_name(value)}, expected a string or a list of turns", field)
    return items


def _extract_arena(row: Mapping[str, Any]) -> _Parts:
    """Chatbot-Arena human preference (lmarena-ai/arena-human-preference-55k): user turns in ``prompt`` and each
    model's replies in ``response_a`` / ``response_b`` (JSON-encoded lists, null for a missing reply), one-hot
    ``winner_model_a`` / ``winner_model_b`` / ``winner_tie``. The whole conversation with the winner's replies is
    the chosen side; a tie is quarantined."""
    flags = {k: _number(_field(row, k), f"field '{k}'", k) for k in ("winner_model_a", "winner_model_b")}
    if row.get("winner_tie") not in (None, 0, False) or flags["winner_model_a"] == flags["winner_model_b"]:
        raise BadRow(TIE, "the judge preferred neither response (winner_tie)", "winner_tie")
    users = _json_turns(_field(row, "prompt"), "prompt")
    sides = {k: _json_turns(_field(row, f"response_{k}"), f"response_{k}") for k in ("a", "b")}
    conversations = {}
    for k, replies in sides.items():
        if len(replies) != len(users):
            raise BadRow(BROKEN_TRANSCRIPT, f"field 'response_{k}' has {len(replies)} turns for {len(users)} "
                                            f"prompt turns", f"response_{k}")
        turns: list[Message] = []
        for i, (user, reply) in enumerate(zip(users, replies, strict=True)):
            turns.append({"role": USER, "content": _text("" if user is None else user, f"field 'prompt'[{i}]",
                                                         "prompt")})
            turns.append({"role": ASSISTANT, "content": _text("" if reply is None else reply,
                                                              f"field 'response_{k}'[{i}]", f"response_{k}")})
        conversations[k] = turns
    winner = "a" if flags["winner_model_a"] > flags["winner_model_b"] else "b"
    return [], conversations[winner], conversations["b" if winner == "a" else "a"], None


def _score(value: Any, where: str, field: str) -> float | None:
    """A rating that may be a number, a numeric string ("4") or missing ("N/A", null): None when missing."""
    if value is None or (isinstance(value, str) and value.strip().upper() in ("N/A", "NA", "")):
        return None
    if isinstance(value, str):
        try:
            return _number(float(value), where, field)
        except ValueError:
            raise BadRow(BAD_TYPE, f"{where} is {value!r}, expected a number or N/A", field) from None
    return _number(value, where, field)


def _ranked_pairs(scores: list[float | None], policy: str, seed: str) -> list[tuple[int, int] | BadRow]:
    """Index pairs ``(chosen, rejected)`` from per-response scores (higher is better; None: unscored, left out),
    per ``policy``; a pair of equal scores becomes a ``tie`` BadRow in its place. ``best_vs_random`` draws the
    rejected among the responses rated below the best (a row with none is a ``no_lower_rated`` BadRow)."""
    scored = [i for i, v in enumerate(scores) if v is not None]
    if len(scored) < 2:
        raise BadRow(NO_PREFERENCE, f"{len(scored)} scored response(s): nothing to compare")
    best = max(scored, key=lambda i: (scores[i], -i))
    others = [i for i in scored if i != best]
    if policy == "all_pairs":
        pairs = [(i, j) for n, i in enumerate(scored) for j in scored[n + 1:]]
    elif policy == "best_vs_rest":
        pairs = [(best, j) for j in others]
    else:  # best_vs_random: one response rated below the best, drawn with a seed taken from the row (reruns agree)
        lower = [i for i in others if scores[i] < scores[best]]
        if not lower:
            raise BadRow(NO_LOWER_RATED, f"all {len(scored)} scored responses are rated {scores[best]}: none below "
                                         f"the best to reject")
        pairs = [(best, random.Random(seed).choice(lower))]
    out: list[tuple[int, int] | BadRow] = []
    for i, j in pairs:
        if scores[i] == scores[j]:
            out.append(BadRow(TIE, f"responses {i} and {j} have the same score {scores[i]}"))
        else:
            out.append((i, j) if scores[i] > scores[j] else (j, i))
    return out


def _aspect_rating(completion: Mapping[str, Any], aspect: str, where: str) -> float | None:
    """One aspect's ``Rating`` of an UltraFeedback completion (a string "1".."5", or "N/A": None)."""
    annotations = completion.get("annotations")
    rating = (annotations if isinstance(annotations, Mapping) else {}).get(aspect) or {}
    rating = rating[0] if isinstance(rating, list) and rating else rating  # the GitHub release nests lists
    return _score(rating.get("Rating") if isinstance(rating, Mapping) else None,
                  f"{where}.annotations.{aspect}.Rating", "completions")


def _completion_score(completion: Mapping[str, Any], aspect: str, where: str) -> float | None:
    """What orders UltraFeedback completions: ``overall`` (the critique's ``overall_score``, 1-10), ``mean`` (the mean
    of the aspect Ratings that are not "N/A", 1-5: what UltraFeedback stores as ``fine-grained_score``), or one
    aspect's Rating (1-5). None when unscored."""
    if aspect == "overall":
        return _score(completion.get("overall_score"), f"{where}.overall_score", "completions")
    if aspect == "mean":
        rated = [r for r in (_aspect_rating(completion, a, where) for a in ASPECTS) if r is not None]
        return sum(rated) / len(rated) if rated else None
    return _aspect_rating(completion, aspect, where)


def _extract_ultrafeedback(row: Mapping[str, Any], options: RowOptions) -> list[tuple[str, _Parts | BadRow]]:
    """openbmb/UltraFeedback raw rows: ``instruction`` and ``completions`` (each a ``response`` with ``overall_score``
    and per-aspect ``annotations[aspect].Rating``, "N/A" when not rated), ordered by ``aspect``
    (:func:`_completion_score`); pairs per ``pairs``; margin = the score difference on that score's scale.

    ``pairs: auto`` is ``best_vs_random``, the binarised sets' rule: the chosen is the best-rated completion (the first
    of equals), the rejected is drawn at random among the completions rated *below* it, with a seed taken from the
    prompt, so a row gives a pair whenever any completion is rated lower (``[8, 8, 5, 3]`` always does). A row whose
    scored completions are all rated the same has no rejected to draw: ``no_lower_rated``. Read, not copied:

    * argilla/ultrafeedback-binarized-preferences, README.md at commit ab666e438ca6e63d52430720144e3d2c567fcae3
      (huggingface.co/datasets/argilla/ultrafeedback-binarized-preferences): the mean of the aspect ratings replaces
      ``overall_score`` (critiques rated 10 whose rationale was negative), the best mean is chosen, and the rejected
      is "a random response with lower mean rating", equal only when none is lower, those rows filtered out. Its
      successor argilla/ultrafeedback-binarized-preferences-cleaned (README.md at 91376df778fc031c79bf47bf69df0d611fb46387)
      binarises the same way, less the TruthfulQA-contaminated prompts. ``aspect: mean`` is its score.
    * HuggingFaceH4/ultrafeedback_binarized, README.md at 2a3fb934ee563e5441bf211adaf5215c3fa508dd: the highest
      ``overall_score`` is chosen and "one of the remaining 3 at random" rejected. Public derivatives of its
      ``create_dataset.py`` (the file itself, on the Hub, was not reachable) draw over all completions and redraw
      only while the draw is the chosen one, so a completion rated the same as the best can be H4's rejected: its
      pairs can tie. The rule here is Argilla's; it agrees with H4's on the chosen completion and on every draw of
      H4's that is rated lower.
    """
    prompt = _turns(_field(row, "instruction"), "instruction", USER)
    completions = _as_list(_field(row, "completions"))
    if completions is None:
        raise BadRow(BAD_TYPE, "field 'completions' is not a list", "completions")
    responses, scores = [], []
    for k, completion in enumerate(completions):
        where = f"field 'completions'[{k}]"
        if not isinstance(completion, Mapping):
            raise BadRow(BAD_TYPE, f"{where} is {_type_name(completion)}, expected an object", "completions")
        responses.append(_text(completion.get("response"), f"{where}.response", "completions"))
        scores.append(_completion_score(completion, options.aspect, where))
    policy = "best_vs_random" if options.pairs == "auto" else options.pairs
    seed = json.dumps([m["content"] for m in prompt])
    return [(f"{p[0]}>{p[1]}", (prompt, _reply(responses[p[0]]), _reply(responses[p[1]]), scores[p[0]] - scores[p[1]]))
            if not isinstance(p, BadRow) else ("", p) for p in _ranked_pairs(scores, policy, seed)]


def _extract_kwise(row: Mapping[str, Any], options: RowOptions) -> list[tuple[str, _Parts | BadRow]]:
    """k-wise rankings (berkeley-nest/Nectar): a prompt (HH transcript or text) and ``answers`` with ``rank``
    (1 = best). Pairs per ``pairs`` (auto: the best vs each other); equal ranks are ties; no margin (ranks are
    orders, not strengths)."""
    raw = _field(row, "prompt")
    if isinstance(raw, str) and _HH_MARKER.search(raw):
        prompt = _parse_hh(raw, "prompt")
        if prompt and prompt[-1]["role"] == ASSISTANT and not prompt[-1]["content"].strip():
            prompt = prompt[:-1]  # the transcript ends with the open "Assistant:" the answers complete
    else:
        prompt = _turns(raw, "prompt", USER)
    answers = _as_list(_field(row, "answers"))
    if answers is None:
        raise BadRow(BAD_TYPE, "field 'answers' is not a list", "answers")
    texts, scores = [], []
    for k, answer in enumerate(answers):
        where = f"field 'answers'[{k}]"
        if not isinstance(answer, Mapping):
            raise BadRow(BAD_TYPE, f"{where} is {_type_name(answer)}, expected an object", "answers")
        texts.append(_text(answer.get("answer"), f"{where}.answer", "answers"))
        rank = _score(answer.get("rank"), f"{where}.rank", "answers")
        scores.append(None if rank is None else -rank)
    policy = "best_vs_rest" if options.pairs == "auto" else options.pairs
    seed = json.dumps([m["content"] for m in prompt])
    return [(f"{p[0]}>{p[1]}", (prompt, _reply(texts[p[0]]), _reply(texts[p[1]]), None))
            if not isinstance(p, BadRow) else ("", p) for p in _ranked_pairs(scores, policy, seed)]


def _column(row: Mapping[str, Any], name: str) -> Any:
    if name not in row:
        keys = ", ".join(sorted(map(str, row))[:12])
        raise BadRow(MISSING_FIELD, f"column '{name}' (named in the source's columns mapping) is missing; the row "
                                    f"has: {keys}", name)
    return row[name]


def _extract_columns(row: Mapping[str, Any], options: RowOptions) -> _Parts:
    """A user's column mapping: prompt (optional), chosen + rejected, or first + second + label with the value
    meaning "first is better" (and optionally a tie value); an optional margin column."""
    columns = dict(options.columns or {})
    prompt = _turns(_column(row, columns["prompt"]), columns["prompt"], USER) if columns.get("prompt") else []
    if columns.get("chosen"):
        chosen = _turns(_column(row, columns["chosen"]), columns["chosen"], ASSISTANT)
        rejected = _turns(_column(row, columns["rejected"]), columns["rejected"], ASSISTANT)
    else:
        label = _column(row, columns["label"])
        name = columns["label"]
        if label is None:
            raise BadRow(MISSING_FIELD, f"column '{name}' is null: no preference stated", name)
        if columns.get("tie") is not None and _same(label, columns["tie"]):
            raise BadRow(TIE, f"column '{name}' is {label!r}, the tie value", name)
        first_wins = _same(label, columns["first_is_better"])
        if not first_wins and columns.get("second_is_better") is not None and \
                not _same(label, columns["second_is_better"]):
            raise BadRow(BAD_TYPE, f"column '{name}' is {label!r}: neither first_is_better "
                                   f"({columns['first_is_better']!r}) nor second_is_better "
                                   f"({columns['second_is_better']!r})", name)
        first = _turns(_column(row, columns["first"]), columns["first"], ASSISTANT)
        second = _turns(_column(row, columns["second"]), columns["second"], ASSISTANT)
        chosen, rejected = (first, second) if first_wins else (second, first)
    margin = None
    if columns.get("margin"):
        margin = _number(_column(row, columns["margin"]), f"column '{columns['margin']}'", columns["margin"])
    return prompt, chosen, rejected, margin


def _same(value: Any, configured: Any) -> bool:
    """A label equals a configured value; across types by text (a label column of "1" and a configured 1)."""
    if isinstance(value, bool) != isinstance(configured, bool):
        return False
    return value == configured or str(value) == str(configured)


def _one(extract):
    return lambda row, options: [("", extract(row))]


def _one_with(extract):
    return lambda row, options: [("", extract(row, options))]


#: format -> (row, options) -> [(pair suffix, parts or BadRow), ...]: most formats give one pair per row.
_EXTRACTORS = {
    STRINGS: _one(_extract_strings),
    CONVERSATIONAL: _one(_extract_conversational),
    HH: _one(_extract_hh),
    SHAREGPT: _one(_extract_sharegpt),
    HELPSTEER2: _one(_extract_helpsteer2),
    RATING: _one_with(_extract_rating),
    UNIFIED_FEEDBACK: _one_with(_extract_unified_feedback),
    PKU_SAFERLHF: _one_with(_extract_pku),
    ARENA: _one(_extract_arena),
    ULTRAFEEDBACK: _extract_ultrafeedback,
    KWISE: _extract_kwise,
    COLUMNS: _one_with(_extract_columns),
}


# --------------------------------------------------------------------------------------------
# Shared prompt splitting and conversation checks
# --------------------------------------------------------------------------------------------
def _key(turns: list[Message]) -> list[tuple[str, str]]:
    """Comparison key: surrounding whitespace is not a real difference between two turns."""
    return [(m["role"], m["content"].strip()) for m in turns]


def _common_prefix_len(left: list[Message], right: list[Message]) -> int:
    count = 0
    for a, b in zip(_key(left), _key(right), strict=False):
        if a != b:
            break
        count += 1
    return count


def _check_final_turns(chosen: list[Message], rejected: list[Message]) -> None:
    """An empty (or whitespace) final turn is a genuinely empty response."""
    for field, turns in (("chosen", chosen), ("rejected", rejected)):
        if not turns:
            raise BadRow(EMPTY_RESPONSE, f"field '{field}' has no turns", field)
        if not turns[-1]["content"].strip():
            raise BadRow(
                EMPTY_RESPONSE, f"field '{field}' has an empty final {turns[-1]['role']} turn", field
            )


def _split_prompt(
    prompt: list[Message], chosen: list[Message], rejected: list[Message]
) -> tuple[list[Message], list[Message], list[Message]]:
    """Move the conversation shared by chosen and rejected into the prompt.

    Handles prompts folded into both responses (Skywork, TRL implicit prompt), an explicit
    prompt repeated inside them (UltraFeedback), and transcripts that diverge before their
    final turn (a few HH rows): the longest common prefix becomes prompt context.
    """
    if _key(chosen) == _key(rejected):
        raise BadRow(IDENTICAL_RESPONSES, "fields 'chosen' and 'rejected' are identical", "chosen")
    width = len(prompt)
    if width and _key(chosen[:width]) == _key(prompt) == _key(rejected[:width]):
        chosen, rejected = chosen[width:], rejected[width:]
    shared = _common_prefix_len(chosen, rejected)
    return prompt + chosen[:shared], chosen[shared:], rejected[shared:]


def _check_prompt(prompt: list[Message]) -> None:
    """The prompt must end with a non-empty user turn; a system turn may only come first."""
    if not prompt:
        raise BadRow(BROKEN_TRANSCRIPT, "field 'prompt': no conversation turns before the response", "prompt")
    last = prompt[-1]
    if last["role"] != USER:
        detail = f"field 'prompt': conversation ends with a {last['role']} turn before the response"
        raise BadRow(BROKEN_TRANSCRIPT, detail, "prompt")
    if not last["content"].strip():
        raise BadRow(BROKEN_TRANSCRIPT, "field 'prompt': final user turn is empty", "prompt")


def _check_response(field: str, turns: list[Message]) -> None:
    """A response list must start and end with an assistant turn."""
    if not turns:
        raise BadRow(EMPTY_RESPONSE, f"field '{field}' has no turns after the shared prompt", field)
    for edge, message in (("starts", turns[0]), ("ends", turns[-1])):
        if message["role"] != ASSISTANT:
            detail = f"field '{field}': response {edge} with a {message['role']} turn"
            raise BadRow(BROKEN_TRANSCRIPT, detail, field)


def _check_role_order(field: str, turns: list[Message]) -> None:
    """Reject misplaced system turns and consecutive user turns (a reply is missing).

    Consecutive assistant turns are allowed on purpose: real HH-RLHF rows contain them where
    a "Human:" marker lost its blank line, and multi-part replies are a legitimate response.
    """
    for i, message in enumerate(turns):
        if message["role"] == SYSTEM and (i > 0 or field != "prompt"):
            raise BadRow(BROKEN_TRANSCRIPT, f"field '{field}'[{i}]: system turn not at the start", field)
        if i and message["role"] == USER and turns[i - 1]["role"] == USER:
            raise BadRow(BROKEN_TRANSCRIPT, f"field '{field}'[{i}]: two consecutive user turns", field)


def _assemble(
    prompt: list[Message], chosen: list[Message], rejected: list[Message]
) -> tuple[list[Message], list[Message], list[Message]]:
    """Validate the extracted turns and return the canonical (prompt, chosen, rejected)."""
    _check_final_turns(chosen, rejected)
    prompt, chosen, rejected = _split_prompt(prompt, chosen, rejected)
    _check_prompt(prompt)
    _check_role_order("prompt", prompt)
    for field, turns in (("chosen", chosen), ("rejected", rejected)):
        _check_response(field, turns)
        _check_role_order(field, turns)
    return prompt, chosen, rejected


# --------------------------------------------------------------------------------------------
# Record building
# --------------------------------------------------------------------------------------------
def stable_id(source: str, prompt: list[Message], chosen: list[Message], rejected: list[Message]) -> str:
    """Content hash used when a row has no id: sha1 of source + canonical JSON, 16 hex chars."""
    payload = json.dumps(
        [prompt, chosen, rejected], sort_keys=True, ensure_ascii=False, separators=(",", ":")
    )
    # NUL separates the source from the payload so ("ab", "c...") and ("a", "bc...") differ.
    return hashlib.sha1(f"{source}\x00{payload}".encode()).hexdigest()[:16]


def _own_id(row: Mapping[str, Any], column: str = "id") -> str | None:
    """The row's own id (``column``) as a string, or None when it has none."""
    value = row.get(column)
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return _text(value, "field 'id'", "id")
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return str(int(value))
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        # Pandas turns integer ids into floats when some are missing (NaN).
        if math.isnan(value):
            return None
        if float(value).is_integer():
            return str(int(value))
    raise BadRow(BAD_TYPE, f"field 'id' is {_type_name(value)}, expected a string or integer", "id")


def _subset(row: Mapping[str, Any], fmt: str) -> str | None:
    """The row's ``subset``; a Unified-Feedback row's sub-source (its ``source``), whose scale sets its margin."""
    name = "source" if fmt == UNIFIED_FEEDBACK and row.get("subset") is None else "subset"
    value = row.get(name)
    if value is None:
        return None
    if isinstance(value, str):
        return str(value)
    raise BadRow(BAD_TYPE, f"field '{name}' is {_type_name(value)}, expected a string", name)


def _normalise(row: Any, fmt: str, source: str, location: str, options: RowOptions) -> list[Record | BadRow]:
    """Core of normalise_row: the row's records (most formats: one), a BadRow in place of each bad pair; raises
    BadRow when the whole row is bad."""
    if not isinstance(row, Mapping):
        raise BadRow(BAD_TYPE, f"row is {_type_name(row)}, expected an object")
    if fmt == UNKNOWN:
        keys = ", ".join(sorted(map(str, row))[:12]) or "none"
        raise BadRow(UNKNOWN_FORMAT, f"no known preference format matches the row's keys ({keys})")
    own_id = _own_id(row, (options.columns or {}).get("id") or "id")
    out: list[Record | BadRow] = []
    for suffix, parts in _EXTRACTORS[fmt](row, options):
        if isinstance(parts, BadRow):
            out.append(parts)
            continue
        try:
            prompt, chosen, rejected = _assemble(*parts[:3])
        except BadRow as exc:
            out.append(exc)
            continue
        base = own_id if own_id is not None else stable_id(source, prompt, chosen, rejected)
        out.append({
            # a row of k responses gives several pairs: the suffix keeps their ids distinct even when two
            # responses read the same
            "id": f"{base}:{suffix}" if suffix else base,
            "prompt": prompt,
            "chosen": chosen,
            "rejected": rejected,
            "source": source,
            "location": location,
            "subset": _subset(row, fmt),
            "margin": parts[3],
        })
    return out


def _resolve_format(row: Any, fmt: str) -> str:
    """``auto`` -> detect; otherwise a config override, which must be a known name."""
    if fmt == AUTO:
        return detect_format(row)
    if fmt not in FORMATS:
        # A wrong config value is a programming error, not bad data: fail loudly.
        raise ValueError(f"unknown preference format {fmt!r}; expected 'auto' or one of {FORMATS}")
    return fmt


_DEFAULT_OPTIONS = RowOptions()


# --------------------------------------------------------------------------------------------
# Public row / batch API
# --------------------------------------------------------------------------------------------
def normalise_row(
    row: Mapping[str, Any],
    *,
    fmt: str = AUTO,
    source: str,
    location: str,
    strict: bool = False,
    options: RowOptions = _DEFAULT_OPTIONS,
) -> tuple[list[Record], list[QuarantineRecord]]:
    """Normalise one raw row into ``(records, quarantined)``: one record for most formats, several for a row of
    k responses (UltraFeedback, k-wise rankings), a quarantine record for each bad pair or the whole bad row.

    With ``strict=True`` a bad row raises :class:`BadRow` (a ``ValueError``) whose message
    starts with ``location`` (file and line/index) and names the offending field.
    """
    resolved = COLUMNS if options.columns is not None and fmt in (AUTO, COLUMNS) else _resolve_format(row, fmt)
    try:
        results = _normalise(row, resolved, source, location, options)
    except BadRow as exc:
        results = [exc]
    records = [r for r in results if not isinstance(r, BadRow)]
    bad = [r for r in results if isinstance(r, BadRow)]
    if bad and strict:
        bad[0].location = location
        raise bad[0]
    return records, [make_quarantine(source, location, b.reason, b.detail) for b in bad]


def normalise_conversation(row: Mapping[str, Any], *, source: str, location: str
                           ) -> tuple[list[Message] | None, QuarantineRecord | None]:
    """One conversation to score (a row with ``messages``: ``{role, content}`` or ShareGPT ``{from, value}``
    turns) with the same checks as a pair's sides: a system turn only first, no two user turns in a row, at least
    one user turn, the last turn the assistant's. ``(messages, None)``, or ``(None, quarantine record)``."""
    try:
        turns = _turns(_field(row, "messages"), "messages", USER)
        _check_role_order("prompt", turns)
        if not turns or turns[-1]["role"] != ASSISTANT:
            raise BadRow(BROKEN_TRANSCRIPT, "field 'messages' does not end with an assistant turn", "messages")
        if not any(m["role"] == USER for m in turns):
            raise BadRow(BROKEN_TRANSCRIPT, "field 'messages' has no user turn", "messages")
    except BadRow as bad:
        return None, make_quarantine(source, location, bad.reason, bad.detail)
    return turns, None


def normalise_batch(
    rows: Iterable[Located],
    *,
    fmt: str = AUTO,
    source: str,
    strict: bool = False,
    options: RowOptions = _DEFAULT_OPTIONS,
) -> tuple[list[Record], list[QuarantineRecord]]:
    """Normalise ``(location, raw)`` pairs, passing reader quarantine records through.

    Reader quarantine records are re-stamped with ``source`` so every quarantine row of a
    dataset carries the same source name.
    """
    records: list[Record] = []
    quarantined: list[QuarantineRecord] = []
    for location, raw in rows:
        if is_quarantine(raw):
            if strict:
                raise BadRow(raw["reason"], raw["detail"], location=location)
            quarantined.append(make_quarantine(source, location, raw["reason"], raw["detail"]))
            continue
        good, bad = normalise_row(raw, fmt=fmt, source=source, location=location, strict=strict, options=options)
        records += good
        quarantined += bad
    return records, quarantined


# --------------------------------------------------------------------------------------------
# Raw readers
# --------------------------------------------------------------------------------------------
def read_bytes_maybe_gzip(data: bytes, path: str) -> bytes:
    """Gunzip ``data`` when it is gzip-compressed (``.gz`` path or gzip magic bytes).

    A ``.gz`` path whose bytes are not gzip is returned unchanged: some readers (pyarrow
    streams opened with compression detection) already decompressed it.  Corrupt gzip raises
    :class:`BadRow` (reason ``invalid_json``) located at ``path``.
    """
    if not data.startswith(_GZIP_MAGIC):
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as exc:
        raise BadRow(INVALID_JSON, f"cannot gunzip file: {exc}", location=path) from exc


def _decode_line(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRow(INVALID_UTF8, f"invalid UTF-8 byte at column {exc.start + 1}", location=where) from None


def _parse_line(raw: bytes, where: str) -> dict[str, Any]:
    """Decode and parse one JSONL line into a dict, or raise BadRow."""
    text = _decode_line(raw, where)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadRow(INVALID_JSON, f"invalid JSON: {exc}", location=where) from None
    if not isinstance(value, dict):
        raise BadRow(INVALID_JSON, f"JSON value is {_type_name(value)}, expected an object", location=where)
    return value


def iter_jsonl_bytes(data: bytes, path: str, *, source: str | None = None) -> Iterator[Located]:
    """Yield ``(path:line, row | quarantine)`` for each non-blank line of a JSONL file.

    Line numbers are 1-based physical lines (blank lines are skipped but still counted) so a
    location always points at the exact line in an editor.  ``source`` defaults to ``path``.
    """
    source = path if source is None else source
    data = data.removeprefix(_UTF8_BOM)
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        where = location_for_line(path, number)
        try:
            yield where, _parse_line(raw, where)
        except BadRow as exc:
            yield where, make_quarantine(source, where, exc.reason, exc.detail)


def _looks_like_jsonl(data: bytes) -> bool:
    """Heuristic: starts with an object and has at least two non-blank lines."""
    stripped = data.lstrip(b" \t\r\n" + _UTF8_BOM)
    return stripped.startswith(b"{") and sum(1 for line in stripped.split(b"\n") if line.strip()) > 1


def _unwrap_rows(value: Any) -> list[Any] | None:
    """Rows of a JSON document: a top-level array, or an object wrapping one list (``{"data": [...]}``)."""
    if isinstance(value, list):
        return value
    if isinstance(value, dict) and len(value) == 1 and detect_format(value) == UNKNOWN:
        inner = next(iter(value.values()))
        return inner if isinstance(inner, list) else None
    return None


def _array_element(element: Any, where: str, source: str, lossy: bool) -> Any:
    """Pass a dict element through; quarantine non-objects and, for a lossy decode, bad UTF-8."""
    if not isinstance(element, dict):
        return make_quarantine(
            source, where, INVALID_JSON, f"array element is {_type_name(element)}, expected an object"
        )
    if lossy:
        try:
            json.dumps(element, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as exc:
            return make_quarantine(
                source, where, INVALID_UTF8, f"invalid UTF-8 byte in element ({exc.reason})"
            )
    return element


def iter_json_array_bytes(data: bytes, path: str, *, source: str | None = None) -> Iterator[Located]:
    """Yield ``(path#index, row | quarantine)`` for a whole-file JSON array (0-based index).

    Also accepts an object wrapping a single list, and falls back to JSONL (with line
    locations) when the file is actually JSON Lines.  A corrupt file yields one quarantine
    record located at ``path``.  Invalid UTF-8 only quarantines the elements that contain it.
    """
    source = path if source is None else source
    try:
        text, lossy = data.decode("utf-8-sig"), False
    except UnicodeDecodeError:
        # surrogateescape keeps the rest of the array readable; bad bytes become lone
        # surrogates, which _array_element detects per element.
        text, lossy = data.decode("utf-8-sig", errors="surrogateescape"), True
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        if _looks_like_jsonl(data):
            yield from iter_jsonl_bytes(data, path, source=source)
        else:
            yield path, make_quarantine(source, path, INVALID_JSON, f"file is not valid JSON: {exc}")
        return
    rows = _unwrap_rows(value)
    if rows is None:
        if isinstance(value, dict):  # a one-row JSONL file parses as a single object
            yield from iter_jsonl_bytes(data, path, source=source)
        else:
            detail = f"top-level JSON is {_type_name(value)}, expected an array of objects"
            yield path, make_quarantine(source, path, INVALID_JSON, detail)
        return
    for index, element in enumerate(rows):
        where = location_for_index(path, index)
        yield where, _array_element(element, where, source, lossy)


def iter_indexed_rows(rows: Iterable[Any], path: str, *, start: int = 0) -> Iterator[Located]:
    """Attach ``path#index`` locations to already-decoded rows (Parquet, HF datasets)."""
    for index, row in enumerate(rows, start=start):
        yield location_for_index(path, index), row


def iter_file_rows(data: bytes, path: str, *, source: str | None = None) -> Iterator[Located]:
    """Gunzip if needed, then read ``.json`` as an array and anything else as JSONL."""
    source = path if source is None else source
    try:
        data = read_bytes_maybe_gzip(data, path)
    except BadRow as exc:
        yield path, make_quarantine(source, path, exc.reason, exc.detail)
        return
    name = path.lower().removesuffix(".gz")
    reader = iter_json_array_bytes if name.endswith(".json") else iter_jsonl_bytes
    yield from reader(data, path, source=source)


def normalise_file_bytes(
    data: bytes, path: str, *, fmt: str = AUTO, source: str, strict: bool = False,
    options: RowOptions = _DEFAULT_OPTIONS,
) -> tuple[list[Record], list[QuarantineRecord]]:
    """Read and normalise a whole file's bytes (one ``flat_map`` call per file in Ray)."""
    return normalise_batch(iter_file_rows(data, path, source=source), fmt=fmt, source=source, strict=strict,
                           options=options)


def prompt_key(prompt: list[Message]) -> str:
    """A hash of the normalised prompt (the conversation before the final response): roles, and contents with
    whitespace collapsed and case folded. Pairs sharing it are one prompt for the train/validation split and
    for decontamination against benchmarks."""
    text = "\x1e".join(f"{m['role']}\x1f{' '.join(str(m['content']).split()).casefold()}" for m in prompt)
    return hashlib.sha1(text.encode()).hexdigest()
