"""The memory plan: what one GPU holds while training a config, from the model's config alone (never its weights).

``python run_pipeline.py [--config F] --plan [--json]`` prints it; the train stage runs it before training on GPU
and refuses a run that cannot fit, naming settings that would make it fit.

Model states (weights, gradients, fp32 master weights and Adam state) per GPU follow DeepSpeed's own estimators,
``estimate_zero2_model_states_mem_needs`` (deepspeed/runtime/zero/stage_1_and_2.py) and
``estimate_zero3_model_states_mem_needs`` (deepspeed/runtime/zero/stage3.py), as of deepspeed 0.19.8. In 16-bit
mixed precision a parameter costs 2 bytes of weights, 2 of gradients and 16 of optimizer (4 fp32 master weight,
4 fp32 gradient, 8 Adam moments):

* ZeRO-0: nothing partitioned, 20 bytes (the ZeRO-2 estimator with one GPU).
* ZeRO-1: the 16 optimizer bytes partitioned over the N ranks: ``4 + 16/N`` (no DeepSpeed estimator; its ZeRO-2
  arithmetic with the 16-bit gradients kept whole).
* ZeRO-2: ``2 + 18/N``; with the optimizer offloaded to CPU, 2.
* ZeRO-3: ``4·largest_layer + 18/N`` (the largest module's own parameters, gathered in 16-bit with their
  gradients); optimizer offloaded: ``4·largest_layer + 2/N``; weights offloaded too: ``4·largest_layer``.

With LoRA (``lora.r`` > 0) only the adapters and the score head train: every weight (adapters included) still
costs its 16-bit bytes, partitioned under ZeRO-3, while gradients and optimizer state cost their bytes for the
trainable parameters alone, partitioned as above (gradients from ZeRO-2 on, optimizer state from ZeRO-1 on). The
adapters are counted from the model's shape: ``r·(in + out)`` per adapted linear layer, the layers
:func:`pipeline.lora.targets` picks. DeepSpeed has no estimator for this: it is this module's extension of them.

In fp32 (no mixed precision) the same structure holds with 4-byte weights and gradients and a 12-byte optimizer
(DeepSpeed's ZeRO 1-3 keep an fp32 copy of the partition beside Adam's two moments; ZeRO-0 has no copy: 8): the
estimators assume 16-bit weights, so these fp32 figures are this module's extension of them.

Activations per transformer layer follow Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
Transformer Models" (arXiv 2205.05198, section 4 and Table 2, no tensor or sequence parallelism), in 16-bit bytes
for ``s`` tokens, ``b`` sequences, hidden size ``h``, ``a`` heads: attention ``11·s·b·h`` (plus ``5·a·s²·b`` when
the scores are materialised: eager attention; a fused kernel, sdpa or flash-attention, keeps none), MLP ``19·s·b·h``
for GPT's 4h GELU MLP, layer norms ``4·s·b·h``: ``34·s·b·h + 5·a·s²·b`` in all. The MLP term is written for the
model's own width ``f`` (``intermediate_size``): ``2·s·b·h + 4·s·b·f + s·b·h``, with ``8·s·b·f`` for a gated MLP
(gate, up, activation and product kept: Llama, Gemma, Qwen), which gives Korthikanti's 19 at ``f = 4h``. Dropout
masks are counted as in the paper (a conservative figure: dropout is off in this project). With activation
checkpointing (full recomputation, their section 4.1) a layer keeps only its ``2·s·b·h`` input, plus one layer's
full activations while it is recomputed. fp32 doubles every term.

Packing (``train.packing``) puts a micro-batch's sequences in one row: see :func:`activation_bytes` for what
changes. ``b`` is two sequences per pair (chosen and rejected run in one forward) times ``train.micro_batch_size``; ``s`` is
``data.max_length``: a micro-batch pads to its longest sequence, so that is the worst case, which a run meets
when any pair of a micro-batch reaches the limit.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the arithmetic and the shape need only torch and transformers (benchmarks/gpu_check.py)
    from torch import nn

    from pipeline.config import LoraConfig, PipelineConfig

GIB = 2**30
#: Part of the GPU's memory not planned for: the CUDA context, NCCL and DeepSpeed's communication buckets
#: (``reduce_bucket_size`` and ``allgather_bucket_size``, 5e8 elements each by default), allocator fragmentation.
RESERVE_FRACTION = 0.10


class PlanError(ValueError):
    """The plan cannot know the model's shape (a hub id with no hub, an unreadable config)."""


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    """What the plan needs from a model's config, counted on the meta device (no memory, no weights)."""

    source: str
    model_type: str
    parameters: int
    largest_layer_parameters: int
    layers: int
    hidden_size: int
    heads: int
    intermediate_size: int
    gated_mlp: bool
    lora_parameters: int = 0  # the adapters' parameters (lora.r > 0)
    head_parameters: int = 0  # the score head's, which trains in full under LoRA


