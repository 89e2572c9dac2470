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
import hashlib
import json
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "default.yaml"


class ConfigError(ValueError):
    """A user mistake in a config file or override; the message says what and where."""


def _f(default: Any, doc: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):  # mutable: each instance gets its own copy
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"doc": doc}, **kw)
    return field(default=default, metadata={"doc": doc}, **kw)


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    sources: tuple = _f(({"synthetic": {}},), "Preference sources: mappings with path|hf|synthetic, "
                        "optional format, split, name, data_dir, weight, limit.")
    strict: bool = _f(False, "Stop at the first bad row (with file, line, field) instead of quarantining it.")
    max_length: int = _f(256, "Maximum tokens of prompt+response per side.")
    overlength: str = _f("truncate", "Over-length policy: 'truncate' (keep the response end) or 'drop'.")
    validation_fraction: float = _f(0.1, "Fraction of rows (by id hash) held out for validation.")
    split_seed: int = _f(0, "Salt of the id hash that assigns rows to train/validation.")
    batch_size: int = _f(256, "Rows per Ray Data map_batches call during tokenisation.")
    num_cpus: float = _f(0.5, "CPUs reserved by each Ray Data tokenisation task (below 1 so Train never starves it).")
    template_date: str = _f("2024-07-26", "Date (ISO) chat templates see (Llama 3.x writes it into every prompt): "
                            "fixed, so tokenisation never depends on the calendar; saved with the tokenizer.")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    name_or_path: str = _f("embedded:minilm", "Hub id, local folder, 'embedded:minilm' (offline package) "
                           "or 'tiny:<arch>' (random, from a config: tiny:llama, tiny:bert).")
    revision: str | None = _f(None, "Hub revision (branch, tag or commit) for hub ids.")
    trust_remote_code: bool = _f(False, "Allow model code from the hub (off unless you trust the repo).")
    seed: int = _f(0, "Seed for a newly initialised score head and tiny models.")


@dataclass(frozen=True, kw_only=True)
class LossConfig:
    name: str = _f("normbt", "Loss: 'bt' (Bradley-Terry) or 'normbt' (distance-normalised BT).")
    beta: float = _f(0.9, "NormBT EMA decay of the mean representation distance (paper: 0.9).")
    eps: float = _f(1e-3, "NormBT weight stabiliser: w = mu / (d + eps).")
    use_margin: bool = _f(False, "Subtract the data's per-pair margin inside the sigmoid.")
    label_smoothing: float = _f(0.0, "Probability mass on the flipped label (conservative BT).")
    center_coef: float = _f(0.0, "Reward-centering coefficient on mean((r_c + r_r)^2).")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    num_workers: int = _f(2, "Ray Train workers (data-parallel ranks).")
    cpus_per_worker: float = _f(0.5, "CPUs each worker reserves (keep room for Ray Data on small machines).")
    use_gpu: bool = _f(False, "One GPU per worker, NCCL, bf16 when precision is 'auto'.")
    placement_strategy: str = _f("PACK", "How workers spread over nodes: PACK, SPREAD, STRICT_PACK or STRICT_SPREAD "
                                 "(Ray's placement-group strategies).")
    zero_stage: int = _f(2, "DeepSpeed ZeRO stage 0-3.")
    precision: str = _f("auto", "'auto' (bf16 on GPU, fp32 on CPU), 'fp32' or 'bf16'.")
    micro_batch_size: int = _f(8, "Pairs per worker per forward.")
    grad_accum: int = _f(1, "Gradient accumulation steps.")
    lr: float = _f(1e-4, "Peak learning rate (1e-4 calibrated for the embedded MiniLM default).")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    optimizer: str = _f("adamw", "'adamw' or 'sgd' (with momentum).")
    momentum: float = _f(0.9, "SGD momentum.")
    scheduler: str = _f("linear", "transformers.get_scheduler name (linear, cosine, constant_with_warmup, ...).")
    warmup_ratio: float = _f(0.05, "Fraction of optimizer steps spent warming up.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0 disables).")
    epochs: int = _f(1, "Passes over the training split.")
    max_steps: int = _f(-1, "Stop after this many optimizer steps (-1: from epochs and row count).")
    eval_every: int = _f(0, "Validate every N optimizer steps (0: only at the end).")
    checkpoint_every: int = _f(0, "Checkpoint every N optimizer steps (0: only at the end).")
    keep_checkpoints: int = _f(2, "Ray Train checkpoints kept.")
    max_failures: int = _f(1, "Worker-group restarts from the last checkpoint before giving up.")
    nan_policy: str = _f("stop", "On a NaN/Inf loss: 'stop' (clear error) or 'skip' the step.")
    length_group_window: int = _f(64, "Batches are grouped by length inside windows of this many micro-batches.")
    seed: int = _f(0, "Seed for data order and initialisation.")
    log_every: int = _f(5, "Report metrics every N optimizer steps (and at every validation); each report "
                        "costs a Ray Train round trip.")
    in_memory_rows: int = _f(100_000, "Splits up to this many pairs reach the workers from one in-memory Arrow block; "
                             "larger ones stream from Parquet (read_parquet).")


