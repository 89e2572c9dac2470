"""Typed pipeline configuration.

One frozen, keyword-only dataclass per concern, composed into :class:`PipelineConfig`.
YAML files hold only what differs from these defaults; ``key.sub=value`` overrides are parsed
as YAML (so ``data.sources='[{path: a.jsonl}]'`` works). Unknown keys are an error that names
the key, the file and the closest valid keys.

Every field carries a one-line doc in ``metadata["doc"]`` (shown by ``describe()``).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import hashlib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml

from pipeline.losses import DEFAULT_BETA, DEFAULT_EPS, check_label_smoothing
from pipeline.synthetic import SyntheticSpec

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "default.yaml"


class ConfigError(ValueError):
    """A user mistake in a config file or override; the message says what and where."""


def _f(default: Any, doc: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):  # mutable: each instance gets its own copy
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"doc": doc}, **kw)
    return field(default=default, metadata={"doc": doc}, **kw)


#: The stages, in pipeline order: the one place their names are written (pipeline/stage.py maps each to its code).
StageName = Literal["data", "tune", "train", "rewardbench", "best_of_n", "register"]
FormatName = Literal["auto", "strings", "conversational", "hh", "sharegpt", "helpsteer2", "rating", "unified_feedback",
                     "pku_saferlhf", "arena", "ultrafeedback", "kwise", "columns"]
Scalar = str | int | float | bool


@dataclass(frozen=True, kw_only=True)
class ColumnsConfig:
    """A pairwise schema no built-in format knows, described by its columns (LLaMA-Factory's ``columns`` idea):
    either ``chosen`` + ``rejected``, or ``first`` + ``second`` + ``label`` + ``first_is_better``."""

    prompt: str | None = _f(None, "Column of the prompt: a string or a message list (None: the prompt is the "
                            "shared start of the two responses).")
    chosen: str | None = _f(None, "Column of the preferred response: a string or a message list.")
    rejected: str | None = _f(None, "Column of the other response.")
    first: str | None = _f(None, "Instead of chosen/rejected: column of the first of two responses.")
    second: str | None = _f(None, "Column of the second response.")
    label: str | None = _f(None, "Column saying which of first/second is better.")
    first_is_better: Scalar | None = _f(None, "Value of label meaning the first response is better (quote it in "
                                        "YAML: yes/no read as booleans); any other value means the second, unless "
                                        "second_is_better is given.")
    second_is_better: Scalar | None = _f(None, "Value of label meaning the second is better; with it, any value that "
                                         "is neither (nor tie) is quarantined.")
    tie: Scalar | None = _f(None, "Value of label meaning a tie (quarantined with reason 'tie').")
    margin: str | None = _f(None, "Column of a numeric margin (optional).")
    id: str | None = _f(None, "Column of the row id (optional; default: a content hash).")

    def __post_init__(self) -> None:
        pairwise = self.chosen is not None or self.rejected is not None
        labelled = any(v is not None for v in (self.first, self.second, self.label))
        if pairwise == labelled:
            raise ConfigError("give either chosen and rejected, or first, second, label and first_is_better")
        if pairwise and None in (self.chosen, self.rejected):
            raise ConfigError("chosen and rejected come together")
        if labelled and None in (self.first, self.second, self.label, self.first_is_better):
            raise ConfigError("first, second, label and first_is_better come together")


@dataclass(frozen=True, kw_only=True)
class SourceConfig:
    """One preference source: exactly one of path, hf, synthetic."""

    path: str | None = _f(None, "File, glob or URI: JSONL, JSON array or Parquet, optionally gzipped.")
    hf: str | None = _f(None, "Hugging Face hub id or a save_to_disk folder.")
    synthetic: SyntheticSpec | None = _f(None, "The built-in offline benchmark (its own train/validation split).")
    format: FormatName = _f("auto", "Row format; 'auto' detects it from each row's keys ('columns' when columns "
                            "is given).")
    name: str | None = _f(None, "hf: dataset configuration name.")
    data_dir: str | None = _f(None, "hf: data_dir.")
    split: str | None = _f(None, "hf: split (default train).")
    revision: str | None = _f(None, "hf: revision (branch, tag or commit).")
    weight: float = _f(1.0, "Sampling weight: < 1 keeps a hash-chosen share, > 1 repeats rows (copies stay on "
                       "the original's side of the split).")
    limit: int | None = _f(None, "Keep the first N good rows (in source order: the same rows on every rerun).")
    columns: ColumnsConfig | None = _f(None, "Column mapping for an unseen pairwise schema (format: columns).")
    follow: Literal["better", "safer"] = _f("better", "PKU-SafeRLHF: which label picks the chosen response.")
    aspect: Literal["overall", "mean", "helpfulness", "honesty", "instruction_following", "truthfulness"] = _f(
        "overall", "UltraFeedback: the rating that orders completions (overall_score, the mean of the aspect "
        "Ratings as Argilla's cleaned set binarises, or one aspect's Rating).")
    pairs: Literal["auto", "best_vs_random", "best_vs_rest", "all_pairs"] = _f(
        "auto", "Pairs from k responses (UltraFeedback, k-wise rankings): best vs a seeded random one rated below it "
        "(UltraFeedback's auto), best vs each other (k-wise's auto) or every ordered pair.")
    margin_scale: Literal["range", "raw"] = _f(
        "range", "Unified-Feedback: margin = rating difference / the sub-source's rating range (0-1 for every "
        "sub-source), or 'raw' (each sub-source's own scale: 1 for binary labels, up to 9 for overall_score).")
    ties: Literal["quarantine", "keep"] = _f("quarantine", "Equal ratings or a tie label: quarantined with reason "
                                             "'tie'; 'keep' trains them as given, margin 0 (rating format only).")

    def __post_init__(self) -> None:
        kinds = [k for k in ("path", "hf", "synthetic") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ConfigError(f"needs exactly one of path, hf, synthetic (got {', '.join(kinds) or 'none'})")
        if self.weight <= 0:
            raise ConfigError(f"weight must be > 0, got {self.weight}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit must be >= 1, got {self.limit}")
        if (self.columns is not None) != (self.format == "columns") and self.format != "auto":
            raise ConfigError("format: columns goes with a columns mapping (and a columns mapping with format "
                              "auto or columns)")
        if self.limit is not None and self.synthetic is not None:
            raise ConfigError("limit does not apply to synthetic (it keeps the first rows, all of them train): "
                              "set synthetic.n_train and synthetic.n_validation")
        if self.ties == "keep" and self.format not in ("rating", "auto"):
            raise ConfigError("ties: keep applies to the rating format only (the others name no chosen side in a tie)")
        if self.margin_scale == "raw" and self.format not in ("unified_feedback", "auto"):
            raise ConfigError("margin_scale applies to the unified_feedback format only")

    @property
    def kind(self) -> str:
        return next(k for k in ("path", "hf", "synthetic") if getattr(self, k) is not None)

    @property
    def label(self) -> str:
        """The source's name in splits, quarantine and stats."""
        return "synthetic" if self.kind == "synthetic" else str(getattr(self, self.kind))

    @property
    def row_format(self) -> str:
        return "columns" if self.columns is not None else self.format


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    sources: tuple[SourceConfig, ...] = _f((SourceConfig(synthetic=SyntheticSpec()),),
                                           "Preference sources (see data.sources[] below).")
    strict: bool = _f(False, "Stop at the first bad row (with file, line, field) instead of quarantining it.")
    max_length: int = _f(256, "Maximum tokens of prompt+response per side.")
    overlength: Literal["truncate", "drop"] = _f("truncate", "Over-length policy: 'truncate' (keep the response "
                                                 "end) or 'drop'.")
    validation_fraction: float = _f(0.1, "Fraction of prompts (by a hash of the normalised prompt) held out for "
                                    "validation: all pairs of a prompt land on the same side.")
    split_seed: int = _f(0, "Salt of the prompt hash that assigns pairs to train/validation.")
    batch_size: int = _f(256, "Rows per Ray Data map_batches call during tokenisation.")
    num_cpus: float = _f(0.5, "CPUs reserved by each Ray Data tokenisation task (below 1 so Train never starves it).")
    max_actors: int = _f(2, "Tokenising tasks at once (each worker loads the tokenizer once); the output does not "
                         "depend on it.")
    template_date: str = _f("2024-07-26", "Date (ISO) chat templates see (Llama 3.x writes it into every prompt): "
                            "fixed, so tokenisation never depends on the calendar; saved with the tokenizer.")
    shuffle_seed: int = _f(0, "Seed of the global shuffle of the train split (the order training reads).")
    missing_margin: Literal["error", "zero"] = _f("error", "With loss.use_margin: a pair without a margin stops "
                                                  "the data stage ('error') or trains with margin 0 ('zero', counted).")
    decontaminate: bool = _f(False, "Drop train pairs whose prompt occurs in a configured benchmark (quarantined "
                             "as 'contaminated'); counted in stats.json either way.")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    name_or_path: str = _f("embedded:minilm", "Hub id, local folder, 'embedded:minilm' (offline package) "
                           "or 'tiny:<arch>' (random, from a config: tiny:llama, tiny:bert).")
    revision: str | None = _f(None, "Hub revision (branch, tag or commit) for hub ids.")
    trust_remote_code: bool = _f(False, "Allow model code from the hub (off unless you trust the repo).")
    seed: int = _f(0, "Seed for a newly initialised score head and tiny models.")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = _f(
        "sdpa", "Attention kernel: 'sdpa' (torch's fused kernels), 'eager' (materialises the scores: "
        "seq_len² memory per head) or 'flash_attention_2' (GPU only, needs the flash-attn package).")


@dataclass(frozen=True, kw_only=True)
class LossConfig:
    name: Literal["bt", "normbt", "bt_clip"] = _f("normbt", "Loss: 'bt' (Bradley-Terry), 'normbt' (distance-"
                                                  "normalised BT) or 'bt_clip' (BT, per-pair gradient clipped at "
                                                  "the score head).")
    beta: float = _f(DEFAULT_BETA, "NormBT EMA decay of the mean representation distance (paper: 0.9; 0: each "
                     "step's own batch mean, the paper's no-EMA ablation).")
    distance: Literal["l2", "cosine"] = _f("l2", "NormBT distance: 'l2' (paper) or 'cosine' (1 - cos, ablation).")
    representation: Literal["head_input", "mean_pooled"] = _f("head_input", "What NormBT measures the distance "
                                                              "on: the score head's input (paper) or the last "
                                                              "hidden states mean-pooled over real tokens "
                                                              "(the paper's ablation).")
    clip: float = _f(0.1, "bt_clip: per-pair score-head gradient norm c, weight min(1, c / (sigmoid(-m) d)); 0.1 "
                     "clips the farther half of the embedded MiniLM's pairs at the start (median d about 0.2).")
    head_input_norm: Literal["none", "layernorm"] = _f("none", "'layernorm': LayerNorm (no affine) on the score "
                                                       "head's input, in training and in the exported model.")
    eps: float = _f(DEFAULT_EPS, "NormBT weight stabiliser: w = mu / (d + eps).")
    use_margin: bool = _f(False, "Subtract the data's per-pair margin inside the sigmoid.")
    label_smoothing: float = _f(0.0, "Probability mass on the flipped label (conservative BT).")
    center_coef: float = _f(0.0, "Reward-centering coefficient on mean((r_c + r_r)^2).")


@dataclass(frozen=True, kw_only=True)
class LoraConfig:
    """Low-rank adapters (PEFT) on a frozen backbone; the score head trains in full (pipeline/lora.py)."""

    r: int = _f(0, "LoRA rank (0: off, every weight trains).")
    alpha: float = _f(16.0, "LoRA scale numerator: the update is (alpha / r) B A.")
    dropout: float = _f(0.0, "LoRA dropout: only 0 (the pipeline trains in eval mode with every dropout off, so "
                        "runs resume and compare across ZeRO stages exactly).")
    target_modules: tuple[str, ...] = _f((), "Module names adapted: () = the architecture's default (attention "
                                         "and MLP projections; BERT: query/key/value/dense), or ['all-linear'].")
    export: Literal["merged", "adapter"] = _f("merged", "'merged': LoRA folded into the weights, a plain "
                                              "transformers folder; 'adapter': the adapter and the score head for "
                                              "peft.AutoPeftModelForSequenceClassification.")
    load_in_4bit: bool = _f(False, "QLoRA: the frozen backbone in 4-bit NF4 through bitsandbytes (CUDA only).")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    num_workers: int = _f(2, "Ray Train workers (data-parallel ranks).")
    cpus_per_worker: float = _f(0.5, "CPUs each worker reserves (keep room for Ray Data on small machines).")
    use_gpu: bool = _f(False, "One GPU per worker, NCCL, bf16 when precision is 'auto'.")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = _f("PACK", "How workers spread over nodes: PACK, SPREAD, STRICT_PACK or STRICT_SPREAD "
                                 "(Ray's placement-group strategies).")
    zero_stage: int = _f(2, "DeepSpeed ZeRO stage 0-3.")
    precision: Literal["auto", "fp32", "bf16"] = _f("auto", "'auto' (bf16 on GPU, fp32 on CPU), 'fp32' or 'bf16'. "
                                                    "Weights load in fp32 whatever the checkpoint's dtype: 'fp32' "
                                                    "trains fp32, 'bf16' is DeepSpeed's bf16 with fp32 master "
                                                    "weights.")
    gradient_checkpointing: bool = _f(False, "Recompute each layer's activations in the backward pass "
                                      "(transformers' non-reentrant checkpointing): about 2·seq·hidden bytes kept "
                                      "per layer and sequence instead of ~34×, for ~1/3 more compute.")
    packing: bool = _f(False, "Decoders only: a micro-batch's chosen and rejected sequences end to end in one row, "
                       "no padding (per-sequence position_ids, block-diagonal attention; varlen under "
                       "flash_attention_2). Off by default: with sdpa/eager the row's attention spans all of it.")
    offload_optimizer: bool = _f(False, "DeepSpeed ZeRO-Offload: fp32 master weights and Adam state in CPU "
                                 "memory (ZeRO 1-3); on GPU the step runs DeepSpeed's CPU Adam.")
    offload_params: bool = _f(False, "ZeRO-3 only: the 16-bit weights live in CPU memory too (ZeRO-Infinity to CPU).")
    gpu_memory_gb: float = _f(0.0, "Memory of one GPU in GiB (2^30 bytes) that the memory plan checks against "
                              "(run_pipeline.py --plan; the train stage on GPU); 0: detected from the local GPU, "
                              "unknown without one.")
    micro_batch_size: int = _f(8, "Pairs per worker per forward.")
    grad_accum: int = _f(1, "Gradient accumulation steps.")
    lr: float = _f(1e-4, "Peak learning rate (1e-4 calibrated for MiniLM on the built-in data; configs/default.yaml "
                                 "starts its search lower, at 1e-5).")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    optimizer: Literal["adamw", "sgd"] = _f("adamw", "'adamw' or 'sgd' (with momentum).")
    momentum: float = _f(0.9, "SGD momentum.")
    scheduler: str = _f("linear", "transformers.get_scheduler name (linear, cosine, constant_with_warmup, ...).")
    warmup_ratio: float = _f(0.05, "Fraction of optimizer steps spent warming up.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0 disables).")
    epochs: int = _f(1, "Passes over the training split.")
    max_steps: int = _f(-1, "Stop after this many optimizer steps (-1: from epochs and row count).")
    stop_after_steps: int = _f(0, "Stop after this many optimizer steps while the lr schedule and the data order "
                               "keep the whole run's horizon (max_steps): a prefix of the run, as search trials "
                               "train it (0: off).")
    continue_search: bool = _f(False, "Start from the search's best trial when it trained the first "
                               "train.stop_after_steps steps of this very run (tune.trial_overrides sets only "
                               "that; same model, loss and train settings, the trial's ranks = this run's): those "
                               "steps are not trained again. Otherwise the run starts at step 0 and says why.")
    eval_every: int = _f(0, "Validate every N optimizer steps (0: only at the end).")
    checkpoint_every: int = _f(0, "Checkpoint every N optimizer steps (0: only at the end).")
    keep_checkpoints: int = _f(2, "Ray Train checkpoints kept.")
    max_failures: int = _f(1, "Worker-group restarts from the last checkpoint before giving up.")
    nan_policy: Literal["stop", "skip"] = _f("stop", "On a NaN/Inf loss: 'stop' (clear error) or 'skip' the step.")
    length_group_window: int = _f(64, "Batches are grouped by length inside windows of this many micro-batches.")
    seed: int = _f(0, "Seed for data order and initialisation.")
    log_every: int = _f(5, "Report metrics every N optimizer steps (and at every validation); each report "
                        "costs a Ray Train round trip.")
    grad_diag_every: int = _f(1, "Every N optimizer steps, record each pair's score-head gradient norm against its "
                              "distance (rank 0's first micro-batch; no extra forward or backward); 0 turns it off.")
    in_memory_rows: int = _f(100_000, "Splits up to this many pairs reach the workers from one in-memory Arrow block; "
                             "larger ones stream from Parquet (read_parquet).")


@dataclass(frozen=True, kw_only=True)
class SearchDomain:
    """One searched key's domain: exactly one of the four (Tune's own domains)."""

    uniform: tuple[float, float] | None = _f(None, "[low, high]: uniform.")
    loguniform: tuple[float, float] | None = _f(None, "[low, high], low > 0: uniform in log space.")
    choice: tuple[Any, ...] | None = _f(None, "[a, b, ...]: one of the values.")
    randint: tuple[int, int] | None = _f(None, "[low, high]: an integer, high excluded.")

    def __post_init__(self) -> None:
        given = [k for k in ("uniform", "loguniform", "choice", "randint") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ConfigError(f"needs exactly one of uniform, loguniform, choice, randint (got {given or 'none'})")
        kind, args = given[0], getattr(self, given[0])
        if kind == "choice":
            if not args:
                raise ConfigError("choice needs a non-empty list")
            return
        if len(args) != 2 or not args[0] < args[1]:
            raise ConfigError(f"{kind} needs [low, high] with low < high, got {list(args)}")
        if kind == "loguniform" and args[0] <= 0:
            raise ConfigError(f"loguniform needs low > 0, got {list(args)}")

    @property
    def kind(self) -> str:
        return next(k for k in ("uniform", "loguniform", "choice", "randint") if getattr(self, k) is not None)


@dataclass(frozen=True, kw_only=True)
class TuneConfig:
    mode: Literal["search", "compare"] = _f("search", "'search' (beta, eps, lr by ASHA) or 'compare' (losses x seeds with error bars).")
    num_samples: int = _f(2, "Trials in search mode (the embedded default's search is small: 2 trials).")
    search_space: dict[str, SearchDomain] = _f(
        {"loss.beta": SearchDomain(uniform=(0.5, 0.99)), "loss.eps": SearchDomain(loguniform=(1e-4, 1e-1)),
         "train.lr": SearchDomain(loguniform=(5e-5, 1.5e-4))},
        "Dotted config key -> its domain (see tune.search_space[] below).")
    metric: str = _f("val_accuracy", "Validation metric to maximise (never a test set).")
    start_from_config: bool = _f(True, "Search mode: the first trial uses the configured values of the searched keys "
                                 "(a baseline the search must beat on validation).")
    grace_period: int = _f(1, "ASHA: reports before a trial may be stopped.")
    max_concurrent_trials: int = _f(0, "0: derived from cluster resources.")
    losses: tuple[dict[str, Any], ...] = _f(({"loss.name": "bt"}, {"loss.name": "normbt"}),
                                            "Compare mode: loss settings, each dotted config keys -> values "
                                            "(checked like overrides when the config loads).")
    seeds: int = _f(5, "Compare mode: seeds per loss setting.")
    compare_lr_grid: tuple[float, ...] = _f((), "Compare mode: learning rates each loss setting first tries on "
                                            "validation (tune.metric); its seeds then train at its best one "
                                            "(empty: train.lr, or the setting's own train.lr, for all).")
    compare_lr_seeds: int = _f(1, "Compare mode: seeds per (setting, lr) in that search (train.seed + i).")
    reference_model: str = _f("", "Compare mode: the reward-model folder whose pair distances bin every benchmark "
                              "pair once for all losses ('': the untrained starting model, built as training builds it).")
    bootstrap: int = _f(2000, "Compare mode: pair-bootstrap resamples for the paired differences.")
    trial_overrides: dict[str, Any] = _f({"train.max_steps": 10}, "Dotted overrides applied to every trial "
                                         "(default: short trials; {} trains each trial like the final run).")
    eval_reports: int = _f(2, "Search mode: validation passes per trial when train.eval_every is 0 (ASHA's rungs).")
    reserve_cpus: float = _f(0.5, "CPUs left to Ray Data when max_concurrent_trials is derived.")
    controller_failure_limit: int = _f(1, "Train controller failures a trial tolerates (a starved trial errors out).")
    trial_launcher: Literal["auto", "in_process", "ray_train"] = _f(
        "auto", "'in_process': each trial trains in its own Tune actor, reused from trial to trial, as one rank "
        "with micro_batch_size × num_workers (the same global batch); 'ray_train': each trial is a Ray Train run "
        "with train.num_workers workers; 'auto': in_process unless trials train on several GPUs.")


_BENCHMARK_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass(frozen=True, kw_only=True)
class BenchmarkConfig:
    """One benchmark to score: exactly one of path, hf, synthetic."""

    name: str = _f("", "Name in outputs and metrics (letters, digits, _ - .); default: the file's stem, or the "
                   "source kind.")
    path: str | None = _f(None, "A .jsonl (optionally .gz), .json (array) or .parquet file, a glob of them, or a "
                          "folder (all of them inside, sorted).")
    hf: str | None = _f(None, "Hub id or save_to_disk folder (needs split), e.g. allenai/reward-bench.")
    synthetic: SyntheticSpec | None = _f(None, "The built-in benchmark's held-out test split, in v1 form.")
    format: Literal["v1", "v2", "rm_bench", "judgebench", "rmb", "hh"] | None = _f(
        None, "Schema and scoring: v1 (RewardBench: one chosen, one rejected string), v2 (RewardBench 2: lists, "
        "best-of-4 and Ties), rm_bench (THU-KEG/RM-Bench), judgebench (ScalerLab/JudgeBench, one response-model "
        "file), rmb (RMB pairwise set), hh (Anthropic HH-RLHF transcripts, e.g. its test files: scored as v1 pairs "
        "after the shared turns); default: v1 or v2, detected from the first row.")
    split: str | None = _f(None, "hf only: the split (allenai/reward-bench: filtered; reward-bench-2: test).")
    config: str | None = _f(None, "hf only: configuration name.")
    revision: str | None = _f(None, "hf only: revision.")
    limit: int | None = _f(None, "Score only the first N rows.")

    def __post_init__(self) -> None:
        kinds = [k for k in ("path", "hf", "synthetic") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ConfigError(f"needs exactly one of path, hf, synthetic (got {', '.join(kinds) or 'none'})")
        if not self.name:
            stem = "synthetic" if kinds[0] == "synthetic" else Path(str(getattr(self, kinds[0]))).name.split(".")[0]
            object.__setattr__(self, "name", re.sub(r"[^A-Za-z0-9_.-]+", "_", stem) or kinds[0])
        if not _BENCHMARK_NAME.match(self.name):
            raise ConfigError(f"name {self.name!r} may only use letters, digits, '_', '-', '.'")
        for key in ("split", "config", "revision"):
            if getattr(self, key) is not None and kinds[0] != "hf":
                raise ConfigError(f"{key} applies to hf benchmarks only")
        if kinds[0] == "synthetic" and self.format not in (None, "v1"):
            raise ConfigError(f"format {self.format!r} does not apply to the synthetic benchmark (it is v1)")
        if kinds[0] == "hf" and not self.split:
            raise ConfigError("hf benchmarks need split (allenai/reward-bench: filtered; allenai/reward-bench-2: test)")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit must be a positive integer, got {self.limit}")

    @property
    def kind(self) -> str:
        return next(k for k in ("path", "hf", "synthetic") if getattr(self, k) is not None)


@dataclass(frozen=True, kw_only=True)
class PromptsConfig:
    """Best-of-N prompts: exactly one of path, hf, synthetic."""

    path: str | None = _f(None, "A .jsonl/.json/.parquet file (optionally .gz) of prompt rows.")
    hf: str | None = _f(None, "Hub id or save_to_disk folder.")
    synthetic: SyntheticSpec | None = _f(None, "Built-in reasoning problems from the held-out test templates.")
    split: str | None = _f(None, "hf: split (default test).")
    name: str | None = _f(None, "hf: configuration name.")
    field: str | None = _f(None, "Column holding the prompt: a string or a message list ending with a user turn "
                           "(default prompt).")

    def __post_init__(self) -> None:
        kinds = [k for k in ("path", "hf", "synthetic") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ConfigError(f"needs exactly one of path, hf, synthetic (got {', '.join(kinds) or 'none'})")
        extras = [k for k in ("split", "name", "field") if getattr(self, k) is not None]
        if kinds[0] == "synthetic" and extras:
            raise ConfigError(f"{extras} do not apply to synthetic prompts (they always come from the held-out "
                              "test templates)")

    @property
    def kind(self) -> str:
        return next(k for k in ("path", "hf", "synthetic") if getattr(self, k) is not None)


@dataclass(frozen=True, kw_only=True)
class RewardBenchConfig:
    model: str = _f("", "Reward model to score: '' = the train stage's export, else a hub id or folder.")
    benchmarks: tuple[BenchmarkConfig, ...] = _f((BenchmarkConfig(name="synthetic", synthetic=SyntheticSpec()),),
                                                 "Benchmarks to score (see rewardbench.benchmarks[] below).")
    max_length: int = _f(2048, "Max tokens per scored conversation (official run_rm.py: 2048).")
    truncation_side: Literal["left", "right"] = _f("left", "Side truncated when too long (official: left).")
    batch_size: int = _f(32, "Conversations per inference batch.")
    num_actors: int = _f(1, "Ray Data actors holding a model copy.")
    cpus_per_actor: float = _f(1.0, "CPUs per inference actor (on CPU also its torch threads: Ray sets "
                               "OMP_NUM_THREADS to them).")
    distance_bins: int = _f(4, "Quantile bins for accuracy by representation distance.")
    score_metric: str = _f("", "Metric the register stage promotes on: '<benchmark>/<metric>' as logged (e.g. "
                           "rmbench/overall, rmbench/hard, judge_gpt/section/mmlu-pro); '' = <first benchmark>/overall.")


@dataclass(frozen=True, kw_only=True)
class BestOfNConfig:
    reward_model: str = _f("", "Proxy reward model: '' = the train stage's export, else a hub id or folder.")
    policy: Literal["synthetic", "hf"] = _f("synthetic", "'synthetic' (built-in sampler) or 'hf' (a causal LM).")
    policy_model: str = _f("", "Hub id or path of the causal LM when policy is 'hf' ('tiny:llama' for tests).")
    prompts: PromptsConfig = _f(PromptsConfig(synthetic=SyntheticSpec()), "Prompt source (see best_of_n.prompts "
                                "below).")
    num_prompts: int = _f(128, "Prompts sampled from the source.")
    n_max: int = _f(16, "Candidates drawn per prompt (largest n).")
    temperature: float = _f(1.0, "Sampling temperature (hf policy).")
    top_p: float = _f(1.0, "Nucleus sampling (hf policy).")
    max_new_tokens: int = _f(64, "Generation length (hf policy).")
    error_rate: float = _f(0.5, "Synthetic policy: probability a candidate is wrong.")
    coarse_share: float = _f(0.5, "Synthetic policy: share of wrong candidates that fail coarsely (stop before the "
                             "final number, or give up) instead of with one wrong number (0: every error is fine).")
    gold: Literal["verifier", "rm"] = _f("verifier", "'verifier' (built-in task) or 'rm' (an HF sequence classifier).")
    gold_model: str = _f("", "Hub id or path of the gold reward model when gold is 'rm'.")
    engine: Literal["auto", "transformers", "vllm"] = _f("auto", "Generation engine of the hf policy: auto (vLLM on "
                                                          "GPU when installed, else transformers) or forced.")
    bootstrap: int = _f(1000, "Bootstrap resamples for the 95% CI over prompts.")
    cpus_per_actor: float = _f(1.0, "CPUs per scoring actor (on CPU also its torch threads); actors: one per GPU, "
                               "or as many as half the cluster's CPUs hold.")
    seed: int = _f(0, "Sampling seed.")


@dataclass(frozen=True, kw_only=True)
class ServeConfig:
    model: str = _f("", "What to serve: models:/<name>@<alias> or models:/<name>/<version>, a run directory or a "
                    "save_pretrained folder; '' = the registry's champion (tracking.registered_model_name).")
    host: str = _f("127.0.0.1", "Address the HTTP endpoint binds (loopback unless you open it on purpose).")
    port: int = _f(8000, "HTTP port.")
    num_replicas: int = _f(1, "Replicas, each holding one model copy.")
    cpus_per_replica: float = _f(1.0, "CPUs each replica reserves.")
    gpus_per_replica: float = _f(0.0, "GPUs each replica reserves (> 0: the model runs on the GPU, bf16 backbone, "
                                 "fp32 head).")
    max_batch_tokens: int = _f(8192, "Tokens scored together across requests (at least one whole sequence).")
    batch_wait_ms: float = _f(5.0, "How long a batch waits for more requests before it runs.")
    max_texts_per_request: int = _f(4096, "Texts (or conversations) per request, at most (413 beyond; OpenRLHF "
                                    "before v0.10 posts a whole rollout, 1,024 texts by default, at once).")
    max_request_tokens: int = _f(4_000_000, "Tokens per request after encoding, at most (413 beyond); a request is "
                                 "scored in pieces of serve.max_batch_tokens through the shared batcher.")
    max_body_bytes: int = _f(64 * 2**20, "Request body size, at most (413 before the body is read whole).")
    max_text_chars: int = _f(200_000, "Characters per text, at most (413 beyond).")
    max_queued_requests: int = _f(512, "Requests waiting for a replica, at most; beyond it 503 with Retry-After "
                                  "(-1: no bound).")
    retry_after_s: float = _f(1.0, "Retry-After (seconds) sent with a 503 when the queue is full.")
    token_env: str = _f("NORMBT_SERVE_TOKEN", "Environment variable holding a bearer token; when it is set, every "
                        "request needs 'Authorization: Bearer <token>' ('' disables).")


@dataclass(frozen=True, kw_only=True)
class TrackingConfig:
    tracking_uri: str | None = _f(None, "MLflow URI (default: MLFLOW_TRACKING_URI, else sqlite under the run root).")
    experiment_name: str = _f("normbt", "MLflow experiment.")
    registered_model_name: str = _f("normbt-reward-model", "Registry name of the final model.")
    enabled: bool = _f(True, "Track with MLflow at all.")
    wait_s: float = _f(300.0, "How long creating an MLflow run waits for an unreachable server before the pipeline stops "
                       "(logging calls never wait: they are kept in the run directory and sent later).")


@dataclass(frozen=True, kw_only=True)
class RayConfig:
    address: str | None = _f(None, "Existing cluster to join (default: RAY_ADDRESS, else a local cluster).")
    num_cpus: int | None = _f(None, "Logical CPUs of a local cluster (None: the machine's).")
    storage_path: str | None = _f(None, "Ray Train/Tune storage (local path or s3://...; default: run dir).")


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    name: str = _f("default", "Run name: the run directory is <root>/<name>.")
    root: str = _f("runs", "Folder (or URI) holding run directories and the default MLflow store.")
    stages: tuple[StageName, ...] = _f(typing.get_args(StageName),
                       "Stages to run, in order (drop 'tune' to train with the configured hyperparameters).")
    seed: int = _f(0, "Global seed.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = _f(
        "WARNING", "The libraries' own lines on the terminal: at INFO (--verbose) Ray Train's line per report, "
        "Tune's trial tables, transformers' load reports, Ray Data's and MLflow's INFO lines; the pipeline's stage "
        "and progress lines always show.")


@dataclass(frozen=True, kw_only=True)
class PipelineConfig:
    data: DataConfig = _f(DataConfig(), "Data stage.")
    model: ModelConfig = _f(ModelConfig(), "Backbone.")
    loss: LossConfig = _f(LossConfig(), "Loss.")
    lora: LoraConfig = _f(LoraConfig(), "LoRA / QLoRA (off unless lora.r > 0).")
    train: TrainConfig = _f(TrainConfig(), "Train stage.")
    tune: TuneConfig = _f(TuneConfig(), "Tune stage.")
    rewardbench: RewardBenchConfig = _f(RewardBenchConfig(), "RewardBench stage.")
    best_of_n: BestOfNConfig = _f(BestOfNConfig(), "Best-of-N stage.")
    tracking: TrackingConfig = _f(TrackingConfig(), "MLflow.")
    ray: RayConfig = _f(RayConfig(), "Ray cluster.")
    serve: ServeConfig = _f(ServeConfig(), "Reward-model endpoint (python run_pipeline.py serve).")
    run: RunConfig = _f(RunConfig(), "Run identity and layout.")

    def __post_init__(self) -> None:
        _check(self)


def _check(cfg: PipelineConfig) -> None:
    """Cross-field checks; each failure names the key."""
    flat = flatten(cfg)
    checks = [
        (0 <= cfg.train.zero_stage <= 3, "train.zero_stage must be 0, 1, 2 or 3"),
        (0.0 <= cfg.loss.beta < 1.0, "loss.beta must be in [0, 1)"),
        (cfg.loss.eps > 0, "loss.eps must be > 0 (it bounds the NormBT weight at mu/eps)"),
        (cfg.loss.clip > 0 and math.isfinite(cfg.loss.clip), "loss.clip must be finite and > 0"),
        (cfg.loss.name == "normbt" or (cfg.loss.distance == "l2" and cfg.loss.representation == "head_input"),
         "loss.distance and loss.representation change NormBT's distance: they need loss.name=normbt"),
        (0.0 < cfg.data.validation_fraction < 1.0, "data.validation_fraction must be in (0, 1)"),
        (cfg.data.max_length >= 8, "data.max_length must be >= 8"),
        (cfg.train.num_workers >= 1, "train.num_workers must be >= 1"),
        (cfg.train.micro_batch_size >= 1 and cfg.train.grad_accum >= 1,
         "train.micro_batch_size and train.grad_accum must be >= 1"),
        (cfg.train.lr > 0, "train.lr must be > 0"),
        (cfg.train.stop_after_steps >= 0, "train.stop_after_steps must be >= 0 (0: off)"),
        (not cfg.train.offload_params or cfg.train.zero_stage == 3,
         "train.offload_params needs train.zero_stage=3 (only ZeRO-3 partitions the weights)"),
        (not cfg.train.offload_optimizer or cfg.train.zero_stage >= 1,
         "train.offload_optimizer needs train.zero_stage 1-3 (ZeRO-Offload offloads the optimizer partition)"),
        (cfg.train.gpu_memory_gb >= 0, "train.gpu_memory_gb must be >= 0 (0: detect)"),
        (cfg.train.nan_policy != "skip" or cfg.train.grad_accum == 1,
         "train.nan_policy=skip needs train.grad_accum=1 (a skipped micro-batch would leave half-accumulated grads)"),
        (cfg.lora.r >= 0 and cfg.lora.alpha > 0, "lora.r must be >= 0 and lora.alpha > 0"),
        (cfg.lora.dropout == 0.0, "lora.dropout: only 0 is supported (training runs in eval mode, every dropout off)"),
        (cfg.lora.r > 0 or not cfg.lora.load_in_4bit, "lora.load_in_4bit (QLoRA) needs lora.r > 0"),
        (cfg.lora.r == 0 or cfg.lora.export == "merged" or not cfg.model.name_or_path.startswith("tiny:"),
         "lora.export=adapter needs a backbone that can be loaded again (a hub id or folder), not tiny:*"),
        (cfg.best_of_n.n_max >= 1, "best_of_n.n_max must be >= 1"),
        (cfg.best_of_n.cpus_per_actor > 0 and cfg.rewardbench.cpus_per_actor > 0,
         "best_of_n.cpus_per_actor and rewardbench.cpus_per_actor must be > 0"),
        (cfg.serve.num_replicas >= 1 and cfg.serve.max_texts_per_request >= 1 and cfg.serve.max_batch_tokens >= 1,
         "serve.num_replicas, serve.max_texts_per_request and serve.max_batch_tokens must be >= 1"),
        (cfg.best_of_n.policy != "hf" or cfg.best_of_n.policy_model, "best_of_n.policy=hf needs best_of_n.policy_model"),
        (cfg.best_of_n.gold != "rm" or cfg.best_of_n.gold_model, "best_of_n.gold=rm needs best_of_n.gold_model"),
        (len(cfg.data.sources) > 0, "data.sources must list at least one source"),
        (cfg.tune.seeds >= 1 and cfg.tune.num_samples >= 1, "tune.seeds and tune.num_samples must be >= 1"),
        (cfg.tune.compare_lr_seeds >= 1, "tune.compare_lr_seeds must be >= 1"),
        (all(lr > 0 and math.isfinite(lr) for lr in cfg.tune.compare_lr_grid),
         "tune.compare_lr_grid: every learning rate must be finite and > 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    try:
        check_label_smoothing(cfg.loss.label_smoothing)  # the loss's own rule, not a copy of it
    except ValueError as err:
        raise ConfigError(f"loss.{err}") from None
    for key in cfg.tune.search_space:
        if key not in flat:
            raise ConfigError(f"tune.search_space: unknown key {key!r}{_suggest(key, flat)}")
    for where, overrides in [("tune.trial_overrides", cfg.tune.trial_overrides),
                             *((f"tune.losses[{i}]", s) for i, s in enumerate(cfg.tune.losses))]:
        for key, value in overrides.items():
            section, _, name = str(key).partition(".")
            if key not in flat:
                raise ConfigError(f"{where}: unknown key {key!r}{_suggest(str(key), flat)}")
            _value(_hints(_sections()[section])[name], value, f"{where}: {key}")
    names = [b.name for b in cfg.rewardbench.benchmarks]
    if not names or len(set(names)) != len(names):
        raise ConfigError(f"rewardbench.benchmarks: list at least one, each with a distinct name (got {names})")
    chosen_bench = cfg.rewardbench.score_metric.partition("/")[0]
    if cfg.rewardbench.score_metric and (chosen_bench not in names or "/" not in cfg.rewardbench.score_metric):
        raise ConfigError(f"rewardbench.score_metric {cfg.rewardbench.score_metric!r} must be '<benchmark>/<metric>' "
                          f"with <benchmark> one of {names}")




# ---------------------------------------------------------------- flatten / build


def _sections() -> dict[str, type]:
    return {name: hint for name, hint in _hints(PipelineConfig).items()}


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """Resolved annotations of a config dataclass (``from __future__ import annotations`` makes them strings)."""
    return typing.get_type_hints(cls)


def flatten(cfg: PipelineConfig) -> dict[str, Any]:
    """``{"train.lr": 3e-05, ...}``: every leaf field under its dotted key (for MLflow params and Tune)."""
    out: dict[str, Any] = {}
    for section in fields(cfg):
        sub = getattr(cfg, section.name)
        for f in fields(sub):
            out[f"{section.name}.{f.name}"] = getattr(sub, f.name)
    return out


def valid_keys() -> list[str]:
    return [f"{s}.{f.name}" for s, cls in _sections().items() for f in fields(cls)]


def _suggest(key: str, candidates: Any) -> str:
    close = difflib.get_close_matches(key, list(candidates), n=3, cutoff=0.5)
    return f" (did you mean: {', '.join(close)}?)" if close else ""


def _value(hint: Any, value: Any, where: str) -> Any:
    """``value`` (parsed YAML) checked against the type ``hint`` and built into it: nested config dataclasses from
    mappings (unknown keys named with the closest valid ones), tuples from lists, ``Literal`` choices, optionals;
    every error names ``where`` (file or override, then the dotted key and list index)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{where} must not be null")
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _value(option, value, where)
            except ConfigError as err:
                errors.append(str(err))
        if len(options) == 1 or all(dataclasses.is_dataclass(o) for o in options):
            raise ConfigError(errors[0]) from None
        raise ConfigError(f"{where} expects {' or '.join(_type_name(o) for o in options)}, got "
                          f"{type(value).__name__} {value!r}")
    if value is None:
        raise ConfigError(f"{where} must not be null")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}={value!r}: expected one of {', '.join(map(str, args))}"
                              f"{_suggest(str(value), [str(a) for a in args])}")
        return value
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} expects a list, got {type(value).__name__} {value!r}")
        item = args[0] if args else Any
        return tuple(_value(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict or hint is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} expects a mapping, got {type(value).__name__} {value!r}")
        key_hint, item = args if args else (Any, Any)
        return {_value(key_hint, k, f"{where} key"): _value(item, v, f"{where}[{k!r}]") for k, v in value.items()}
    return _scalar(hint, value, where)


def _scalar(hint: type, value: Any, where: str) -> Any:
    if hint is float and isinstance(value, str):  # YAML 1.1 reads "1e-5" (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where} must be a finite number, got {value!r}")
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"{where} expects true/false, got {value!r}")
    if hint in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{where} expects a number, got {value!r}")
    if not isinstance(value, hint):
        raise ConfigError(f"{where} expects {_type_name(hint)}, got {type(value).__name__} {value!r}")
    return value


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", str(hint))


def _build(cls: type, value: Any, where: str) -> Any:
    """A nested config dataclass from a mapping; its own ``__post_init__`` checks are reported at ``where``."""
    if isinstance(value, cls):
        return value
    names = [f.name for f in fields(cls)]
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where} expects a mapping with keys {', '.join(names)}; got {type(value).__name__} "
                          f"{value!r}")
    unknown = [k for k in value if k not in names]
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}{_suggest(str(unknown[0]), names)}; valid keys: "
                          f"{', '.join(names)}")
    hints = _hints(cls)
    kwargs = {k: _value(hints[k], v, f"{where}.{k}") for k, v in value.items()}
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    except (TypeError, ValueError) as err:  # checks of classes from outside this module (SyntheticSpec)
        raise ConfigError(f"{where}: {err}") from None


def from_flat(flat: Mapping[str, Any], *, base: PipelineConfig | None = None, where: str = "overrides") -> PipelineConfig:
    """Apply dotted ``{"section.field": value}`` pairs on top of ``base`` (defaults when None)."""
    base = base or PipelineConfig()
    sections = _sections()
    updates: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        section, _, name = key.partition(".")
        cls = sections.get(section)
        names = {f.name: f for f in fields(cls)} if cls else {}
        if name not in names:
            raise ConfigError(f"{where}: unknown key {key!r}{_suggest(key, valid_keys())}")
        updates.setdefault(section, {})[name] = _value(_hints(cls)[name], value, f"{where}: {key}")
    try:
        replaced = {s: dataclasses.replace(getattr(base, s), **kv) for s, kv in updates.items()}
        return dataclasses.replace(base, **replaced)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


def _flatten_mapping(tree: Mapping[str, Any], where: str) -> dict[str, Any]:
    """YAML nesting ``{train: {lr: 1}}`` → ``{"train.lr": 1}`` (only two levels exist)."""
    if not isinstance(tree, Mapping):
        raise ConfigError(f"{where}: top level must be a mapping of sections")
    flat: dict[str, Any] = {}
    sections = _sections()
    for section, body in tree.items():
        if section not in sections:
            raise ConfigError(f"{where}: unknown section {section!r}{_suggest(section, sections)}")
        if not isinstance(body, Mapping):
            raise ConfigError(f"{where}: section {section!r} must be a mapping")
        for name, value in body.items():
            flat[f"{section}.{name}"] = value
    return flat


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=c`` → ``("a.b", yaml(c))``."""
    key, sep, raw = text.partition("=")
    if not sep or "." not in key:
        raise ConfigError(f"override {text!r}: expected section.key=value")
    try:
        return key.strip(), yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({err})") from None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Defaults ← YAML file (only differences) ← ``key.sub=value`` overrides."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    cfg = from_flat(_flatten_mapping(tree, str(path)), where=str(path))
    return from_flat(dict(parse_override(o) for o in overrides), base=cfg, where="command-line override")


def to_yaml(cfg: PipelineConfig) -> str:
    """The full resolved config (every field) as YAML, for the run directory and MLflow."""
    tree = {s.name: {k: plain(v) for k, v in dataclasses.asdict(getattr(cfg, s.name)).items()} for s in fields(cfg)}
    return yaml.safe_dump(tree, sort_keys=False)


def plain(value: Any) -> Any:
    """Config values as plain YAML/JSON data: tuples become lists, nested config dataclasses mappings of their
    fields (defaults included, so a hash or a param never depends on how the YAML was written)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, tuple | list):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def config_hash(cfg: PipelineConfig, keys: tuple[str, ...], extra: Mapping[str, Any] | None = None,
                ignore: tuple[str, ...] = ()) -> str:
    """Stable hash of the selected sections/keys (``"data"`` or ``"train.lr"``), less the ``ignore`` keys, plus
    extra inputs."""
    flat = flatten(cfg)
    chosen = {k: plain(v) for k, v in flat.items()
              if any(k == p or k.startswith(p + ".") for p in keys) and k not in ignore}
    blob = json.dumps({"config": chosen, "extra": extra or {}}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def describe() -> str:
    """Every key with its default and one-line doc (``python run_pipeline.py --describe``); nested sections
    (sources, benchmarks, prompts, search domains) are listed under ``key[].field`` or ``key.field``."""
    lines = []
    for section, cls in _sections().items():
        lines += _describe_fields(section, cls)
    return "\n".join(lines)


def _describe_fields(prefix: str, cls: type) -> list[str]:
    lines = []
    for f in fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        hint = _hints(cls)[f.name]
        lines.append(f"{prefix}.{f.name} = {plain(default)!r}  # {f.metadata.get('doc', '')}{_choices(hint)}")
        nested = _nested_class(hint)
        if nested is not None:
            many = typing.get_origin(hint) is tuple or typing.get_origin(hint) is dict
            lines += _describe_fields(f"{prefix}.{f.name}{'[]' if many else ''}", nested)
    return lines


def _nested_class(hint: Any) -> type | None:
    """The config dataclass inside ``X``, ``X | None``, ``tuple[X, ...]`` or ``dict[str, X]``, if any."""
    if dataclasses.is_dataclass(hint):
        return hint
    for arg in typing.get_args(hint):
        found = _nested_class(arg) if arg is not type(None) else None
        if found is not None:
            return found
    return None


def _choices(hint: Any) -> str:
    """`` [a | b]`` for a ``Literal`` field, also inside ``X | None``."""
    if typing.get_origin(hint) is Literal:
        return f" [{' | '.join(map(str, typing.get_args(hint)))}]"
    literals = [a for a in typing.get_args(hint) if typing.get_origin(a) is Literal]
    return _choices(literals[0]) if len(literals) == 1 else ""
