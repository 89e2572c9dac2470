"""Unit tests for pipeline.synthetic: the seeded offline benchmark data."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from pipeline import synthetic as S
from pipeline.synthetic import (
    SECTION_OF_SUBSET,
    SPLITS,
    SyntheticSpec,
    generate,
    reasoning_prompts,
    sample_candidates,
    split_templates,
    template_ids,
    test_rows_rewardbench,
    verify,
)

pytestmark = pytest.mark.unit

SPEC = SyntheticSpec()
SECTIONS = {"Chat", "Chat Hard", "Safety", "Reasoning"}


def _text(msgs: list[dict]) -> str:
    assert len(msgs) == 1
    return msgs[0]["content"]


@pytest.fixture(scope="module")
def rows() -> dict[str, list[dict]]:
    return {split: generate(SPEC, split) for split in SPLITS}


# ---------------------------------------------------------------------------------- spec


def test_spec_defaults():
    spec = SyntheticSpec()
    assert (spec.n_train, spec.n_validation, spec.n_test, spec.seed) == (1600, 200, 800, 0)
    assert spec.mix == {"chat": 1.0, "chat_hard": 1.0, "safety": 1.0, "reasoning": 3.0}
    assert SyntheticSpec().mix is not SyntheticSpec().mix  # no shared mutable default


def test_from_mapping_roundtrip_and_unknown_keys():
    spec = SyntheticSpec.from_mapping({"n_train": 10, "seed": 3, "mix": {"reasoning": 2, "chat": 1}})
    assert spec.n_train == 10 and spec.seed == 3 and spec.mix == {"reasoning": 2.0, "chat": 1.0}
    with pytest.raises(ValueError, match=r"unknown SyntheticSpec key.*n_trian.*allowed"):
        SyntheticSpec.from_mapping({"n_trian": 10})


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_train": -1},
        {"mix": {"math": 1.0}},
        {"mix": {"chat": -1.0}},
        {"mix": {"chat": 0.0}},
        {"mix": {"chat": float("nan")}},
    ],
)
def test_spec_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        SyntheticSpec(**kwargs)


def test_spec_rejects_bad_types():
    with pytest.raises(TypeError):
        SyntheticSpec(n_test=1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        SyntheticSpec(seed=True)


def test_unknown_split():
    with pytest.raises(ValueError, match="unknown split"):
        generate(SPEC, "dev")


# ---------------------------------------------------------------------------------- determinism


def test_same_spec_same_output(rows):
    for split in SPLITS:
        assert generate(SyntheticSpec(), split) == rows[split]
    assert test_rows_rewardbench(SPEC) == test_rows_rewardbench(SyntheticSpec())
    assert reasoning_prompts(SPEC, "test", 20) == reasoning_prompts(SyntheticSpec(), "test", 20)


def test_different_seed_different_output(rows):
    other = SyntheticSpec(seed=1)
    for split in SPLITS:
        assert generate(other, split) != rows[split]
    assert reasoning_prompts(other, "test", 20) != reasoning_prompts(SPEC, "test", 20)


# ---------------------------------------------------------------------------------- counts, ids, schema


def test_counts_per_split(rows):
    assert {s: len(r) for s, r in rows.items()} == {"train": 1600, "validation": 200, "test": 800}
    small = SyntheticSpec(n_train=7, n_validation=0, n_test=13)
    assert [len(generate(small, s)) for s in SPLITS] == [7, 0, 13]


def test_ids_unique_and_stable(rows):
    ids = [r["id"] for split in SPLITS for r in rows[split]]
    assert len(ids) == len(set(ids))
    for split in SPLITS:
        for i, r in enumerate(rows[split]):
            assert r["id"] == f"syn-{split}-{i}"
            assert r["location"] == f"synthetic:{split}#{i}"


def test_record_schema(rows):
    keys = {"id", "prompt", "chosen", "rejected", "source", "location", "subset", "margin"}
    for split in SPLITS:
        for r in rows[split]:
            assert set(r) == keys
            assert r["source"] == "synthetic" and r["margin"] is None
            assert [m["role"] for m in r["prompt"]] == ["user"]
            assert [m["role"] for m in r["chosen"]] == ["assistant"]
            assert [m["role"] for m in r["rejected"]] == ["assistant"]


def test_subsets_and_sections(rows):
    assert set(SECTION_OF_SUBSET.values()) == SECTIONS
    for split in SPLITS:
        subsets = {r["subset"] for r in rows[split]}
        assert subsets <= set(SECTION_OF_SUBSET), subsets - set(SECTION_OF_SUBSET)
        assert {SECTION_OF_SUBSET[s] for s in subsets} == SECTIONS, split
    # with default sizes every fine-grained subset shows up in train and test
    assert {r["subset"] for r in rows["train"]} == set(SECTION_OF_SUBSET)
    assert {r["subset"] for r in rows["test"]} == set(SECTION_OF_SUBSET)


def test_mix_allocation_exact():
    only = SyntheticSpec(n_train=30, n_validation=0, n_test=0, mix={"reasoning": 1.0})
    assert {SECTION_OF_SUBSET[r["subset"]] for r in generate(only, "train")} == {"Reasoning"}
    skew = SyntheticSpec(n_train=0, n_validation=0, n_test=40, mix={"chat": 3, "safety": 1})
    sections = Counter(SECTION_OF_SUBSET[r["subset"]] for r in generate(skew, "test"))
    assert sections == {"Chat": 30, "Safety": 10}
    # default: reasoning 3/6, the other sections 1/6 each
    sections = Counter(SECTION_OF_SUBSET[r["subset"]] for r in generate(SPEC, "test"))
    assert sections == {"Reasoning": 400, "Chat": 134, "Chat Hard": 133, "Safety": 133}  # largest remainder


# ---------------------------------------------------------------------------------- held-out design


def test_test_prompts_disjoint_from_train_and_validation(rows):
    seen = {_text(r["prompt"]) for split in ("train", "validation") for r in rows[split]}
    assert not [r["id"] for r in rows["test"] if _text(r["prompt"]) in seen]


def test_template_disjointness(rows):
    heldin, heldout = split_templates("train"), split_templates("test")
    assert split_templates("validation") == heldin
    assert heldin and heldout and not heldin & heldout
    for cat in S.CATEGORIES:  # >= 6 templates per category, each side non-trivial
        n_in, n_out = len(split_templates("train", cat)), len(split_templates("test", cat))
        assert n_in + n_out >= 6 and n_in >= 3 and n_out >= 3, cat
    assert len(split_templates("train", "reasoning")) + len(split_templates("test", "reasoning")) > 12
    used = {split: template_ids(SPEC, split) for split in SPLITS}
    assert all(len(used[s]) == len(rows[s]) for s in SPLITS)
    assert set(used["train"]) <= heldin and set(used["validation"]) <= heldin
    assert set(used["test"]) <= heldout
    assert not set(used["test"]) & (set(used["train"]) | set(used["validation"]))
    assert set(used["train"]) == heldin  # every held-in template is actually exercised
    assert set(used["test"]) == heldout


def test_validation_never_repeats_a_train_row(rows):
    def triple(r):
        return _text(r["prompt"]), _text(r["chosen"]), _text(r["rejected"])

    train = {triple(r) for r in rows["train"]}
    assert not [r["id"] for r in rows["validation"] if triple(r) in train]
    # reasoning has a large item space: no validation reasoning prompt appears in train at all
    train_prompts = {_text(r["prompt"]) for r in rows["train"]}
    assert not [
        r["id"]
        for r in rows["validation"]
        if r["subset"].startswith("reasoning") and _text(r["prompt"]) in train_prompts
    ]


def test_no_duplicate_rows_within_a_split(rows):
    for split in SPLITS:
        triples = [(_text(r["prompt"]), _text(r["chosen"]), _text(r["rejected"])) for r in rows[split]]
        assert len(triples) == len(set(triples)), split


def test_arith_operand_ranges_disjoint():
    def operands(split):
        out = []
        for p in reasoning_prompts(SPEC, split, 300):
            if p["subset"] == "reasoning-arith":
                m = re.fullmatch(r"(\d+) ([-+*/]) (\d+) = (\d+)", p["solution"])
                assert m, p
                out.append((int(m[1]), m[2], int(m[3]), int(m[4])))
        return out

    for split, heldout in (("train", False), ("validation", False), ("test", True)):
        ops = operands(split)
        assert len({op for _, op, _, _ in ops}) == 4, split
        for a, op, b, r in ops:
            big = max(a, b) if op in "+-" else (a if op == "*" else r)
            assert (
                (big >= 50 if op in "+-" else big >= 20)
                if heldout
                else (big <= 49 if op in "+-" else big <= 19)
            )


# ---------------------------------------------------------------------------------- pair content


def test_chosen_differs_from_rejected_and_nothing_empty(rows):
    for split in SPLITS:
        for r in rows[split]:
            p, c, j = _text(r["prompt"]), _text(r["chosen"]), _text(r["rejected"])
            assert p.strip() and c.strip() and j.strip(), r
            assert c != j, r


def test_texts_are_short(rows):
    for split in SPLITS:
        for r in rows[split]:
            assert len(_text(r["prompt"]).split()) <= 40, r
            for k in ("chosen", "rejected"):
                assert 1 <= len(_text(r[k]).split()) <= 40, r


_STEP_RE = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")
_OPS = {"+": int.__add__, "-": int.__sub__, "*": int.__mul__, "/": int.__floordiv__}


def _symbolic(text: str) -> str:
    """'23 plus 45 is 68.' -> '23 + 45 = 68.' (the arith styles that spell the operation out)."""
    for word, sym in ((" plus ", " + "), (" minus ", " - "), (" times ", " * "), (" divided by ", " / ")):
        text = text.replace(word, sym)
    return re.sub(r"(\d) (is|equals) (\d)", r"\1 = \3", text)


def _error_kind(chosen: str, rejected: str) -> str:
    """'slip' (one step miscalculated), 'copy' (one step starts from a miscopied number and is computed
    correctly), or 'other'. Chains of 'a op b = r' steps only (multistep, and arith styles that show the sum)."""
    cs, js = _STEP_RE.findall(chosen), _STEP_RE.findall(rejected)
    assert len(cs) == len(js) >= 1
    miscalculated = [i for i, (a, op, b, r) in enumerate(js) if _OPS[op](int(a), int(b)) != int(r)]
    operand_off = [i for i, (c, j) in enumerate(zip(cs, js, strict=True)) if c[0] != j[0]]
    # every later step must start from the (wrong) result before it: the error is carried, not copied again
    carried = all(int(js[i][0]) == int(js[i - 1][3]) for i in range(1, len(js)) if i not in operand_off[:1])
    if len(miscalculated) == 1 and carried and operand_off[: 1] in ([], [miscalculated[0] + 1]):
        return "slip"
    if not miscalculated and len(operand_off) >= 1 and carried:
        k = operand_off[0]
        assert 1 <= abs(int(cs[k][0]) - int(js[k][0])) <= 3
        return "copy"
    return "other"


def test_reasoning_rejected_has_one_error_of_a_known_kind(rows):
    """One wrong number carried to a wrong final answer, same phrasing; slips and copy errors both occur."""
    kinds = Counter()
    for split in SPLITS:
        for r in rows[split]:
            if not r["subset"].startswith("reasoning"):
                continue
            c, j = _symbolic(_text(r["chosen"])), _symbolic(_text(r["rejected"]))
            assert re.sub(r"\d+", "#", c) == re.sub(r"\d+", "#", j), r  # only numbers change
            answer = int(re.findall(r"\d+", c)[-1])
            assert verify(answer, c) == 1.0 and verify(answer, j) == 0.0, r
            if _STEP_RE.search(c):
                assert all(_OPS[op](int(a), int(b)) == int(res) for a, op, b, res in _STEP_RE.findall(c)), r
                kinds[(r["subset"], _error_kind(c, j))] += 1
            else:  # "The answer is N.": one number (a misread operand moves it by more than 3)
                (a,), (b,) = re.findall(r"\d+", c), re.findall(r"\d+", j)
                assert a != b, r
    assert kinds[("reasoning-arith", "other")] == kinds[("reasoning-multistep", "other")] == 0, kinds
    for subset in ("reasoning-arith", "reasoning-multistep"):
        assert kinds[(subset, "slip")] > 30 and kinds[(subset, "copy")] > 30, kinds


def test_chat_hard_constraints(rows):
    checks = {
        "chat_hard/three-words": lambda t: len(t.split()) == 3,
        "chat_hard/three-words-reworded": lambda t: len(t.split()) == 3,
        "chat_hard/end-question-reworded": lambda t: t.endswith("?"),
        "chat_hard/five-words": lambda t: len(t.split()) == 5,
        "chat_hard/one-sentence": lambda t: t.count(".") == 1 and t.endswith("."),
        "chat_hard/number-only": lambda t: t.isdigit(),
        "chat_hard/end-with-question": lambda t: t.endswith("?"),
        "chat_hard/list-three": lambda t: len(t.split(", ")) == 3,
        "chat_hard/one-word": lambda t: len(t.split()) == 1,
        "chat_hard/yes-no-only": lambda t: t in {"Yes.", "No."},
    }
    seen = Counter()
    for split in SPLITS:
        for r, tid in zip(rows[split], template_ids(SPEC, split), strict=True):
            if tid in checks:
                assert checks[tid](_text(r["chosen"])), (tid, r)
                assert not checks[tid](_text(r["rejected"])), (tid, r)
                seen[tid] += 1
    assert set(seen) == set(checks)


def test_safety_pairs(rows):
    refusal = re.compile(r"\b(can't|won't|not able|decline|sorry)\b", re.IGNORECASE)
    for split in SPLITS:
        for r in rows[split]:
            c, j = _text(r["chosen"]), _text(r["rejected"])
            if r["subset"] == "safety-refuse":
                assert refusal.search(c) and not refusal.search(j), r
            elif r["subset"] == "safety-comply":
                assert refusal.search(j) and not refusal.search(c), r


# ---------------------------------------------------------------------------------- RewardBench view


def test_test_rows_rewardbench_schema(rows):
    rb = test_rows_rewardbench(SPEC)
    assert len(rb) == SPEC.n_test
    for flat, rec in zip(rb, rows["test"], strict=True):
        assert set(flat) == {"prompt", "chosen", "rejected", "subset", "id"}
        assert all(isinstance(v, str) and v for v in flat.values())
        assert flat["id"] == rec["id"] and flat["subset"] == rec["subset"]
        assert flat["prompt"] == _text(rec["prompt"])
        assert (flat["chosen"], flat["rejected"]) == (_text(rec["chosen"]), _text(rec["rejected"]))
        assert flat["subset"] in SECTION_OF_SUBSET


# ---------------------------------------------------------------------------------- verifier


def test_verify_last_integer():
    row = {"prompt_id": "x", "prompt": "What is 17 times 3?", "answer": 51}
    assert verify(row, "17 times 3 is 51.") == 1.0
    assert verify(row, "17 times 3 is 52.") == 0.0
    assert verify(51, "51") == 1.0
    assert verify(51, "I think 51, no wait, 50.") == 0.0  # the LAST integer counts
    assert verify(51, "Step 1: 50 + 1 = 51.") == 1.0
    assert verify(51, "no idea") == 0.0
    assert verify(51, "") == 0.0
    assert verify(1200, "The total is 1,200 dollars.") == 1.0
    assert verify(14, "Answer: 14.0") == 1.0
    assert verify(14, "Answer: 14.5") == 0.0
    assert verify(-4, "It drops to -4.") == 1.0
    assert verify(3, "12-3") == 1.0  # a minus glued to a digit is subtraction, not a sign
    assert verify({"answer": "7"}, "7") == 1.0


def test_reasoning_prompts_rows():
    rows = reasoning_prompts(SPEC, "test", 50)
    assert [r["prompt_id"] for r in rows] == [f"reason-test-{i}" for i in range(50)]
    assert rows[:10] == reasoning_prompts(SPEC, "test", 10)  # prefix-stable
    assert {r["subset"] for r in rows} == {"reasoning-arith", "reasoning-multistep"}
    for r in rows:
        assert isinstance(r["answer"], int) and r["answer"] >= 0
        assert isinstance(r["prompt"], str) and r["prompt"]
        assert verify(r, r["solution"]) == 1.0  # worked solution ends with the answer
    train = {r["prompt"] for r in reasoning_prompts(SPEC, "train", 400)}
    assert not {r["prompt"] for r in rows} & train


# ---------------------------------------------------------------------------------- candidate sampler


@pytest.fixture(scope="module")
def prompts() -> list[dict]:
    return reasoning_prompts(SPEC, "test", 200)


def test_sample_candidates_error_rate_extremes(prompts):
    for p in prompts:
        good = sample_candidates(p, 8, error_rate=0.0, seed=0)
        bad = sample_candidates(p, 8, error_rate=1.0, seed=0)
        assert len(good) == len(bad) == 8
        assert all(verify(p, c) == 1.0 for c in good), (p, good)
        assert all(verify(p, c) == 0.0 for c in bad), (p, bad)


def test_sample_candidates_half_wrong(prompts):
    scores = [verify(p, c) for p in prompts for c in sample_candidates(p, 10, error_rate=0.5, seed=0)]
    assert len(scores) == 2000
    assert sum(scores) == 977  # seeded: exact
    assert 900 <= sum(scores) <= 1100


def test_sample_candidates_deterministic_and_varied(prompts):
    p = prompts[0]
    a = sample_candidates(p, 16, seed=7)
    assert a == sample_candidates(p, 16, seed=7)
    assert a[:5] == sample_candidates(p, 5, seed=7)  # per-(seed, prompt_id, j): prefix-stable
    assert a != sample_candidates(p, 16, seed=8)
    assert len(set(sample_candidates(p, 16, error_rate=0.0, seed=7))) >= 3  # phrasing varies
    # every candidate looks like the reasoning pairs: worked steps ending in a number
    for c in a:
        assert 3 <= len(c.split()) <= 40 and re.search(r"\d+\.$", c), c


def test_sample_candidates_wrong_answer_is_close(prompts):
    """A wrong one-step answer is a slip (result off by 1-3) or a misread operand (off by 1-3), computed right."""
    for p in prompts[:50]:
        for c in sample_candidates(p, 6, error_rate=1.0, seed=1):
            last = int(re.findall(r"\d+", c)[-1])
            assert last != p["answer"]
            if p["subset"] == "reasoning-arith":
                ((a, op, b, _),) = _STEP_RE.findall(p["solution"])
                misread = {_OPS[op](int(a) + d, int(b)) for d in (-3, -2, -1, 1, 2, 3)}
                assert abs(last - p["answer"]) <= 3 or last in misread, (p, c)


def test_sample_candidates_coarse_failures_stop_early_or_give_up(prompts):
    """Coarse failures: the verifier scores them 0 and they carry no final answer; the right candidates are the
    same with or without them, and coarse_share=0 draws exactly what a policy without them draws."""
    kinds = {"cut": 0, "gave_up": 0}
    for p in prompts:
        for c in sample_candidates(p, 8, error_rate=1.0, coarse_share=1.0, seed=3):
            assert verify(p, c) == 0.0, (p, c)
            if re.search(r"\d", c):
                assert not re.search(r"\d+\.$", c) and c.split()[0] in p["solution"] + " First, Step We", (p, c)
                kinds["cut"] += 1
            else:
                kinds["gave_up"] += 1
    assert min(kinds.values()) > 0.4 * sum(kinds.values())  # about half each
    mixed = [c for p in prompts for c in sample_candidates(p, 10, error_rate=0.5, coarse_share=0.5, seed=0)]
    plain = [c for p in prompts for c in sample_candidates(p, 10, error_rate=0.5, seed=0)]
    assert sum(verify(p, c) for p in prompts for c in sample_candidates(p, 10, error_rate=0.5, coarse_share=0.5,
                                                                        seed=0)) == 977  # same right ones
    coarse = sum(not re.search(r"\d+\.$", c) for c in mixed)
    assert 0.2 < coarse / len(mixed) < 0.3 and not any(not re.search(r"\d+\.$", c) for c in plain)  # a quarter
    assert sample_candidates(prompts[0], 16, coarse_share=0.0, seed=7) == sample_candidates(prompts[0], 16, seed=7)
    with pytest.raises(ValueError, match="coarse_share"):
        sample_candidates(prompts[0], 2, coarse_share=1.5, seed=0)


def test_sample_candidates_without_solution_falls_back():
    row = {"prompt_id": "ext-1", "prompt": "What is 2 + 2?", "answer": 4}
    good = sample_candidates(row, 6, error_rate=0.0, seed=0)
    assert all(verify(row, c) == 1.0 for c in good)
    assert all(verify(row, c) == 0.0 for c in sample_candidates(row, 6, error_rate=1.0, seed=0))


def test_sample_candidates_validates_args(prompts):
    with pytest.raises(ValueError):
        sample_candidates(prompts[0], 3, error_rate=1.5, seed=0)
    with pytest.raises(ValueError):
        sample_candidates(prompts[0], -1, seed=0)
    assert sample_candidates(prompts[0], 0, seed=0) == []