@dataclass(frozen=True, kw_only=True)
class TuneConfig:
    mode: str = _f("search", "'search' (beta, eps, lr by ASHA) or 'compare' (losses x seeds with error bars).")
    num_samples: int = _f(2, "Trials in search mode (the embedded default's search is small: 2 short trials).")
    search_space: dict = _f({"loss.beta": {"uniform": [0.5, 0.99]}, "loss.eps": {"loguniform": [1e-4, 1e-1]},
                             "train.lr": {"loguniform": [5e-5, 1.5e-4]}},
                            "Dotted key -> {uniform|loguniform|choice|randint: args}.")
    metric: str = _f("val_accuracy", "Validation metric to maximise (never a test set).")
    start_from_config: bool = _f(True, "Search mode: the first trial uses the configured values of the searched keys "
                                 "(a baseline the search must beat on validation).")
    grace_period: int = _f(1, "ASHA: reports before a trial may be stopped.")
    max_concurrent_trials: int = _f(0, "0: derived from cluster resources.")
    losses: tuple = _f(({"loss.name": "bt"}, {"loss.name": "normbt"}), "Compare mode: named loss settings.")
    seeds: int = _f(5, "Compare mode: seeds per loss setting.")
    trial_overrides: dict = _f({"train.max_steps": 10}, "Dotted overrides applied to every trial (default: "
                               "short trials; {} trains each trial like the final run).")
    eval_reports: int = _f(2, "Search mode: validation passes per trial when train.eval_every is 0 (ASHA's rungs).")
    reserve_cpus: float = _f(0.5, "CPUs left to Ray Data when max_concurrent_trials is derived.")
    controller_failure_limit: int = _f(1, "Train controller failures a trial tolerates (a starved trial errors out).")


@dataclass(frozen=True, kw_only=True)
class RewardBenchConfig:
    model: str = _f("", "Reward model to score: '' = the train stage's export, else a hub id or folder.")
    benchmarks: tuple = _f(({"name": "synthetic", "synthetic": {}},),
                           "Benchmarks: mappings with name and path|hf|synthetic, optional format (v1|v2), split.")
    max_length: int = _f(2048, "Max tokens per scored conversation (official run_rm.py: 2048).")
    truncation_side: str = _f("left", "Side truncated when too long (official: left).")
    batch_size: int = _f(32, "Conversations per inference batch.")
    num_actors: int = _f(1, "Ray Data actors holding a model copy.")
    cpus_per_actor: float = _f(1.0, "CPUs per inference actor.")
    distance_bins: int = _f(4, "Quantile bins for accuracy by representation distance.")


