"""Best-of-N support: prompts with gold answers, verifier, offline candidate sampler."""

from __future__ import annotations

import random
import re
from collections.abc import Mapping
from typing import Any

from pipeline.synthetic.reasoning import _ARITH_STYLES, _CHAIN_STYLES, _REASONING, _corrupt, _render, _Step
from pipeline.synthetic.spec import _GROUP_OF_SPLIT, SyntheticSpec, _check_split

# --------------------------------------------------------------------------------------------
# Best-of-N support: prompts with gold answers, verifier, offline candidate sampler
# --------------------------------------------------------------------------------------------


def _solution_text(steps: list[_Step]) -> str:
    return "; ".join(s.text() for s in steps)


_STEP_RE = re.compile(r"^\s*(\d+)\s*([-+*/])\s*(\d+)\s*=\s*(\d+)\s*$")


def _parse_solution(solution: Any) -> list[_Step] | None:
    if not isinstance(solution, str) or not solution.strip():
        return None
    steps = []
    for part in solution.split(";"):
        m = _STEP_RE.match(part)
        if m is None:
            return None
        steps.append(_Step(int(m[1]), m[2], int(m[3]), int(m[4])))
    return steps


def reasoning_prompts(spec: SyntheticSpec, split: str, n: int) -> list[dict[str, Any]]:
    """``n`` reasoning problems (arithmetic and multi-step) drawn from ``split``'s templates.

    Each row: ``{"prompt_id": "reason-{split}-{i}", "prompt": str, "answer": int, "solution":
    str, "subset": str}``. ``solution`` is the worked chain (``"12 + 5 = 17; 17 - 3 = 14"``) that
    :func:`sample_candidates` uses to write answers in the reasoning pairs' style; ``subset`` is
    ``reasoning-arith`` or ``reasoning-multistep``. Deterministic given (spec.seed, split, n);
    rows are prefix-stable in ``n``. Test prompts come from held-out templates only.
    """
    _check_split(split)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    group = _GROUP_OF_SPLIT[split]
    pool = [t for t in _REASONING if t.group == group]
    rows = []
    for i in range(n):
        rng = random.Random(f"synthetic|reason|{spec.seed}|{split}|{i}")
        t = pool[rng.randrange(len(pool))]
        prompt, steps = t.problem(rng)
        rows.append(
            {
                "prompt_id": f"reason-{split}-{i}",
                "prompt": prompt,
                "answer": steps[-1].r,
                "solution": _solution_text(steps),
                "subset": t.subset,
            }
        )
    return rows


# A number: optional minus sign (not glued to a preceding digit, so "12-3" is 12 and 3), digits with
# optional thousands separators, optional decimal part. A trailing sentence period is not a decimal.
_NUMBER_RE = re.compile(r"(?<!\d)-?\d+(?:,\d{3})*(?:\.\d+)?")


def verify(prompt_row_or_answer: Mapping[str, Any] | int, response_text: str) -> float:
    """Gold scorer for reasoning prompts: 1.0 iff the LAST number in ``response_text`` equals the
    answer, else 0.0.

    ``prompt_row_or_answer`` is a row from :func:`reasoning_prompts` (its ``"answer"`` is used) or
    the integer answer itself. Numbers are found left to right as ``-?digits`` with optional
    thousands commas ("1,200" is 1200) and decimals; a last number with a non-zero fractional part
    ("14.5") never matches, "14.0" counts as 14, and a sentence-final period is ignored. A response
    without any number scores 0.0.
    """
    answer = (
        prompt_row_or_answer["answer"] if isinstance(prompt_row_or_answer, Mapping) else prompt_row_or_answer
    )
    if isinstance(answer, bool) or not isinstance(answer, int):
        try:
            answer = int(answer)
        except (TypeError, ValueError):
            raise TypeError(f"verify: answer must be an int, got {answer!r}") from None
    numbers = _NUMBER_RE.findall(response_text or "")
    if not numbers:
        return 0.0
    last = numbers[-1].replace(",", "")
    if "." in last:
        whole, frac = last.split(".")
        if frac.strip("0"):
            return 0.0
        last = whole
    return 1.0 if int(last) == answer else 0.0