@dataclass(frozen=True, kw_only=True)
class MemoryPlan:
    parameters: int
    trainable_parameters: int
    model_type: str
    layers: int
    hidden_size: int
    heads: int
    intermediate_size: int
    gated_mlp: bool
    zero_stage: int
    world_size: int
    precision: str
    offload_optimizer: bool
    offload_params: bool
    gradient_checkpointing: bool
    packing: bool
    attn_implementation: str
    sequence_length: int
    sequences_per_micro_batch: int
    model_states_gb: float
    activations_gb: float
    total_gb: float
    gpu_memory_gb: float | None
    gpu_memory_source: str
    usable_gb: float | None
    fits: bool | None
    notes: list[str] = field(default_factory=list)
    suggestions: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------ shape


def load_model_config(name: str, *, revision: str | None = None, trust_remote_code: bool = False):
    """The transformers config of ``name`` (num_labels=1): ``tiny:*`` built here, a folder or ``embedded:minilm``
    read from disk, a hub id fetched when the hub is reachable."""
    from transformers import AutoConfig

    from pipeline import modeling

    if modeling.tiny_arch(name):
        tok = modeling.load_tokenizer(name)
        return modeling._tiny_config(modeling.tiny_arch(name), tok, causal=False)
    try:
        return AutoConfig.from_pretrained(modeling.resolve_model_path(name), revision=revision,
                                          trust_remote_code=trust_remote_code, num_labels=1)
    except (OSError, ValueError) as err:
        raise PlanError(f"model.name_or_path={name}: cannot read its config ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}); without the hub, point the plan at a "
                        f"folder holding its config.json (configs/models/ has some)") from None


def model_shape(name: str, *, revision: str | None = None, trust_remote_code: bool = False,
                lora: LoraConfig | None = None) -> ModelShape:
    """The reward model's parameter counts (score head included, tied weights once) and layer shape, from a model
    built on the meta device. ``largest_layer_parameters`` is DeepSpeed's: the most parameters one module holds
    itself (``deepspeed.runtime.zero.stage3.model_to_params``), usually the embedding."""
    import torch
    from transformers import AutoModelForSequenceClassification

    config = load_model_config(name, revision=revision, trust_remote_code=trust_remote_code)
    try:
        with torch.device("meta"):
            model = AutoModelForSequenceClassification.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as err:  # noqa: BLE001 - any failure means the shape is unknown, said so
        raise PlanError(f"model.name_or_path={name}: its config does not build a sequence-classification model on "
                        f"the meta device ({type(err).__name__}: {err})") from None
    parameters = sum(p.numel() for p in model.parameters())  # parameters() yields a shared (tied) weight once
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    text = config.get_text_config()
    hidden = int(text.hidden_size)
    names = [n for n, _ in model.named_modules()]
    adapters, head = lora_parameter_count(model, lora) if lora is not None and lora.r > 0 else (0, 0)
    return ModelShape(source=name, model_type=str(getattr(config, "model_type", "?")), parameters=int(parameters),
                      largest_layer_parameters=int(largest), layers=int(text.num_hidden_layers), hidden_size=hidden,
                      heads=int(text.num_attention_heads),
                      intermediate_size=int(getattr(text, "intermediate_size", None) or 4 * hidden),
                      gated_mlp=any(n.endswith(("gate_proj", "gate_up_proj", "w1")) for n in names),
                      lora_parameters=adapters, head_parameters=head)