@dataclass(frozen=True, kw_only=True)
class BestOfNConfig:
    reward_model: str = _f("", "Proxy reward model: '' = the train stage's export, else a hub id or folder.")
    policy: str = _f("synthetic", "'synthetic' (built-in sampler) or 'hf' (a causal LM).")
    policy_model: str = _f("", "Hub id or path of the causal LM when policy is 'hf' ('tiny:llama' for tests).")
    prompts: dict = _f({"synthetic": {}}, "Prompt source: {path|hf|synthetic: ...}.")
    num_prompts: int = _f(128, "Prompts sampled from the source.")
    n_max: int = _f(16, "Candidates drawn per prompt (largest n).")
    temperature: float = _f(1.0, "Sampling temperature (hf policy).")
    top_p: float = _f(1.0, "Nucleus sampling (hf policy).")
    max_new_tokens: int = _f(64, "Generation length (hf policy).")
    error_rate: float = _f(0.5, "Synthetic policy: probability a candidate is wrong.")
    gold: str = _f("verifier", "'verifier' (built-in task) or 'rm' (an HF sequence classifier).")
    gold_model: str = _f("", "Hub id or path of the gold reward model when gold is 'rm'.")
    bootstrap: int = _f(1000, "Bootstrap resamples for the 95% CI over prompts.")
    seed: int = _f(0, "Sampling seed.")


@dataclass(frozen=True, kw_only=True)
class TrackingConfig:
    tracking_uri: str | None = _f(None, "MLflow URI (default: MLFLOW_TRACKING_URI, else sqlite under the run root).")
    experiment_name: str = _f("normbt", "MLflow experiment.")
    registered_model_name: str = _f("normbt-reward-model", "Registry name of the final model.")
    enabled: bool = _f(True, "Track with MLflow at all.")


@dataclass(frozen=True, kw_only=True)
class RayConfig:
    address: str | None = _f(None, "Existing cluster to join (default: RAY_ADDRESS, else a local cluster).")
    num_cpus: int | None = _f(None, "Logical CPUs of a local cluster (None: the machine's).")
    storage_path: str | None = _f(None, "Ray Train/Tune storage (local path or s3://...; default: run dir).")


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    name: str = _f("default", "Run name: the run directory is <root>/<name>.")
    root: str = _f("runs", "Folder (or URI) holding run directories and the default MLflow store.")
    stages: tuple = _f(("data", "tune", "train", "rewardbench", "best_of_n", "register"),
                       "Stages to run, in order (drop 'tune' to train with the configured hyperparameters).")
    seed: int = _f(0, "Global seed.")


@dataclass(frozen=True, kw_only=True)
class PipelineConfig:
    data: DataConfig = _f(DataConfig(), "Data stage.")
    model: ModelConfig = _f(ModelConfig(), "Backbone.")
    loss: LossConfig = _f(LossConfig(), "Loss.")
    train: TrainConfig = _f(TrainConfig(), "Train stage.")
    tune: TuneConfig = _f(TuneConfig(), "Tune stage.")
    rewardbench: RewardBenchConfig = _f(RewardBenchConfig(), "RewardBench stage.")
    best_of_n: BestOfNConfig = _f(BestOfNConfig(), "Best-of-N stage.")
    tracking: TrackingConfig = _f(TrackingConfig(), "MLflow.")
    ray: RayConfig = _f(RayConfig(), "Ray cluster.")
    run: RunConfig = _f(RunConfig(), "Run identity and layout.")

    def __post_init__(self) -> None:
        _check(self)


_CHOICES = {
    "data.overlength": ("truncate", "drop"),
    "loss.name": ("bt", "normbt"),
    "train.precision": ("auto", "fp32", "bf16"),
    "train.placement_strategy": ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
    "train.optimizer": ("adamw", "sgd"),
    "train.nan_policy": ("stop", "skip"),
    "tune.mode": ("search", "compare"),
    "rewardbench.truncation_side": ("left", "right"),
    "best_of_n.policy": ("synthetic", "hf"),
    "best_of_n.gold": ("verifier", "rm"),
}


