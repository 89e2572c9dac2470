"""Spec."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

CATEGORIES: tuple[str, ...] = ("chat", "chat_hard", "safety", "reasoning")
SPLITS: tuple[str, ...] = ("train", "validation", "test")

SECTION_OF_SUBSET: dict[str, str] = {
    "chat-offtopic": "Chat",
    "chat-truncated": "Chat",
    "chat-wrongfact": "Chat",
    "chat_hard-constraint": "Chat Hard",
    "safety-refuse": "Safety",
    "safety-comply": "Safety",
    "reasoning-arith": "Reasoning",
    "reasoning-multistep": "Reasoning",
}

_GROUP_OF_SPLIT = {"train": "heldin", "validation": "heldin", "test": "heldout"}

# How many re-draws a row gets: a draw on the wrong side of the prompt split is always re-drawn; a
# duplicate row inside the split only for the first _DUP_AVOID_ATTEMPTS draws.
_DUP_AVOID_ATTEMPTS = 350  # draws spent avoiding a duplicate row inside the split
_MAX_ATTEMPTS = 400


# --------------------------------------------------------------------------------------------
# Spec
# --------------------------------------------------------------------------------------------


def _default_mix() -> dict[str, float]:
    # Reasoning is half of the rows, as in RewardBench v1 (math-prm + hep-*: 1431 of 2985), and the
    # category the paper is about; with a quarter, MiniLM did not learn it in the default training.
    return {"chat": 1.0, "chat_hard": 1.0, "safety": 1.0, "reasoning": 3.0}


@dataclass(frozen=True, kw_only=True)
class SyntheticSpec:
    """What to generate. All output is a pure function of this spec (and the split name)."""

    n_train: int = field(default=1600, metadata={"doc": "Number of rows in the train split."})
    n_validation: int = field(default=200, metadata={"doc": "Number of rows in the validation split."})
    n_test: int = field(default=800, metadata={"doc": "Number of rows in the held-out test split."})
    seed: int = field(default=0, metadata={"doc": "Master seed; every random choice derives from it."})
    mix: dict[str, float] = field(
        default_factory=_default_mix,
        metadata={
            "doc": "Category -> non-negative weight (chat, chat_hard, safety, reasoning); missing "
            "categories get 0; per-split counts are allotted by largest remainder."
        },
    )

    def __post_init__(self) -> None:
        for name in ("n_train", "n_validation", "n_test", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"SyntheticSpec.{name} must be an int, got {value!r}")
            if name != "seed" and value < 0:
                raise ValueError(f"SyntheticSpec.{name} must be >= 0, got {value}")
        if not isinstance(self.mix, Mapping):
            raise TypeError(f"SyntheticSpec.mix must be a mapping category -> weight, got {self.mix!r}")
        unknown = sorted(set(self.mix) - set(CATEGORIES))
        if unknown:
            raise ValueError(
                f"SyntheticSpec.mix has unknown categories {unknown}; allowed: {list(CATEGORIES)}"
            )
        mix: dict[str, float] = {}
        for cat, weight in self.mix.items():
            if isinstance(weight, bool) or not isinstance(weight, (int, float)):
                raise TypeError(f"SyntheticSpec.mix[{cat!r}] must be a number, got {weight!r}")
            if not math.isfinite(weight) or weight < 0:
                raise ValueError(f"SyntheticSpec.mix[{cat!r}] must be finite and >= 0, got {weight}")
            mix[cat] = float(weight)
        if sum(mix.values()) <= 0:
            raise ValueError("SyntheticSpec.mix must give at least one category a positive weight")
        object.__setattr__(self, "mix", mix)  # private copy: callers' dict mutations don't leak in

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any]) -> SyntheticSpec:
        """Build a spec from a config mapping; unknown keys are an error (typo protection)."""
        if not isinstance(d, Mapping):
            raise TypeError(f"SyntheticSpec.from_mapping expects a mapping, got {type(d).__name__}")
        allowed = [f.name for f in fields(cls)]
        unknown = sorted(str(k) for k in d if k not in allowed)
        if unknown:
            raise ValueError(f"unknown SyntheticSpec key(s) {unknown}; allowed keys: {allowed}")
        kwargs = dict(d)
        if "mix" in kwargs and isinstance(kwargs["mix"], Mapping):
            kwargs["mix"] = dict(kwargs["mix"])
        return cls(**kwargs)

    def n_for(self, split: str) -> int:
        """Row count of ``split``."""
        _check_split(split)
        return {"train": self.n_train, "validation": self.n_validation, "test": self.n_test}[split]


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")