def lora_parameter_count(model: nn.Module, lora: LoraConfig) -> tuple[int, int]:
    """``(adapter parameters, score-head parameters)`` of LoRA on ``model`` (meta device is fine): ``r·(in + out)``
    for each linear layer PEFT adapts (its name's last part among the targets; ``all-linear``: every linear layer
    but the score head)."""
    from torch import nn

    from pipeline import lora as lora_lib
    from pipeline import modeling

    head = modeling.score_head(model)
    wanted = lora_lib.targets(lora, model)
    adapted = [m for name, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head
               and (wanted == "all-linear" or name.rsplit(".", 1)[-1] in wanted)]
    return (sum(lora.r * (m.in_features + m.out_features) for m in adapted),
            sum(p.numel() for p in head.parameters()))


# ------------------------------------------------------------------ arithmetic


def model_state_bytes(parameters: int, largest_layer: int, *, zero_stage: int, world_size: int, bf16: bool,
                      offload_optimizer: bool = False, offload_params: bool = False,
                      trainable: int | None = None) -> float:
    """Bytes of weights, gradients and optimizer state on one GPU (the module docstring's table); ``trainable``:
    the parameters that train when fewer than all do (LoRA)."""
    p, n = parameters, world_size
    weight, grad, optim = (2, 2, 16) if bf16 else (4, 4, 12)
    if trainable is not None and trainable < p:
        return _frozen_backbone_bytes(p, trainable, largest_layer, zero_stage=zero_stage, n=n, weight=weight,
                                      grad=grad, optim=optim if bf16 or zero_stage else 8,
                                      offload_optimizer=offload_optimizer, offload_params=offload_params)
    if zero_stage == 0:
        return p * (weight + grad + (optim if bf16 else 8))
    if zero_stage == 1:
        return p * (weight + grad + (0 if offload_optimizer else optim / n))
    if zero_stage == 2:
        return p * weight + (0 if offload_optimizer else p * (grad + optim) / n)
    gathered = 2 * weight * largest_layer  # DeepSpeed: 4 bytes per parameter of the largest layer in 16-bit
    if offload_optimizer and offload_params:
        return gathered
    if offload_optimizer:
        return gathered + p * weight / n
    return gathered + p * (grad + optim) / n


def _frozen_backbone_bytes(p: int, t: int, largest_layer: int, *, zero_stage: int, n: int, weight: int, grad: int,
                           optim: float, offload_optimizer: bool, offload_params: bool) -> float:
    """LoRA's model states (the module docstring): every weight, gradients and optimizer state of ``t``."""
    weights = 0 if offload_params and zero_stage == 3 else p * weight / (n if zero_stage == 3 else 1)
    gathered = 2 * weight * largest_layer if zero_stage == 3 else 0
    grads = t * grad / (n if zero_stage >= 2 else 1)
    optimizer = 0 if offload_optimizer else t * optim / (n if zero_stage >= 1 else 1)
    return weights + gathered + grads + optimizer