# What a small policy says when it gives up: no number, so the verifier scores it 0.
_NON_ANSWERS = (
    "I'm not sure how to work this out.",
    "Sorry, I can't solve this one.",
    "This needs more information than the question gives.",
    "I would need a calculator for that.",
)


def sample_candidates(
    prompt_row: Mapping[str, Any], n: int, *, error_rate: float = 0.5, coarse_share: float = 0.0, seed: int
) -> list[str]:
    """Offline Best-of-N policy: ``n`` worked answers to a :func:`reasoning_prompts` row.

    Candidate ``j`` is wrong with probability ``error_rate``, else correct; its phrasing is drawn from
    the same styles as the reasoning pairs (plus one extra). A wrong candidate fails *finely* (one
    step's number off by 1-3, carried through later steps, so the final answer is wrong), or, with
    probability ``coarse_share``, *coarsely*, as small policies also do: the worked answer stops
    mid-way, before its final number, or gives up without a number (equally likely). Fine failures
    are what NormBT is about (a tiny representation distance from the right answer); coarse ones are
    the kind the built-in benchmark's chat-truncated and safety-comply pairs teach a reward model.
    Everything about candidate ``j`` depends only on (seed, prompt_id, j), so the list is
    prefix-stable in ``n``; ``coarse_share=0`` draws exactly what earlier versions drew. Rows without
    a parseable ``solution`` get answer-only phrasings ("The answer is 14.").
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 0.0 <= error_rate <= 1.0:
        raise ValueError(f"error_rate must be in [0, 1], got {error_rate}")
    if not 0.0 <= coarse_share <= 1.0:
        raise ValueError(f"coarse_share must be in [0, 1], got {coarse_share}")
    answer = int(prompt_row["answer"])
    steps = _parse_solution(prompt_row.get("solution"))
    if steps is None or steps[-1].r != answer:
        steps = None
    pid = prompt_row.get("prompt_id", prompt_row.get("prompt", ""))
    out = []
    for j in range(n):
        rng = random.Random(f"synthetic|cand|{seed}|{pid}|{j}")
        wrong = rng.random() < error_rate
        # Drawn only when asked for, so coarse_share=0 keeps every earlier candidate.
        if wrong and coarse_share > 0.0 and rng.random() < coarse_share:
            out.append(_coarse_failure(steps, answer, rng))
            continue
        if steps is None:
            value = answer
            if wrong:
                d = rng.choice((-3, -2, -1, 1, 2, 3))
                value = answer + d if answer + d >= 0 else answer + abs(d)
            templates = ("The answer is {v}.", "I get {v}.", "It comes to {v}.", "Final answer: {v}.")
            out.append(rng.choice(templates).format(v=value))
            continue
        used = _corrupt(steps, rng) if wrong else steps
        out.append(_render(used, rng.randrange(_n_styles(steps))))
    return out


def _n_styles(steps: list[_Step]) -> int:
    return len(_ARITH_STYLES) if len(steps) == 1 else len(_CHAIN_STYLES)


def _coarse_failure(steps: list[_Step] | None, answer: int, rng: random.Random) -> str:
    """A worked answer cut off before its final number, or a non-answer; either way the verifier's 0."""
    if steps is not None and rng.random() < 0.5:
        words = _render(steps, rng.randrange(_n_styles(steps))).split()
        for cut in range(rng.randint(max(1, len(words) // 3), max(1, len(words) - 2)), 0, -1):
            text = " ".join(words[:cut]).rstrip(",;:.")
            if verify(answer, text) == 0.0:  # an intermediate number may equal the answer: cut earlier
                return text
    return rng.choice(_NON_ANSWERS)
