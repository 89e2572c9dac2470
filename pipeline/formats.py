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
import zlib
from collections.abc import Iterable, Iterator, Mapping
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
OVER_LENGTH = "over_length"  # assigned later by the tokeniser stage, never here

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
    OVER_LENGTH,
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
AUTO = "auto"
UNKNOWN = "unknown"  # returned by detect_format(); not a valid override

FORMATS: tuple[str, ...] = (STRINGS, CONVERSATIONAL, HH, SHAREGPT, HELPSTEER2, RATING)

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


def _extract_rating(row: Mapping[str, Any]) -> _Parts:
    """Scored pairs (e.g. UltraFeedback-binarized): margin = score_chosen - score_rejected."""
    high = _number(_field(row, "score_chosen"), "field 'score_chosen'", "score_chosen")
    low = _number(_field(row, "score_rejected"), "field 'score_rejected'", "score_rejected")
    prompt, chosen, rejected, _ = _extract_conversational(row)
    return prompt, chosen, rejected, high - low


_EXTRACTORS = {
    STRINGS: _extract_strings,
    CONVERSATIONAL: _extract_conversational,
    HH: _extract_hh,
    SHAREGPT: _extract_sharegpt,
    HELPSTEER2: _extract_helpsteer2,
    RATING: _extract_rating,
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


def _own_id(row: Mapping[str, Any]) -> str | None:
    """The row's own id as a string, or None when it has none."""
    value = row.get("id")
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


def _subset(row: Mapping[str, Any]) -> str | None:
    value = row.get("subset")
    if value is None:
        return None
    if isinstance(value, str):
        return str(value)
    raise BadRow(BAD_TYPE, f"field 'subset' is {_type_name(value)}, expected a string", "subset")


def _normalise(row: Any, fmt: str, source: str, location: str) -> Record:
    """Core of normalise_row; raises BadRow for any bad data."""
    if not isinstance(row, Mapping):
        raise BadRow(BAD_TYPE, f"row is {_type_name(row)}, expected an object")
    if fmt == UNKNOWN:
        keys = ", ".join(sorted(map(str, row))[:12]) or "none"
        raise BadRow(UNKNOWN_FORMAT, f"no known preference format matches the row's keys ({keys})")
    prompt, chosen, rejected, margin = _EXTRACTORS[fmt](row)
    prompt, chosen, rejected = _assemble(prompt, chosen, rejected)
    own_id = _own_id(row)
    return {
        "id": own_id if own_id is not None else stable_id(source, prompt, chosen, rejected),
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "source": source,
        "location": location,
        "subset": _subset(row),
        "margin": margin,
    }


def _resolve_format(row: Any, fmt: str) -> str:
    """``auto`` -> detect; otherwise a config override, which must be a known name."""
    if fmt == AUTO:
        return detect_format(row)
    if fmt not in FORMATS:
        # A wrong config value is a programming error, not bad data: fail loudly.
        raise ValueError(f"unknown preference format {fmt!r}; expected 'auto' or one of {FORMATS}")
    return fmt


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
) -> tuple[Record | None, QuarantineRecord | None]:
    """Normalise one raw row: returns ``(record, None)`` or ``(None, quarantine)``.

    With ``strict=True`` a bad row raises :class:`BadRow` (a ``ValueError``) whose message
    starts with ``location`` (file and line/index) and names the offending field.
    """
    resolved = _resolve_format(row, fmt)
    try:
        return _normalise(row, resolved, source, location), None
    except BadRow as exc:
        if strict:
            exc.location = location
            raise
        return None, make_quarantine(source, location, exc.reason, exc.detail)


def normalise_batch(
    rows: Iterable[Located],
    *,
    fmt: str = AUTO,
    source: str,
    strict: bool = False,
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
        record, bad = normalise_row(raw, fmt=fmt, source=source, location=location, strict=strict)
        if record is not None:
            records.append(record)
        else:
            quarantined.append(bad)  # type: ignore[arg-type]  # exactly one of the pair is set
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
    data: bytes, path: str, *, fmt: str = AUTO, source: str, strict: bool = False
) -> tuple[list[Record], list[QuarantineRecord]]:
    """Read and normalise a whole file's bytes (one ``flat_map`` call per file in Ray)."""
    return normalise_batch(iter_file_rows(data, path, source=source), fmt=fmt, source=source, strict=strict)
