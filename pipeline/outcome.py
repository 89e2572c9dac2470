"""What a run shows, in one sentence: the reward model's validation accuracy, whether Best-of-N selection by it
beats random selection (and up to which n, and whether gold falls past its peak), and whether the search beat
the configured values it started from. Read from the stages' manifest metrics, so the terminal summary and the
report say the same thing."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def outcome(manifests: Mapping[str, Any], metric: str = "val_accuracy") -> str:
    """One sentence over whichever of the train, best_of_n and tune stages ran ('' when none did); ``metric`` is
    the search's (``tune.metric``)."""
    parts = [p for p in (_model(manifests.get("train")), _selection(manifests.get("best_of_n")),
                         _search(manifests.get("tune"), metric)) if p]
    if not parts:
        return ""
    return "; ".join(parts) + "."


def _model(m: Any) -> str:
    value = m.metrics.get("val_accuracy") if m is not None else None
    if value is None:
        return ""
    return f"the reward model ranks {100 * value:.1f}% of validation pairs right (val_accuracy {value:.3f})"


def _selection(m: Any) -> str:
    metrics = m.metrics if m is not None else {}
    if "bon/beats_random" not in metrics:
        return ""
    random = metrics["bon/gold_at_1"]
    if not metrics["bon/beats_random"]:
        return f"Best-of-N selection by it does not beat random selection (gold {random:.3f} at n=1)"
    line = (f"Best-of-N selection by it beats random selection up to n={int(metrics['bon/beats_random_up_to'])} "
            f"(gold {metrics['bon/gold_at_peak']:.3f} at n={int(metrics['bon/peak_n'])} vs {random:.3f} at n=1)")
    if metrics.get("bon/overoptimised"):
        line += f", then gold falls to {metrics['bon/gold_at_nmax']:.3f} (over-optimisation)"
    return line


def _search(m: Any, metric: str) -> str:
    metrics = m.metrics if m is not None else {}
    best, start = metrics.get(f"tune/best_{metric}"), metrics.get(f"tune/start_{metric}")
    if best is None or start is None:
        return ""
    if best > start:
        return f"the search beat its start ({metric} {best:.3f} vs {start:.3f} for the configured values)"
    return f"the search did not beat its start ({metric} {start:.3f} for the configured values is the best)"
