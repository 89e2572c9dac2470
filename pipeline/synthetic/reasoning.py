"""Reasoning problems: a chain of integer steps; step k>0 uses step k-1's result as left operand."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

# --------------------------------------------------------------------------------------------
# Reasoning problems: a chain of integer steps; step k>0 uses step k-1's result as left operand.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Step:
    a: int
    op: str  # one of + - * /
    b: int
    r: int

    def text(self) -> str:
        return f"{self.a} {self.op} {self.b} = {self.r}"


_OP_WORD = {"+": "plus", "-": "minus", "*": "times", "/": "divided by"}


def _apply(op: str, a: int, b: int) -> int | None:
    """Exact non-negative integer result, or None when the step would not be clean."""
    if op == "+":
        r = a + b
    elif op == "-":
        r = a - b
    elif op == "*":
        r = a * b
    elif op == "/":
        if b == 0 or a % b:
            return None
        r = a // b
    else:  # pragma: no cover - internal misuse
        raise ValueError(f"unknown op {op!r}")
    return r if r >= 0 else None


def _build_chain(
    rng: random.Random, start: tuple[int, int], ops: list[tuple[str, tuple[int, int]]]
) -> tuple[list[int], list[_Step]]:
    """Draw operands x0, x1, ... and the worked chain. A leading '/' is made exact (x0 = q*x1)."""
    first_op, (lo1, hi1) = ops[0]
    if first_op == "/":
        divisor = rng.randint(lo1, hi1)
        cur = rng.randint(*start) * divisor
    else:
        cur = rng.randint(*start)
    xs = [cur]
    steps: list[_Step] = []
    for i, (op, (lo, hi)) in enumerate(ops):
        if op == "/":
            if i:
                raise ValueError("division is only supported as the first step")
            x = divisor
        elif op == "-":
            hi2 = min(hi, cur - 1)
            x = rng.randint(min(lo, hi2), hi2)
        else:
            x = rng.randint(lo, hi)
        r = _apply(op, cur, x)
        assert r is not None
        steps.append(_Step(cur, op, x, r))
        xs.append(x)
        cur = r
    return xs, steps


# Share of errors that are copy errors (the rest are slips). MiniLM cannot do arithmetic: with half of each it
# stayed near 0.65 on reasoning pairs and the default's validation accuracy near 0.80, seed to seed.
_COPY_ERROR_SHARE = 0.75


def _corrupt(steps: list[_Step], rng: random.Random, *, last_only: bool = False) -> list[_Step]:
    """One wrong number at step k, carried through the later steps, so the final answer is wrong.

    Two kinds, as worked solutions go wrong: a *slip* (step k's result is off by a small offset) or,
    with probability ``_COPY_ERROR_SHARE``, a *copy error* (step k's left operand is off: a misread prompt number when
    k = 0, a miscopied previous result otherwise; the step itself is then computed correctly). A
    slip is visible only through arithmetic, a copy error as two numbers that should match and
    don't. Falls back to a slip in the last step when the error would give an unclean (negative,
    inexact) step.
    """
    delta = rng.choice((-3, -2, -1, 1, 2, 3))
    k = len(steps) - 1 if last_only else rng.randrange(len(steps))
    copy_error = not last_only and rng.random() < _COPY_ERROR_SHARE

    def wrong_value(r: int) -> int:
        return r + delta if r + delta >= 0 else r + abs(delta)

    out = list(steps[:k])
    bad = steps[k]
    if copy_error:
        a = wrong_value(bad.a)
        cur = _apply(bad.op, a, bad.b)
        if cur is None:
            return _corrupt(steps, rng, last_only=True)
        out.append(_Step(a, bad.op, bad.b, cur))
    else:
        cur = wrong_value(bad.r)
        out.append(_Step(bad.a, bad.op, bad.b, cur))
    for s in steps[k + 1 :]:
        nxt = _apply(s.op, cur, s.b)
        if nxt is None:
            return _corrupt(steps, rng, last_only=True)
        out.append(_Step(cur, s.op, s.b, nxt))
        cur = nxt
    if out[-1].r == steps[-1].r:  # cannot happen with + - * / and b != 0; belt and braces
        return _corrupt(steps, rng, last_only=True)
    return out


# Single-step renderers (a, op, b, r). The first four mention the result once, so a one-number
# error changes exactly one whitespace-separated word; the fifth is used only by the sampler.
_ARITH_STYLES: tuple[Callable[[_Step], str], ...] = (
    lambda s: f"{s.a} {_OP_WORD[s.op]} {s.b} is {s.r}.",
    lambda s: f"{s.a} {s.op} {s.b} = {s.r}.",
    lambda s: f"The answer is {s.r}.",
    lambda s: f"{s.a} {_OP_WORD[s.op]} {s.b} equals {s.r}.",
    lambda s: f"{s.a} {s.op} {s.b} = {s.r}, so the answer is {s.r}.",
)
_N_ARITH_PAIR_STYLES = 4

_CHAIN_STYLES: tuple[Callable[[list[_Step]], str], ...] = (
    lambda ss: ", then ".join(s.text() for s in ss) + f". The answer is {ss[-1].r}.",
    lambda ss: (
        f"First, {ss[0].text()}. "
        + "".join(f"Then {s.text()}. " for s in ss[1:])
        + f"So the answer is {ss[-1].r}."
    ),
    lambda ss: " ".join(f"Step {i}: {s.text()}." for i, s in enumerate(ss, 1)) + f" Answer: {ss[-1].r}.",
    lambda ss: "We compute " + " and ".join(s.text() for s in ss) + f", so the result is {ss[-1].r}.",
    lambda ss: "; ".join(s.text() for s in ss) + f". Final answer: {ss[-1].r}.",
)


def _render(steps: list[_Step], style: int) -> str:
    if len(steps) == 1:
        return _ARITH_STYLES[style % len(_ARITH_STYLES)](steps[0])
    return _CHAIN_STYLES[style % len(_CHAIN_STYLES)](steps)


_NAMES = (
    "Tom", "Ana", "Priya", "Kenji", "Lena", "Omar", "Sofia", "Marco",
    "Aisha", "Ben", "Chloe", "Diego", "Mei", "Noah", "Zara", "Ivan",
)  # fmt: skip


@dataclass(frozen=True)
class _Reasoning:
    tid: str
    group: str
    subset: str
    prompt: str  # format string over {x0}, {x1}, ... (chain order) and {name}
    start: tuple[int, int]
    ops: tuple[tuple[str, tuple[int, int]], ...]

    def problem(self, rng: random.Random) -> tuple[str, list[_Step]]:
        xs, steps = _build_chain(rng, self.start, list(self.ops))
        values = {f"x{i}": x for i, x in enumerate(xs)}
        return self.prompt.format(name=rng.choice(_NAMES), **values), steps


def _arith(tid: str, group: str, prompt: str, op: str) -> _Reasoning:
    # Held-in operands: + - in [2, 49]; * and / use a first factor (or quotient) in [2, 19].
    # Held-out operands: + - in [50, 99]; * and / use a first factor (or quotient) in [20, 49].
    # The second factor / divisor is in [2, 9] for both.
    small = group == "heldin"
    if op in "+-":
        start, rng2 = ((2, 49), (2, 49)) if small else ((50, 99), (50, 99))
    else:
        start, rng2 = ((2, 19), (2, 9)) if small else ((20, 49), (2, 9))
    if op == "-":  # x0 - x1 with x1 < x0: draw x0 from the upper part of the range
        start = (start[0] + 1, start[1])
    return _Reasoning(tid, group, "reasoning-arith", prompt, start, ((op, rng2),))


_REASONING: tuple[_Reasoning, ...] = (
    # ---- held-in arithmetic
    _arith("reasoning/arith-plus", "heldin", "What is {x0} plus {x1}?", "+"),
    _arith("reasoning/arith-minus", "heldin", "What is {x0} minus {x1}?", "-"),
    _arith("reasoning/arith-times", "heldin", "What is {x0} times {x1}?", "*"),
    _arith("reasoning/arith-divided-by", "heldin", "What is {x0} divided by {x1}?", "/"),
    _arith("reasoning/arith-sum-of", "heldin", "What is the sum of {x0} and {x1}?", "+"),
    _arith("reasoning/arith-compute-minus", "heldin", "Compute {x0} - {x1}.", "-"),
    # ---- held-out arithmetic
    _arith("reasoning/arith-multiplied-by", "heldout", "Calculate {x0} multiplied by {x1}.", "*"),
    _arith("reasoning/arith-subtract-from", "heldout", "Subtract {x1} from {x0}. What do you get?", "-"),
    _arith("reasoning/arith-add-together", "heldout", "Add {x0} and {x1} together. What is the total?", "+"),
    _arith("reasoning/arith-product-of", "heldout", "What is the product of {x0} and {x1}?", "*"),
    _arith(
        "reasoning/arith-equal-parts", "heldout", "If {x0} is split into {x1} equal parts, how big is each part?", "/"
    ),
    # ---- held-in multi-step (small numbers)
    _Reasoning(
        "reasoning/ms-apples", "heldin", "reasoning-multistep",
        "{name} has {x0} apples, buys {x1} more and gives away {x2}. How many apples does {name} have now?",
        (5, 30), (("+", (2, 15)), ("-", (1, 20))),
    ),
    _Reasoning(
        "reasoning/ms-pencil-boxes", "heldin", "reasoning-multistep",
        "A shop has {x0} boxes with {x1} pencils in each and sells {x2} pencils. How many pencils are left?",
        (2, 9), (("*", (3, 12)), ("-", (1, 20))),
    ),
    _Reasoning(
        "reasoning/ms-savings", "heldin", "reasoning-multistep",
        "{name} saves {x1} dollars a week for {x0} weeks, then spends {x2} dollars. How many dollars are left?",
        (2, 10), (("*", (2, 15)), ("-", (1, 20))),
    ),
    _Reasoning(
        "reasoning/ms-bus", "heldin", "reasoning-multistep",
        "A bus has {x0} passengers. At the first stop {x1} get off and {x2} get on. "
        "How many passengers are on the bus now?",
        (10, 40), (("-", (1, 9)), ("+", (1, 12))),
    ),
    _Reasoning(
        "reasoning/ms-marbles", "heldin", "reasoning-multistep",
        "{name} shares {x0} marbles equally among {x1} friends, and each friend then finds {x2} more. "
        "How many marbles does each friend have?",
        (2, 12), (("/", (2, 6)), ("+", (1, 9))),
    ),
    _Reasoning(
        "reasoning/ms-stickers", "heldin", "reasoning-multistep",
        "{name} has {x2} stickers, buys {x0} packs of {x1} stickers, then gives away {x3}. "
        "How many stickers does {name} have now?",
        (2, 6), (("*", (2, 8)), ("+", (3, 20)), ("-", (1, 15))),
    ),
    # ---- held-out multi-step (larger numbers)
    _Reasoning(
        "reasoning/ms-train-seats", "heldout", "reasoning-multistep",
        "A train has {x0} cars with {x1} seats each, and {x2} seats are taken. How many seats are free?",
        (3, 12), (("*", (20, 60)), ("-", (21, 99))),
    ),
    _Reasoning(
        "reasoning/ms-reading", "heldout", "reasoning-multistep",
        "{name} reads {x1} pages a day for {x0} days and then {x2} more pages. "
        "How many pages does {name} read in total?",
        (3, 14), (("*", (20, 45)), ("+", (21, 60))),
    ),
    _Reasoning(
        "reasoning/ms-tulips", "heldout", "reasoning-multistep",
        "A garden has {x0} rows of {x1} tulips, and {x2} tulips wilt. How many tulips are still fine?",
        (4, 15), (("*", (20, 40)), ("-", (21, 80))),
    ),
    _Reasoning(
        "reasoning/ms-wallet", "heldout", "reasoning-multistep",
        "{name} has {x0} dollars, spends {x1} on lunch, then earns {x2} more. "
        "How many dollars does {name} have now?",
        (50, 120), (("-", (21, 49)), ("+", (21, 60))),
    ),
    _Reasoning(
        "reasoning/ms-cupcakes", "heldout", "reasoning-multistep",
        "{name} packs {x0} cupcakes equally into {x1} boxes and adds {x2} extra to each box. "
        "How many cupcakes are in each box?",
        (20, 40), (("/", (2, 6)), ("+", (21, 30))),
    ),
    _Reasoning(
        "reasoning/ms-library", "heldout", "reasoning-multistep",
        "A library has {x0} shelves of {x1} books. It buys {x2} new books and lends out {x3}. "
        "How many books are on the shelves now?",
        (3, 9), (("*", (20, 40)), ("+", (21, 60)), ("-", (21, 50))),
    ),
)  # fmt: skip


def _reasoning_row(t: _Reasoning, rng: random.Random) -> tuple[str, str, str, str]:
    prompt, steps = t.problem(rng)
    style = rng.randrange(_N_ARITH_PAIR_STYLES if len(steps) == 1 else len(_CHAIN_STYLES))
    chosen = _render(steps, style)
    rejected = _render(_corrupt(steps, rng), style)
    return prompt, chosen, rejected, t.subset


