"""The registered reward model's code: MLflow "models from code" (no pickle), logged by the register stage.

``predict`` takes a DataFrame with string columns ``prompt`` and ``response`` (or one column ``text``: conversations
already rendered with the model's chat template, as RL trainers send them) and returns a DataFrame with one float
column ``reward``: the exported ``AutoModelForSequenceClassification``'s score of the conversation
``[user: prompt, assistant: response]``, rendered with the model's chat template at its fixed template date
(plain ``User: ... / Assistant: ...`` template when it has none), cut to ``max_length`` tokens (at most what the
model's positions hold) keeping the first token and the end, the backbone in fp32 on CPU and the score head applied
in fp32: exactly as training and the RewardBench stage score. A ``text`` is encoded by the rule of
``pipeline.modeling.encode_text`` (no second BOS; the template's after-turn whitespace restored after a stop token).

``mlflow.pyfunc.load_model`` executes this file in a fresh module, so its MODULE-LEVEL IMPORTS ARE LIMITED TO
the standard library, numpy, pandas, torch and mlflow (transformers inside functions): a loaded model never
needs this project. The few lines that mirror ``pipeline.modeling`` (rendering, truncation, the fp32 head) are
tested equal to it.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

INPUT_COLUMNS = ("prompt", "response")
TEMPLATE_DATE = "2024-07-26"  # pipeline.modeling.TEMPLATE_DATE, when the tokenizer's config has none
_ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}
_NO_LIMIT = 1_000_000_000
# pipeline.modeling's encoders, and the ones whose positions start after the padding index (pipeline.scoring)
_ENCODER_TYPES = {"bert", "roberta", "xlm-roberta", "distilbert", "deberta", "deberta-v2", "electra",
                  "albert", "mpnet", "camembert", "modernbert"}
_OFFSET_POSITION_TYPES = {"roberta", "xlm-roberta", "camembert", "longformer", "xlm-roberta-xl", "data2vec-text"}


def render_ids(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """Token ids of a conversation: the chat template when the tokenizer has one (one BOS, the calendar pinned to
    the tokenizer's ``template_date``), else the plain role-tagged template. Mirrors
    ``pipeline.modeling.encode_messages`` (tested equal)."""
    if getattr(tokenizer, "chat_template", None):
        from transformers.utils import chat_template_utils

        day = _dt.date.fromisoformat((tokenizer.init_kwargs or {}).get("template_date") or TEMPLATE_DATE)
        moment = _dt.datetime(day.year, day.month, day.day)
        real = chat_template_utils.datetime  # templates may call strftime_now (the clock) unconditionally
        chat_template_utils.datetime = type("PinnedClock", (_dt.datetime,), {"now": staticmethod(lambda tz=None: moment)})
        try:
            ids = tokenizer.apply_chat_template(list(messages), tokenize=True, add_generation_prompt=False,
                                                return_dict=False, date_string=moment.strftime("%d %b %Y"))
        finally:
            chat_template_utils.datetime = real
        return list(ids["input_ids"] if isinstance(ids, Mapping) else ids)
    text = "\n\n".join(f"{_ROLE_NAMES.get(m['role'], m['role'].title())}: {m['content']}" for m in messages)
    return list(tokenizer(text, add_special_tokens=True, return_token_type_ids=False)["input_ids"])


def text_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a rendered conversation, as training encodes the conversation. Mirrors
    ``pipeline.modeling.encode_text`` (tested equal): tokenised without added special tokens, then the BOS (or
    the tokenizer's own prefix/suffix) added when absent, and the template's whitespace after its last special
    token added when the text stops at that token."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not getattr(tokenizer, "chat_template", None):
        framed = tokenizer("x", add_special_tokens=True)["input_ids"]
        bare = tokenizer("x", add_special_tokens=False)["input_ids"]
        start = next(i for i in range(len(framed)) if framed[i: i + len(bare)] == bare)
        prefix, suffix = framed[:start], framed[start + len(bare):]
        ids = ids if not prefix or ids[: len(prefix)] == prefix else prefix + ids
        return ids if not suffix or ids[-len(suffix):] == suffix else ids + suffix
    probe = render_ids(tokenizer, [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}])
    bos = tokenizer.bos_token_id
    if bos is not None and probe[:1] == [bos] and ids[:1] != [bos]:
        ids = [bos] + ids
    special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special} | set(tokenizer.all_special_ids)
    last = max((i for i, t in enumerate(probe) if t in special), default=0)
    after = probe[last + 1:]
    if last and after and not tokenizer.decode(after).strip() and ids and ids[-1] == probe[last]:
        ids = ids + after
    return ids


def usable_length(model: Any, tokenizer: Any, max_length: int) -> int:
    """``max_length`` capped, for encoders, at the positions the model holds and the tokenizer's own limit.
    Mirrors ``pipeline.scoring.usable_length`` (tested equal)."""
    if getattr(model.config, "model_type", "") not in _ENCODER_TYPES:
        return max_length
    positions = getattr(model.config, "max_position_embeddings", None)
    if isinstance(positions, int) and model.config.model_type in _OFFSET_POSITION_TYPES:
        positions -= int(model.config.pad_token_id or 0) + 1
    limits = [positions, getattr(tokenizer, "model_max_length", None)]
    return min([max_length, *(int(x) for x in limits if isinstance(x, int) and 0 < x < _NO_LIMIT)])


def cut_ids(ids: list[int], max_length: int, side: str = "left") -> list[int]:
    """``left`` keeps the first token (BOS/CLS) and the conversation's end (the scored token); ``right``
    keeps the start. Mirrors ``pipeline.modeling.truncate_ids``."""
    if len(ids) <= max_length:
        return ids
    return ids[:1] + ids[len(ids) - (max_length - 1):] if side == "left" else ids[:max_length]


class PairScorer:
    """Reward of ``(prompt, response)`` pairs with a ``save_pretrained`` reward-model folder (plain transformers)."""

    def __init__(self, model: Any, tokenizer: Any, *, max_length: int = 2048, truncation_side: str = "left",
                 batch_size: int = 16) -> None:
        if truncation_side not in ("left", "right"):
            raise ValueError(f"truncation_side must be 'left' or 'right', got {truncation_side!r}")
        if max_length < 2 or batch_size < 1:
            raise ValueError(f"need max_length >= 2 and batch_size >= 1, got {max_length}, {batch_size}")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
        if model.config.pad_token_id is None:  # decoders score the last non-pad token: they need a pad id
            model.config.pad_token_id = tokenizer.pad_token_id
        # the cap reads the tokenizer's own model_max_length: before it is lifted
        self.max_length = usable_length(model, tokenizer, max_length)
        tokenizer.model_max_length = _NO_LIMIT  # we cut ids ourselves; silence the over-length warning
        self.model, self.tokenizer = model.eval(), tokenizer
        self.device = next(model.parameters()).device
        self.truncation_side, self.batch_size = truncation_side, batch_size

    @classmethod
    def load(cls, folder: str | Path, *, device: str = "auto", **options: Any) -> PairScorer:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        # fp32 on CPU whatever dtype the export was saved in, as the RewardBench stage scores there
        dtype = torch.float32 if device == "cpu" else "auto"
        model = AutoModelForSequenceClassification.from_pretrained(str(folder), dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        return cls(model.to(device), tokenizer, **options)

    def encode(self, prompt: str, response: str) -> list[int]:
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        return cut_ids(render_ids(self.tokenizer, messages), self.max_length, self.truncation_side)

    def rewards(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        """float64 rewards in input order; batches of similar length, right-padded under the attention mask."""
        return self.rewards_of_ids([self.encode(p, r) for p, r in zip(prompts, responses, strict=True)])

    def text_rewards(self, texts: Sequence[str]) -> np.ndarray:
        """Rewards of rendered conversations (:func:`text_ids`)."""
        return self.rewards_of_ids([cut_ids(text_ids(self.tokenizer, t), self.max_length, self.truncation_side)
                                    for t in texts])

    def rewards_of_ids(self, ids: Sequence[list[int]]) -> np.ndarray:
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        out = np.zeros(len(ids), dtype=np.float64)
        pad = int(self.model.config.pad_token_id)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start: start + self.batch_size]
            width = max(len(ids[i]) for i in chunk)
            input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):
                input_ids[row, : len(ids[i])] = torch.as_tensor(ids[i], dtype=torch.long)
                mask[row, : len(ids[i])] = 1
            with torch.inference_mode(), _head_in_fp32(self.model):
                logits = self.model(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device)).logits
            out[chunk] = logits[:, 0].double().cpu().numpy()
        return out

    def score_frame(self, frame: Any) -> pd.DataFrame:
        """``prompt``/``response`` rows (DataFrame, dict of columns or list of row dicts) → DataFrame ``reward``."""
        frame = frame if isinstance(frame, pd.DataFrame) else pd.DataFrame(frame)
        if "text" in frame.columns and not set(INPUT_COLUMNS) & set(frame.columns):
            if frame["text"].isna().any():
                raise ValueError("reward model input has empty text values")
            return pd.DataFrame({"reward": self.text_rewards([str(t) for t in frame["text"]])}, index=frame.index)
        missing = [c for c in INPUT_COLUMNS if c not in frame.columns]
        if missing:
            raise ValueError(f"reward model input needs columns {list(INPUT_COLUMNS)} (or 'text'); missing {missing} "
                             f"(got {list(frame.columns)})")
        if frame[list(INPUT_COLUMNS)].isna().any().any():
            raise ValueError("reward model input has empty prompt/response values")
        rewards = self.rewards([str(p) for p in frame["prompt"]], [str(r) for r in frame["response"]])
        return pd.DataFrame({"reward": rewards}, index=frame.index)


class _head_in_fp32:  # noqa: N801 - used as a context manager, like torch.inference_mode
    """The score head (last linear layer with ``num_labels`` outputs) recomputed in fp32 while inside: a bf16 or
    fp16 model would otherwise round rewards to the dtype's spacing (2^-6 near |r| = 3 in bf16) and tie close
    pairs. Mirrors ``pipeline.modeling.forward_rewards``, including its head-input LayerNorm (no affine, eps
    1e-5) when the model's config says ``score_head_input_norm: layernorm`` (the LayerNorm baseline's models)."""

    def __init__(self, model: torch.nn.Module) -> None:
        heads = [m for m in model.modules()
                 if isinstance(m, torch.nn.Linear) and m.out_features == model.config.num_labels]
        self.head = heads[-1]
        self.normalise = getattr(model.config, "score_head_input_norm", None) == "layernorm"

    def __enter__(self) -> None:
        def fp32(module: torch.nn.Module, args: tuple, _output: torch.Tensor) -> torch.Tensor:
            bias = None if module.bias is None else module.bias.float()
            h = args[0].float()
            if self.normalise:
                h = F.layer_norm(h, h.shape[-1:], eps=1e-5)
            return F.linear(h, module.weight.float(), bias)

        self.handle = self.head.register_forward_hook(fp32, prepend=True)

    def __exit__(self, *exc: Any) -> None:
        self.handle.remove()


class RewardPyfunc(mlflow.pyfunc.PythonModel):
    """The pyfunc wrapper MLflow requires (its API is a base class); all the work is in :class:`PairScorer`.

    ``model_config`` keys: ``max_length``, ``truncation_side``, ``batch_size``, ``device`` (``auto``)."""

    def load_context(self, context: Any) -> None:
        options = dict(context.model_config or {})
        self.scorer = PairScorer.load(context.artifacts["model"], **options)

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        return self.scorer.score_frame(model_input)


if __name__ not in ("pipeline.pyfunc_model", "__main__"):
    # Executed by MLflow as the model's code (mlflow.pyfunc.log_model / load_model): hand it the model.
    mlflow.models.set_model(RewardPyfunc())
