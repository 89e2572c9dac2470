"""The final training run continuing the search's best trial (``train.continue_search``).

A search trial that trains the first ``train.stop_after_steps`` steps of the final run's own schedule (same
warm-up, decay horizon and data order: :func:`pipeline.train_loop.last_step`) has already trained those steps of
the run that follows it, with the chosen setting. When every setting that decides where the steps go is the same,
the final run loads the trial's last checkpoint (weights, optimizer and scheduler state, NormBT's μ, the data
position, the RNG) and trains only the rest. DeepSpeed loads a checkpoint at the world size that wrote it, so the
trial's rank layout has to match too: an in-process trial trains as one rank of ``micro_batch_size × num_workers``
pairs (:func:`pipeline.train_loop.one_process_config`), which a final run with ``train.num_workers=1`` and that
micro-batch repeats.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

# Sections whose settings decide the trajectory of a run's steps (the data is the run's own split either way).
TRAJECTORY_SECTIONS = ("model", "loss", "lora", "train")
# Keys in those sections that only decide where a run stops, when it reports, validates or checkpoints, and where
# it runs: a prefix trial differs from the final run in these without training different steps. Threads
# (cpus_per_worker) change the order of float sums, not the steps.
NOT_TRAJECTORY = frozenset({
    "train.stop_after_steps", "train.eval_every", "train.log_every", "train.checkpoint_every",
    "train.keep_checkpoints", "train.max_failures", "train.cpus_per_worker", "train.placement_strategy",
    "train.grad_diag_every", "train.in_memory_rows", "train.gpu_memory_gb", "train.continue_search",
})


def _json(value: Any) -> Any:
    """One form for a value read back from JSON and the same value in a live config (tuples become lists)."""
    return json.loads(json.dumps(value, default=str))


def trajectory_differences(trial: Mapping[str, Any], run: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{key: (trial's value, run's value)}`` for every trajectory setting the two flat configs disagree on."""
    keys = sorted(k for k in set(trial) | set(run)
                  if k.split(".", 1)[0] in TRAJECTORY_SECTIONS and k not in NOT_TRAJECTORY)
    return {k: (_json(trial.get(k)), _json(run.get(k))) for k in keys if _json(trial.get(k)) != _json(run.get(k))}


def continuation_problem(trial: Mapping[str, Any], run: Mapping[str, Any], run_last_step: int) -> str | None:
    """Why a run (flat config ``run``, stopping at step ``run_last_step``) cannot continue a trial that trained
    with the flat config ``trial``; None when it can."""
    stop = int(trial.get("train.stop_after_steps") or 0)
    if stop <= 0:
        return ("the search's trials were not prefixes of this run (set train.stop_after_steps in "
                "tune.trial_overrides, and nothing else that changes the steps)")
    if stop >= run_last_step:
        return f"the best trial trained {stop} steps and this run stops at step {run_last_step}: nothing to add"
    differ = trajectory_differences(trial, run)
    if differ:
        said = "; ".join(f"{k} {a!r} in the trial, {b!r} here" for k, (a, b) in differ.items())
        return f"the best trial trained other steps than this run would ({said})"
    return None