def _check(cfg: PipelineConfig) -> None:
    """Cross-field checks; each failure names the key."""
    flat = flatten(cfg)
    for key, allowed in _CHOICES.items():
        if flat[key] not in allowed:
            raise ConfigError(f"{key}={flat[key]!r}: expected one of {', '.join(allowed)}")
    checks = [
        (0 <= cfg.train.zero_stage <= 3, "train.zero_stage must be 0, 1, 2 or 3"),
        (0.0 <= cfg.loss.beta < 1.0, "loss.beta must be in [0, 1)"),
        (cfg.loss.eps > 0, "loss.eps must be > 0 (it bounds the NormBT weight at mu/eps)"),
        (0.0 <= cfg.loss.label_smoothing < 0.5, "loss.label_smoothing must be in [0, 0.5)"),
        (0.0 < cfg.data.validation_fraction < 1.0, "data.validation_fraction must be in (0, 1)"),
        (cfg.data.max_length >= 8, "data.max_length must be >= 8"),
        (cfg.train.num_workers >= 1, "train.num_workers must be >= 1"),
        (cfg.train.micro_batch_size >= 1 and cfg.train.grad_accum >= 1,
         "train.micro_batch_size and train.grad_accum must be >= 1"),
        (cfg.train.lr > 0, "train.lr must be > 0"),
        (cfg.train.nan_policy != "skip" or cfg.train.grad_accum == 1,
         "train.nan_policy=skip needs train.grad_accum=1 (a skipped micro-batch would leave half-accumulated grads)"),
        (cfg.best_of_n.n_max >= 1, "best_of_n.n_max must be >= 1"),
        (cfg.best_of_n.policy != "hf" or cfg.best_of_n.policy_model, "best_of_n.policy=hf needs best_of_n.policy_model"),
        (cfg.best_of_n.gold != "rm" or cfg.best_of_n.gold_model, "best_of_n.gold=rm needs best_of_n.gold_model"),
        (len(cfg.data.sources) > 0, "data.sources must list at least one source"),
        (cfg.tune.seeds >= 1 and cfg.tune.num_samples >= 1, "tune.seeds and tune.num_samples must be >= 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    unknown = [s for s in cfg.run.stages if s not in STAGE_NAMES]
    if unknown:
        raise ConfigError(f"run.stages: unknown stage(s) {unknown}; valid: {', '.join(STAGE_NAMES)}")
    for key in cfg.tune.search_space:
        if key not in flat:
            raise ConfigError(f"tune.search_space: unknown key {key!r}{_suggest(key, flat)}")


STAGE_NAMES = ("data", "tune", "train", "rewardbench", "best_of_n", "register")


# ---------------------------------------------------------------- flatten / build


def _sections() -> dict[str, type]:
    return {f.name: f.type if isinstance(f.type, type) else _resolve(f.type) for f in fields(PipelineConfig)}


def _resolve(name: str) -> type:
    return globals()[name]


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


def _coerce(key: str, value: Any, annotation: Any, where: str) -> Any:
    """Check a YAML value against the field's type; lists become tuples so configs stay hashable-ish."""
    hint = annotation if not isinstance(annotation, str) else eval(annotation, globals(), vars(typing))  # noqa: S307
    args = typing.get_args(hint)
    allowed = tuple(a for a in args if a is not type(None)) if args else (hint,)
    if value is None:
        if type(None) in args:
            return None
        raise ConfigError(f"{where}: {key} must not be null")
    target = allowed[0]
    if target is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if target is float and isinstance(value, str):  # YAML 1.1 reads "1e-5" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if target is tuple and isinstance(value, list):
        return tuple(value)
    if target is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: {key} expects true/false, got {value!r}")
    if target in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{where}: {key} expects a number, got {value!r}")
    if not isinstance(value, target):
        raise ConfigError(f"{where}: {key} expects {target.__name__}, got {type(value).__name__} {value!r}")
    return value


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
        updates.setdefault(section, {})[name] = _coerce(key, value, names[name].type, where)
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
    tree = {s.name: {k: _plain(v) for k, v in dataclasses.asdict(getattr(cfg, s.name)).items()} for s in fields(cfg)}
    return yaml.safe_dump(tree, sort_keys=False)


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def config_hash(cfg: PipelineConfig, keys: tuple[str, ...], extra: Mapping[str, Any] | None = None) -> str:
    """Stable hash of the selected sections/keys (``"data"`` or ``"train.lr"``) plus extra inputs."""
    flat = flatten(cfg)
    chosen = {k: _plain(v) for k, v in flat.items() if any(k == p or k.startswith(p + ".") for p in keys)}
    blob = json.dumps({"config": chosen, "extra": extra or {}}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def describe() -> str:
    """Every key with its default and one-line doc (``python run_pipeline.py --describe``)."""
    lines = []
    for section, cls in _sections().items():
        for f in fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"{section}.{f.name} = {_plain(default)!r}  # {f.metadata.get('doc', '')}")
    return "\n".join(lines)
