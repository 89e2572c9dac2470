"""Template registry and generation."""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable
from typing import Any

from pipeline.synthetic.chat import _CHAT, _chat_row
from pipeline.synthetic.chat_hard import _CHAT_HARD
from pipeline.synthetic.reasoning import _REASONING, _reasoning_row
from pipeline.synthetic.safety import _SAFETY, _safety_row
from pipeline.synthetic.spec import (
    _DUP_AVOID_ATTEMPTS,
    _GROUP_OF_SPLIT,
    _MAX_ATTEMPTS,
    CATEGORIES,
    SyntheticSpec,
    _check_split,
)

# Share of held-in prompts reserved for validation (validation draws only those, train never does).
_VALIDATION_PROMPT_SHARE = 0.25

# --------------------------------------------------------------------------------------------
# Template registry and generation
# --------------------------------------------------------------------------------------------

_Maker = Callable[[random.Random], tuple[str, str, str, str]]


def _registry() -> dict[str, list[tuple[str, str, _Maker]]]:
    """category -> [(template_id, group, make(rng) -> (prompt, chosen, rejected, subset))]."""
    reg: dict[str, list[tuple[str, str, _Maker]]] = {c: [] for c in CATEGORIES}
    for t in _REASONING:
        reg["reasoning"].append((t.tid, t.group, lambda rng, t=t: _reasoning_row(t, rng)))
    for t in _CHAT:
        reg["chat"].append((t.tid, t.group, lambda rng, t=t: _chat_row(t, rng)))
    for t in _CHAT_HARD:
        reg["chat_hard"].append((t.tid, t.group, lambda rng, t=t: (*t.make(rng), "chat_hard-constraint")))
    for t in _SAFETY:
        reg["safety"].append((t.tid, t.group, lambda rng, t=t: _safety_row(t, rng)))
    tids = [tid for ts in reg.values() for tid, _, _ in ts]
    assert len(tids) == len(set(tids)), "duplicate template ids"
    return reg


_REGISTRY = _registry()


def split_templates(split: str, category: str | None = None) -> frozenset[str]:
    """Template ids that can feed ``split`` (optionally one category). Train and validation share
    the held-in templates; test uses only held-out ones (disjoint by construction)."""
    _check_split(split)
    group = _GROUP_OF_SPLIT[split]
    cats = CATEGORIES if category is None else (category,)
    return frozenset(tid for c in cats for tid, g, _ in _REGISTRY[c] if g == group)


def _allocate(spec: SyntheticSpec, n: int) -> list[int]:
    """Largest-remainder split of n rows over CATEGORIES by spec.mix (ties by category order)."""
    weights = [spec.mix.get(c, 0.0) for c in CATEGORIES]
    total = sum(weights)
    quotas = [n * w / total for w in weights]
    counts = [math.floor(q) for q in quotas]
    order = sorted(range(len(CATEGORIES)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def validation_prompt(seed: int, prompt: str) -> bool:
    """Whether a held-in prompt belongs to validation (else to train): a hash of the prompt, so every pair of a
    prompt lands on one side. The chat_hard and safety pools hold a few dozen prompts each; without reserving
    some, a large train split uses them all, validation can only repeat them, and the data stage (no prompt on
    both sides) moves those rows to train: validation then measured only reasoning and chat."""
    digest = hashlib.sha256(f"synthetic|validation-prompt|{seed}|{prompt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < _VALIDATION_PROMPT_SHARE


def _generate(spec: SyntheticSpec, split: str) -> list[tuple[dict[str, Any], str]]:
    _check_split(split)
    n = spec.n_for(split)
    group = _GROUP_OF_SPLIT[split]
    cats = [c for c, k in zip(CATEGORIES, _allocate(spec, n), strict=True) for _ in range(k)]
    random.Random(f"synthetic|alloc|{spec.seed}|{split}").shuffle(cats)

    seen: set[tuple[str, str, str]] = set()
    out: list[tuple[dict[str, Any], str]] = []
    for i, cat in enumerate(cats):
        pool = [(tid, make) for tid, g, make in _REGISTRY[cat] if g == group]
        for attempt in range(_MAX_ATTEMPTS):
            rng = random.Random(f"synthetic|row|{spec.seed}|{split}|{i}|{attempt}")
            tid, make = pool[rng.randrange(len(pool))]
            prompt, chosen, rejected, subset = make(rng)
            # train and validation never share a prompt (validation_prompt), so never a row either
            if split != "test" and (split == "validation") != validation_prompt(spec.seed, prompt):
                continue
            key = (prompt, chosen, rejected)
            if attempt < _DUP_AVOID_ATTEMPTS and key in seen:
                continue
            break
        else:  # pragma: no cover - only reachable with absurd split sizes
            raise RuntimeError(
                f"synthetic: could not draw a {split} row #{i} ({cat}) on its side of the prompt split; "
                f"reduce n_{split} or n_train"
            )
        seen.add(key)
        record = {
            "id": f"syn-{split}-{i}",
            "prompt": [{"role": "user", "content": prompt}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
            "source": "synthetic",
            "location": f"synthetic:{split}#{i}",
            "subset": subset,
            "margin": None,
        }
        out.append((record, tid))
    return out


def generate(spec: SyntheticSpec, split: str) -> list[dict[str, Any]]:
    """Rows of ``split`` ("train" | "validation" | "test") as canonical preference records.

    Each record: ``{"id": "syn-{split}-{i}", "prompt": [{"role": "user", ...}], "chosen":
    [{"role": "assistant", ...}], "rejected": [...], "source": "synthetic", "location":
    "synthetic:{split}#{i}", "subset": <key of SECTION_OF_SUBSET>, "margin": None}``.
    Deterministic given ``spec``; ``len(result) == spec.n_for(split)``.
    """
    return [rec for rec, _ in _generate(spec, split)]


def template_ids(spec: SyntheticSpec, split: str) -> list[str]:
    """Template id of each row of ``generate(spec, split)`` (same order), for held-out checks."""
    return [tid for _, tid in _generate(spec, split)]


def test_rows_rewardbench(spec: SyntheticSpec) -> list[dict[str, str]]:
    """The test split in RewardBench v1's flat schema: prompt/chosen/rejected texts, subset, id."""
    return [
        {
            "prompt": r["prompt"][0]["content"],
            "chosen": r["chosen"][0]["content"],
            "rejected": r["rejected"][0]["content"],
            "subset": r["subset"],
            "id": r["id"],
        }
        for r in generate(spec, "test")
    ]


test_rows_rewardbench.__test__ = False  # type: ignore[attr-defined]  # not a pytest test


