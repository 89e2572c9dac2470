"""What a stage is: its context and result, and the table of stages with the inputs each declares.

A stage is a function ``entry(ctx: StageContext) -> StageResult`` in ``stages/<name>.py``; stages import this
library and nothing else, and hand each other paths through manifests. Each :class:`StageSpec` declares the config
sections and keys the stage reads; its manifest hash is derived from exactly those (plus its upstream manifests'
hashes), so changing ``train.lr`` reruns ``train`` and what follows it, and nothing else.
"""

from __future__ import annotations

import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import tracking
from pipeline.artifacts import Manifest
from pipeline.config import PipelineConfig, StageName, config_hash


@dataclass(frozen=True, kw_only=True)
class StageResult:
    outputs: dict[str, str]
    metrics: dict[str, Any] = field(default_factory=dict)
    # The step the metrics were measured at: the train stage's final validation belongs at its last step (logged
    # at 0 it would draw the trained model's scores at the start of every curve).
    metrics_step: int = 0


@dataclass(frozen=True, kw_only=True)
class StageContext:
    cfg: PipelineConfig
    run_dir: Path
    out_dir: Path
    upstream: Mapping[str, Manifest]
    tracker: tracking.RunLogger
    log: Callable[[str], None] = print


@dataclass(frozen=True, kw_only=True)
class StageSpec:
    name: StageName
    entry: str  # "module:function", imported only when the stage runs (keeps start-up light)
    reads: tuple[str, ...]  # config sections / dotted keys the stage's outputs depend on: its hash inputs
    needs: tuple[StageName, ...] = ()  # upstream stages that must have finished
    uses: tuple[StageName, ...] = ()  # upstream stages used when present (e.g. tune's best config)
    reads_if: Callable[[PipelineConfig], tuple[str, ...]] | None = None  # more inputs, depending on the config
    ignores: tuple[str, ...] = ()  # dotted keys inside ``reads`` that the stage does not read


_DATA = ("data", "model.name_or_path", "model.revision", "model.trust_remote_code", "loss.use_margin",
         "rewardbench.benchmarks")
_TRAIN = ("model", "loss", "lora", "train", "ray.storage_path")
_SCORING = ("rewardbench.max_length", "rewardbench.truncation_side", "rewardbench.batch_size")

STAGES: dict[str, StageSpec] = {s.name: s for s in (
    StageSpec(name="data", entry="stages.data:prepare_preferences", reads=_DATA),
    # run.seed seeds the searcher; compare mode also scores every trial on the benchmarks
    StageSpec(name="tune", entry="stages.tune:tune_reward_model", reads=(*_TRAIN, "tune", "run.seed"),
              needs=("data",), reads_if=lambda cfg: ("rewardbench", "data.template_date") if cfg.tune.mode == "compare" else (),
              ignores=("train.continue_search",)),  # the final run's choice: turning it on keeps the search done
    StageSpec(name="train", entry="stages.train:train_reward_model", reads=_TRAIN, needs=("data",),
              uses=("tune",)),
    StageSpec(name="rewardbench", entry="stages.rewardbench:score_rewardbench", reads=("rewardbench", "train.use_gpu"),
              uses=("train",)),
    StageSpec(name="best_of_n", entry="stages.best_of_n:run_best_of_n", reads=("best_of_n", "train.use_gpu"),
              uses=("train",)),
    StageSpec(name="register", entry="stages.register:register_model",
              reads=("tracking", *_SCORING, "model.name_or_path", "loss.name", "lora", "train.lr", "data.sources",
                     "rewardbench.score_metric"),
              needs=("train",), uses=("data", "tune", "rewardbench", "best_of_n")),
)}
assert tuple(STAGES) == typing.get_args(StageName), "every stage name has exactly one spec, in pipeline order"


def stage_hash(cfg: PipelineConfig, spec: StageSpec, upstream: Mapping[str, Manifest]) -> str:
    """The stage's manifest hash: its declared config inputs and its upstream manifests' hashes."""
    keys = spec.reads + (spec.reads_if(cfg) if spec.reads_if else ())
    return config_hash(cfg, keys, {name: m.hash for name, m in sorted(upstream.items())}, ignore=spec.ignores)