def activation_bytes(shape: ModelShape, *, tokens: int, sequences: int, bf16: bool, eager: bool,
                     checkpointing: bool, packed: str | None = None) -> float:
    """Bytes of activations kept for the backward pass of one micro-batch (the module docstring's formula).

    ``packed``: the attention kernel of a packed micro-batch (``train.packing``), whose ``b`` sequences form one
    row of ``b·s`` tokens. The per-token terms stay; the row's attention spans the whole row: eager keeps
    ``5·a·(b·s)²`` bytes of scores instead of ``5·a·s²·b``, and sdpa and eager hold transformers' block-diagonal
    mask, ``(b·s)²`` bytes (bool) once per forward; flash-attention's varlen kernel keeps neither."""
    s, b, h, a, f = tokens, sequences, shape.hidden_size, shape.heads, shape.intermediate_size
    mlp = 2 * s * b * h + (8 if shape.gated_mlp else 4) * s * b * f + s * b * h
    row = s * b if packed else s
    scores = 5 * a * row * row * (1 if packed else b) if eager else 0
    layer = 11 * s * b * h + scores + mlp + 4 * s * b * h
    kept = shape.layers * 2 * s * b * h + layer if checkpointing else shape.layers * layer
    mask = (s * b) ** 2 if packed in ("sdpa", "eager") else 0
    return kept * (1 if bf16 else 2) + mask


# ------------------------------------------------------------------ the plan


def gpu_memory(cfg: PipelineConfig) -> tuple[float | None, str]:
    """``(GiB, where from)``: ``train.gpu_memory_gb``, else the local GPU's total memory, else unknown."""
    if cfg.train.gpu_memory_gb > 0:
        return float(cfg.train.gpu_memory_gb), "train.gpu_memory_gb"
    try:
        import torch

        if not torch.cuda.is_available():
            return None, "unknown (no GPU here and train.gpu_memory_gb is 0)"
        props = torch.cuda.get_device_properties(0)
    except Exception as err:  # noqa: BLE001 - no usable CUDA: memory unknown, said so
        return None, f"unknown (CUDA failed: {type(err).__name__}; set train.gpu_memory_gb)"
    return props.total_memory / GIB, f"detected ({props.name})"


def compute(cfg: PipelineConfig, shape: ModelShape, gpu_gb: float | None, gpu_source: str = "given") -> MemoryPlan:
    """The plan of ``cfg`` for a model of ``shape`` on GPUs of ``gpu_gb`` GiB (None: unknown)."""
    t = cfg.train
    bf16 = t.precision == "bf16" or (t.precision == "auto" and t.use_gpu)
    lora_on = cfg.lora.r > 0
    # PEFT keeps the frozen original head beside its trained copy (modules_to_save)
    parameters = shape.parameters + (shape.lora_parameters + shape.head_parameters if lora_on else 0)
    trainable = shape.lora_parameters + shape.head_parameters if lora_on else parameters
    states = model_state_bytes(parameters, shape.largest_layer_parameters, zero_stage=t.zero_stage,
                               world_size=t.num_workers, bf16=bf16, offload_optimizer=t.offload_optimizer,
                               offload_params=t.offload_params, trainable=trainable)
    sequences = 2 * t.micro_batch_size
    acts = activation_bytes(shape, tokens=cfg.data.max_length, sequences=sequences, bf16=bf16,
                            eager=cfg.model.attn_implementation == "eager", checkpointing=t.gradient_checkpointing,
                            packed=cfg.model.attn_implementation if t.packing else None)
    total = (states + acts) / GIB
    usable = None if gpu_gb is None else gpu_gb * (1 - RESERVE_FRACTION)
    return MemoryPlan(
        parameters=parameters, trainable_parameters=trainable, model_type=shape.model_type, layers=shape.layers, hidden_size=shape.hidden_size,
        heads=shape.heads, intermediate_size=shape.intermediate_size, gated_mlp=shape.gated_mlp,
        zero_stage=t.zero_stage, world_size=t.num_workers, precision="bf16" if bf16 else "fp32",
        offload_optimizer=t.offload_optimizer, offload_params=t.offload_params,
        gradient_checkpointing=t.gradient_checkpointing, packing=t.packing,
        attn_implementation=cfg.model.attn_implementation,
        sequence_length=cfg.data.max_length, sequences_per_micro_batch=sequences, model_states_gb=states / GIB,
        activations_gb=acts / GIB, total_gb=total, gpu_memory_gb=gpu_gb, gpu_memory_source=gpu_source,
        usable_gb=usable, fits=None if usable is None else total <= usable, notes=_notes(cfg, gpu_gb))


