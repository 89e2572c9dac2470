"""LoRA and QLoRA reward models (PEFT): low-rank adapters on a frozen backbone, the score head trained in full.

* :func:`apply_lora` wraps the reward model of :func:`pipeline.modeling.build_reward_model` (its head already
  initialised) in PEFT's ``PeftModelForSequenceClassification``: LoRA on ``lora.target_modules`` (a default per
  architecture, or ``all-linear``), the score head in ``modules_to_save``. PEFT keeps the original head frozen as
  ``original_module`` and trains a copy, ``modules_to_save["default"]``, registered after it, so
  :func:`pipeline.modeling.score_head` (the last linear layer with one output) finds the trained copy: the head
  hook of :func:`pipeline.modeling.forward_rewards` reads the same hidden state as without LoRA and recomputes the
  trained head in fp32. Every other backbone weight has ``requires_grad=False`` and is left out of the optimizer.
* Dropout: the pipeline trains in eval mode with every dropout at p = 0 (resume and ZeRO-stage equivalence are
  exact); LoRA's own dropout follows that rule, so ``lora.dropout`` must be 0 (the config check says so).
* Export (:func:`save_export`), from the full weights (ZeRO-3: the consolidated state, gathered on every rank):
  ``merged`` folds ``(alpha / r) B A`` into each adapted weight and writes the same plain transformers folder as
  a run without LoRA (no PEFT needed to score it); ``adapter`` writes PEFT's adapter folder, whose
  ``adapter_model.safetensors`` holds the LoRA weights *and* the trained score head (``modules_to_save``), plus the
  tokenizer and ``reward_config.json`` (``num_labels``, pad id, reward mean/std, head-input normalisation).
  :func:`load_adapter_export` reads it back (``AutoPeftModelForSequenceClassification``) and merges it.
* QLoRA (``lora.load_in_4bit``): the frozen backbone loads in 4-bit NF4 through bitsandbytes, which needs CUDA;
  :func:`qlora_problem` says so before anything starts on a machine without it.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline import modeling
from pipeline.config import LoraConfig

#: The adapter folder's own file with what the reward model's config adds to the base model's.
REWARD_CONFIG = "reward_config.json"
ADAPTER_CONFIG = "adapter_config.json"  # PEFT's: marks an adapter export

_DECODER_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: LoRA targets when ``lora.target_modules`` is empty: every attention and MLP projection (QLoRA's choice).
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": _DECODER_TARGETS, "mistral": _DECODER_TARGETS, "qwen2": _DECODER_TARGETS, "qwen3": _DECODER_TARGETS,
    "gemma": _DECODER_TARGETS, "gemma2": _DECODER_TARGETS,
    # BERT / MiniLM: attention query/key/value and every "dense" (attention output, intermediate, output, pooler)
    "bert": ("query", "key", "value", "dense"),
}


def enabled(cfg: LoraConfig) -> bool:
    return cfg.r > 0


def targets(cfg: LoraConfig, model: nn.Module) -> str | list[str]:
    """The configured targets, ``"all-linear"`` as PEFT spells it, or the architecture's default."""
    if tuple(cfg.target_modules) == ("all-linear",):
        return "all-linear"
    if cfg.target_modules:
        return list(cfg.target_modules)
    model_type = getattr(model.config, "model_type", "")
    if model_type not in DEFAULT_TARGETS:
        raise ValueError(f"lora.target_modules: no default for model type {model_type!r} (defaults: "
                         f"{', '.join(sorted(DEFAULT_TARGETS))}); set module names or ['all-linear']")
    return list(DEFAULT_TARGETS[model_type])


def qlora_problem(cfg: LoraConfig) -> str | None:
    """Why ``lora.load_in_4bit`` cannot run here (no CUDA device, or no bitsandbytes), or None."""
    if not cfg.load_in_4bit:
        return None
    if not torch.cuda.is_available():
        return ("lora.load_in_4bit=true (QLoRA) needs a CUDA GPU (bitsandbytes' 4-bit kernels); this machine has "
                "none: set lora.load_in_4bit=false, or run on a GPU node with train.use_gpu=true")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return "lora.load_in_4bit=true (QLoRA) needs the bitsandbytes package: pip install bitsandbytes"
    return None


def load_kwargs(cfg: LoraConfig) -> dict[str, Any]:
    """Extra ``from_pretrained`` arguments for the backbone: QLoRA's 4-bit NF4 quantisation (bf16 compute)."""
    if not cfg.load_in_4bit:
        return {}
    problem = qlora_problem(cfg)
    if problem:
        raise RuntimeError(problem)
    from transformers import BitsAndBytesConfig

    return {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                      bnb_4bit_use_double_quant=True,
                                                      bnb_4bit_compute_dtype=torch.bfloat16)}