def _notes(cfg: PipelineConfig, gpu_gb: float | None) -> list[str]:
    """What the plan does not know or does not count, said rather than guessed."""
    notes = [(f"not counted: CUDA context, communication buckets, fragmentation ({RESERVE_FRACTION:.0%} of the "
              f"GPU is held back for them); the logits and loss (small for a one-output head)"),
             (f"activations assume every sequence is data.max_length={cfg.data.max_length} tokens (a micro-batch "
              f"pads to its longest); shorter data needs less"),
             ("LoRA: only the adapters and the score head train; their gradients and optimizer state are counted, "
              "every weight still is" if cfg.lora.r > 0 else "LoRA off (lora.r = 0): every parameter trains")]
    if cfg.model.attn_implementation == "sdpa":
        notes.append("sdpa counted as a fused kernel (no materialised scores): true for its flash and "
                     "memory-efficient CUDA backends; its math fallback would materialise them")
    if cfg.train.packing:
        notes.append("packing: the same tokens at worst (no padding to save when every sequence is max_length); "
                     "the padding_fraction metric of a padded run says what it saves on real data")
    if cfg.train.offload_params and not cfg.train.offload_optimizer:
        notes.append("train.offload_params without train.offload_optimizer is not in DeepSpeed's estimators: "
                     "counted as without offload")
    if cfg.train.offload_optimizer or cfg.train.offload_params:
        notes.append("offloaded states need CPU memory on each node (DeepSpeed's estimators: about 16-18 bytes per "
                     "parameter per node, times 1.5 buffer); not checked here")
    if gpu_gb is None:
        notes.append("GPU memory unknown: set train.gpu_memory_gb to check the fit")
    return notes


def _options(cfg: PipelineConfig) -> list[dict[str, Any]]:
    """Changes the plan may suggest, in the order it prefers them (cheapest in speed first)."""
    t = cfg.train
    options: list[dict[str, Any]] = []
    if cfg.model.attn_implementation == "eager":
        options.append({"model.attn_implementation": "sdpa"})
    if not t.gradient_checkpointing:
        options.append({"train.gradient_checkpointing": True})
    m = t.micro_batch_size
    while m > 1:  # the same global batch: fewer pairs per forward, more accumulation
        m //= 2
        options.append({"train.micro_batch_size": m, "train.grad_accum": t.grad_accum * t.micro_batch_size // m})
        if m > 1 and t.micro_batch_size % m:
            break
    if t.zero_stage < 3:
        options.append({"train.zero_stage": 3})
    if not t.offload_optimizer:
        options.append({"train.offload_optimizer": True})
    return options


def suggestions(cfg: PipelineConfig, shape: ModelShape, gpu_gb: float, limit: int = 3) -> list[dict[str, Any]]:
    """Up to ``limit`` sets of overrides (fewest changes first) under which the plan fits ``gpu_gb``."""
    from pipeline.config import from_flat

    found: list[dict[str, Any]] = []
    options = _options(cfg)
    for size in (1, 2, 3):
        for combo in itertools.combinations(options, size):
            keys = [k for o in combo for k in o]
            if len(keys) != len(set(keys)):
                continue  # two micro-batch choices
            merged = {k: v for o in combo for k, v in o.items()}
            if merged.get("train.offload_optimizer") and cfg.train.zero_stage == 0 and "train.zero_stage" not in merged:
                continue  # offload needs ZeRO 1-3
            plan = compute(from_flat(merged, base=cfg), shape, gpu_gb)
            if plan.fits:
                found.append({"overrides": merged, "total_gb": round(plan.total_gb, 1)})
        if found:
            return found[:limit]
    return found


def plan(cfg: PipelineConfig, *, shape: ModelShape | None = None, with_suggestions: bool = True) -> MemoryPlan:
    """The plan of ``cfg``: shape from the model's config, GPU memory from the config or the local GPU."""
    shape = shape or model_shape(cfg.model.name_or_path, revision=cfg.model.revision,
                                 trust_remote_code=cfg.model.trust_remote_code, lora=cfg.lora)
    gpu_gb, source = gpu_memory(cfg)
    result = compute(cfg, shape, gpu_gb, source)
    if with_suggestions and result.fits is False:
        result = MemoryPlan(**{**asdict(result), "suggestions": suggestions(cfg, shape, gpu_gb)})
    return result


def render(p: MemoryPlan) -> str:
    """The plan as text, per GPU."""
    offload = "+".join(k for k, on in (("optimizer", p.offload_optimizer), ("params", p.offload_params)) if on)
    verdict = {True: "fits", False: "DOES NOT FIT", None: "fit unknown"}[p.fits]
    gpu = "unknown" if p.gpu_memory_gb is None else f"{p.gpu_memory_gb:.1f} GiB ({p.gpu_memory_source}), " \
                                                       f"{p.usable_gb:.1f} GiB usable"
    lines = [
        (f"model: {p.model_type}, {p.parameters / 1e9:.3f}B parameters"
         f"{'' if p.trainable_parameters == p.parameters else f' ({p.trainable_parameters / 1e6:.1f}M trainable: LoRA)'}, {p.layers} layers, hidden {p.hidden_size}, "
         f"{p.heads} heads, MLP {p.intermediate_size}{' (gated)' if p.gated_mlp else ''}"),
        (f"training: ZeRO-{p.zero_stage} over {p.world_size} GPUs, {p.precision}, offload {offload or 'none'}, "
         f"{p.sequences_per_micro_batch} sequences × {p.sequence_length} tokens per micro-batch, attention "
         f"{p.attn_implementation}, checkpointing {'on' if p.gradient_checkpointing else 'off'}, packing "
         f"{'on' if p.packing else 'off'}"),
        (f"per GPU: model states {p.model_states_gb:.1f} GiB + activations {p.activations_gb:.1f} GiB = "
         f"{p.total_gb:.1f} GiB; GPU {gpu}: {verdict}"),
    ]
    lines += [f"  note: {n}" for n in p.notes]
    for s in p.suggestions:
        lines.append("  would fit with: " + " ".join(f"{k}={_yaml(v)}" for k, v in s["overrides"].items())
                     + f" ({s['total_gb']} GiB)")
    return "\n".join(lines)


def _yaml(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def refuse_if_unfit(cfg: PipelineConfig, log=print) -> MemoryPlan | None:
    """The train stage's check before training on GPU: raises when the plan says the run cannot fit, naming
    settings that would make it fit; logs and lets the run go when the plan cannot know (no shape, no memory)."""
    try:
        result = plan(cfg)
    except PlanError as err:
        log(f"  memory plan: {err}; training without a plan")
        return None
    log("  memory plan: " + render(result).replace("\n", "\n  "))
    if result.fits is False:
        fixes = "; or ".join(" ".join(f"{k}={_yaml(v)}" for k, v in s["overrides"].items()) for s in result.suggestions)
        raise RuntimeError(f"the memory plan says this run cannot fit: {result.total_gb:.1f} GiB per GPU needed, "
                           f"{result.usable_gb:.1f} GiB usable of {result.gpu_memory_gb:.1f} "
                           f"({result.gpu_memory_source}); "
                           + (f"it would fit with {fixes}" if fixes else "no combination of checkpointing, "
                              "smaller micro-batches, ZeRO-3 and offload fits: use more GPUs or a shorter "
                              "data.max_length"))
    return result