def apply_lora(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """``model`` with LoRA adapters and a fully trained score head (``model`` itself when ``lora.r`` is 0)."""
    if not enabled(cfg):
        return model
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model, prepare_model_for_kbit_training

    head_name = _module_name(model, modeling.score_head(model))
    if cfg.load_in_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    peft_cfg = PeftLoraConfig(task_type="SEQ_CLS", r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                              target_modules=targets(cfg, model), modules_to_save=[head_name.rsplit(".", 1)[-1]])
    with warnings.catch_warnings():
        # PEFT asks transformers' deprecated property; a library's deprecation, nothing for the user to change
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        wrapped = get_peft_model(model, peft_cfg)
    if modeling.score_head(wrapped) is not trained_head(wrapped):
        raise RuntimeError("LoRA: the score head the reward hook finds is not the trained modules_to_save copy")
    return modeling.disable_dropout(wrapped)


def _module_name(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def trained_head(model: nn.Module) -> nn.Module:
    """The score head's trained copy inside PEFT's ``ModulesToSaveWrapper``."""
    from peft.utils import ModulesToSaveWrapper

    wrappers = [m for m in model.modules() if isinstance(m, ModulesToSaveWrapper)]
    if len(wrappers) != 1:
        raise RuntimeError(f"LoRA: expected one modules_to_save wrapper (the score head), found {len(wrappers)}")
    return wrappers[0].modules_to_save["default"]


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Trainable and total parameters (ZeRO-3 partitions counted at their full size)."""
    def size(p: torch.Tensor) -> int:
        return int(getattr(p, "ds_numel", p.numel()))

    params = list(model.parameters())
    return {"params/trainable": sum(size(p) for p in params if p.requires_grad),
            "params/total": sum(size(p) for p in params)}


def run_metrics(cfg: LoraConfig, model: nn.Module) -> dict[str, Any]:
    """What a run's metrics say about LoRA: r, alpha, the adapted modules and the parameter counts."""
    out: dict[str, Any] = {"lora/r": cfg.r, **parameter_counts(model)}
    if enabled(cfg):
        out["lora/alpha"] = cfg.alpha
        out["lora/adapted_modules"] = sum(1 for m in model.modules() if _is_lora_layer(m))
    return out


def _is_lora_layer(module: nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer

    return isinstance(module, LoraLayer)


# ------------------------------------------------------------------ export


def merged_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The plain transformers state dict of ``model`` (a PEFT LoRA model) with every adapter folded in.

    ``state`` is the PEFT model's full state dict (``model.state_dict()``, or ZeRO-3's consolidated one). Each
    adapted weight becomes ``W + scaling · B A`` (PEFT's ``get_delta_weight`` for ``nn.Linear``, computed in fp32
    and cast back), the head's trained copy replaces the frozen original, and PEFT's prefixes go."""
    layers = {name: module for name, module in model.named_modules() if _is_lora_layer(module)}
    for name, layer in layers.items():
        if not isinstance(layer.get_base_layer(), nn.Linear) or getattr(layer, "fan_in_fan_out", False):
            raise ValueError(f"LoRA merge: {name} is not a plain nn.Linear ({type(layer.get_base_layer()).__name__})")
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if ".lora_" in key or ".original_module." in key:
            continue
        owner = key.rsplit(".base_layer.", 1)[0] if ".base_layer." in key else None
        if owner is not None and owner in layers and key.endswith(".base_layer.weight"):
            layer = layers[owner]
            delta = (state[f"{owner}.lora_B.default.weight"].float() @ state[f"{owner}.lora_A.default.weight"].float())
            value = (value.float() + delta * layer.scaling["default"]).to(value.dtype)
        plain = key.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")
        out[plain.removeprefix("base_model.model.")] = value
    return out


def save_export(model: nn.Module, tokenizer: Any, folder: str | Path, cfg: LoraConfig, *,
                state: Mapping[str, torch.Tensor] | None, extra_config: Mapping[str, Any]) -> Path:
    """Write the run's model folder (rank 0 only): without LoRA, :func:`pipeline.modeling.save_reward_model`
    unchanged; with it, the ``merged`` or ``adapter`` export. ``state``: ZeRO-3's consolidated weights (None: the
    model's own, whole on every rank under ZeRO 0-2)."""
    if not enabled(cfg):
        return modeling.save_reward_model(model, tokenizer, folder, state_dict=state, extra_config=extra_config)
    full = dict(state) if state is not None else model.state_dict()
    if cfg.export == "merged":
        return modeling.save_reward_model(model.get_base_model(), tokenizer, folder,
                                          state_dict=merged_state_dict(model, full), extra_config=extra_config)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # PEFT picks the adapter and the modules_to_save head out of the full state dict
    model.save_pretrained(folder, state_dict=full, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    config = model.config
    reward = {"num_labels": 1, "pad_token_id": config.pad_token_id, **dict(extra_config)}
    if getattr(config, modeling.HEAD_INPUT_NORM, None):
        reward[modeling.HEAD_INPUT_NORM] = getattr(config, modeling.HEAD_INPUT_NORM)
    (folder / REWARD_CONFIG).write_text(json.dumps(reward, indent=1, default=float))
    return folder


def is_adapter_export(folder: str | Path) -> bool:
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def load_adapter_export(folder: str | Path, *, merge: bool = True) -> nn.Module:
    """An adapter export as a reward model: PEFT's ``AutoPeftModelForSequenceClassification`` (the base model from
    the adapter config, one label, the saved head), the reward config applied, in eval mode; ``merge`` folds the
    adapter in (a plain transformers model)."""
    from peft import AutoPeftModelForSequenceClassification

    reward = json.loads((Path(folder) / REWARD_CONFIG).read_text())
    model = AutoPeftModelForSequenceClassification.from_pretrained(
        str(folder), num_labels=1, pad_token_id=reward["pad_token_id"])
    for key, value in reward.items():
        setattr(model.config, key, value)
    if merge:
        model = model.merge_and_unload()
    return modeling.disable_dropout(model)
