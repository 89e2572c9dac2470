"""The one scoring code path: conversations -> reward, score-head input, token count.

Both evaluation stages (RewardBench, Best-of-N) score through this module, so a reward means the
same thing everywhere.

Input rows: a ``messages`` column (each a list of ``{"role", "content"}`` dicts) plus any other
columns (ids), which pass through unchanged. Output columns added:

* ``score``  float64: the reward ``r = w·h + b`` of the exported ``AutoModelForSequenceClassification``;
* ``hidden`` float32 vector ``[H]``: ``h``, the score head's input at the scored position
  (:func:`pipeline.modeling.forward_rewards`), the paper's final-layer representation;
* ``length`` int64: tokens actually scored, after truncation.

Each conversation is tokenised once with :func:`pipeline.modeling.encode_messages` (the model's chat
template, else the plain template; one BOS) and cut to ``max_length`` by
:func:`pipeline.modeling.truncate_ids` (``left`` keeps the first token and the conversation's end).
For encoders ``max_length`` is capped at the model's position limit, which they cannot exceed.

Padding is kept small at two levels; neither changes a score beyond float rounding, because each
sequence scores the same alone or right-padded under its attention mask:

1. driver: rows are sorted by an approximate length (characters of all contents, longest first)
   and cut into batches of ``batch_size``, so a batch holds similar lengths;
2. scorer: inside a batch, sequences are sorted by exact token count and split into the
   sub-batches of least estimated cost (padded tokens plus a fixed cost per forward, each
   sub-batch within a token budget, :func:`length_groups`); results are put back in input order.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from pipeline import modeling

#: Rough fixed cost of one forward in token-equivalents (Python, dispatch and launch overhead over
#: the cost of one token). Small on CPU, where time is per token and small forwards stay in cache
#: (16 measured 4-5% faster than 64 on RewardBench rows at 1 and 2 threads; a probe, not a recorded
#: benchmark); large on GPU, where a small forward leaves the device idle. It only decides how a batch is split.
FORWARD_OVERHEAD_TOKENS = {"cpu": 16, "cuda": 4096}
#: Most padded tokens in one forward (a single longer sequence still runs alone). On CPU a forward's
#: activations should stay near the caches: with MiniLM at 1 thread, 32 x 512-token forwards (16k
#: tokens) ran 15-30% slower per token than 2-4k-token ones (benchmarks/README.md). No cap on GPU,
#: where larger forwards only fill the device better (the batch size bounds them).
MAX_TOKENS_PER_FORWARD = {"cpu": 3072, "cuda": None}
OUTPUT_COLUMNS = ("score", "hidden", "length")
_ROW = "__scoring_row__"  # position of a row in the caller's input, to restore order
_NO_LIMIT = 1_000_000_000
# Encoders whose position ids start at padding_idx + 1 (transformers: create_position_ids_from_input_ids).
_OFFSET_POSITION_TYPES = {"roberta", "xlm-roberta", "camembert", "longformer", "xlm-roberta-xl", "data2vec-text"}


class RewardScorer:
    """Callable for Ray Data ``map_batches`` with an actor pool: the model loads once per actor.

    ``__call__`` takes a numpy batch ``{"messages": object array of conversations, ...}`` and returns
    the other columns unchanged plus ``score [N] float64``, ``hidden [N, H] float32`` and
    ``length [N] int64``, in the batch's row order.
    """

    def __init__(self, model_path: str, *, max_length: int = 2048, truncation_side: str = "left",
                 use_gpu: bool = False) -> None:
        if truncation_side not in ("left", "right"):
            raise ValueError(f"truncation_side must be 'left' or 'right', got {truncation_side!r}")
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        self.device = torch.device("cuda" if use_gpu else "cpu")
        # bf16 on GPU halves memory and uses tensor cores; on CPU keep fp32, the precision we train in there.
        dtype = torch.bfloat16 if use_gpu else torch.float32
        model, tokenizer = modeling.load_exported(modeling.resolve_model_path(model_path), dtype=dtype)
        if model.config.pad_token_id is None:  # decoders pool at the last non-pad token: needs a pad id
            model.config.pad_token_id = tokenizer.pad_token_id
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.pad_id = int(model.config.pad_token_id)
        self.hidden_size = modeling.score_head(model).in_features
        self.max_length = usable_length(model, tokenizer, max_length)
        self.truncation_side = truncation_side
        self.overhead_tokens = FORWARD_OVERHEAD_TOKENS[self.device.type]
        self.max_tokens = MAX_TOKENS_PER_FORWARD[self.device.type]
        # We truncate ids ourselves (keeping the end): silence the tokenizer's "longer than the
        # maximum length ... indexing errors" warning, which is false here.
        tokenizer.model_max_length = _NO_LIMIT

    def encode(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """Token ids of one conversation, truncated to ``max_length``."""
        ids = modeling.encode_messages(self.tokenizer, messages)
        return modeling.truncate_ids(ids, self.max_length, self.truncation_side)

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        ids = [self.encode(as_messages(m)) for m in batch["messages"]]
        lengths = np.array([len(x) for x in ids], dtype=np.int64)
        scores = np.zeros(len(ids), dtype=np.float64)
        hidden = np.zeros((len(ids), self.hidden_size), dtype=np.float32)
        for group in length_groups(lengths, self.overhead_tokens, self.max_tokens):
            scores[group], hidden[group] = self._forward([ids[i] for i in group])
        # ``messages`` is consumed: callers keep their rows, and sending every conversation back
        # through Arrow would cost more than scoring a small model (Ray pickles it as objects).
        passthrough = {k: v for k, v in batch.items() if k != "messages"}
        return {**passthrough, "score": scores, "hidden": hidden, "length": lengths}

    def _forward(self, sequences: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        input_ids, mask = modeling.pad_batch(sequences, self.pad_id)
        with torch.inference_mode():
            rewards, hidden = modeling.forward_rewards(self.model, input_ids.to(self.device),
                                                       mask.to(self.device))
        return rewards.double().cpu().numpy(), hidden.float().cpu().numpy()


def usable_length(model: torch.nn.Module, tokenizer: Any, max_length: int) -> int:
    """``max_length``, capped for encoders at ``min(max_position_embeddings, tokenizer.model_max_length)``.

    Encoders have learned absolute positions and fail past them; decoders are left alone (RoPE
    models extrapolate, and their tokenizers often carry a sentinel ``model_max_length``).
    """
    if not modeling.is_encoder(model):
        return max_length
    positions = getattr(model.config, "max_position_embeddings", None)
    if isinstance(positions, int) and model.config.model_type in _OFFSET_POSITION_TYPES:
        # RoBERTa-family position ids start after the padding index (514 positions hold 512 tokens)
        positions -= int(model.config.pad_token_id or 0) + 1
    limits = [positions, getattr(tokenizer, "model_max_length", None)]
    return min([max_length, *(int(x) for x in limits if isinstance(x, int) and 0 < x < 1_000_000)])


def as_messages(conversation: Iterable[Mapping[str, Any]]) -> list[dict[str, str]]:
    """One conversation as plain dicts (Ray hands lists or numpy object arrays of dicts)."""
    try:
        return [{"role": str(m["role"]), "content": str(m["content"])} for m in conversation]
    except (KeyError, TypeError):
        raise ValueError(f"each message needs 'role' and 'content'; got {conversation!r:.200}") from None


def length_groups(lengths: np.ndarray, overhead_tokens: float, max_tokens: int | None = None
                  ) -> list[np.ndarray]:
    """Split one batch into sub-batches (index arrays, longest first) of least estimated cost

        cost = sum over sub-batches g of ( |g| * max_{i in g} len_i  +  overhead_tokens ),

    i.e. padded tokens plus a fixed cost per forward, subject to ``|g| * max_{i in g} len_i <=
    max_tokens`` for every sub-batch of two or more (``None``: no limit). With lengths sorted in
    decreasing order ``l_0 >= l_1 >= ...`` an optimal split uses contiguous runs (exchange argument:
    it never raises a run's maximum or size), found by
    ``best[j] = min_{i<j, allowed} best[i] + (j - i) * l_i + overhead_tokens``: O(n^2) for a batch of n.
    """
    order = np.argsort(-np.asarray(lengths), kind="stable")
    ordered = np.asarray(lengths, dtype=np.float64)[order]
    best = np.zeros(len(order) + 1)
    start = np.zeros(len(order) + 1, dtype=np.int64)
    for j in range(1, len(order) + 1):
        padded = (j - np.arange(j)) * ordered[:j]
        cost = best[:j] + padded + overhead_tokens
        if max_tokens is not None:
            cost[:j - 1][padded[:j - 1] > max_tokens] = np.inf  # a run of one is always allowed
        start[j] = int(np.argmin(cost))
        best[j] = cost[start[j]]
    groups: list[np.ndarray] = []
    j = len(order)
    while j > 0:
        groups.append(order[start[j]:j])
        j = start[j]
    return groups[::-1]


# ------------------------------------------------------------------ driver side


def approx_length(messages: Iterable[Mapping[str, Any]]) -> int:
    """Characters of all contents: a free proxy of the token count, for the global sort."""
    return sum(len(str(m["content"])) for m in messages)


def _as_frame(rows: Sequence[Mapping[str, Any]] | pd.DataFrame) -> pd.DataFrame:
    frame = rows.copy() if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    if len(frame) and "messages" not in frame.columns:
        raise ValueError(f"rows need a 'messages' column; got columns {list(frame.columns)}")
    clash = [c for c in (*OUTPUT_COLUMNS, _ROW) if c in frame.columns]
    if clash:
        raise ValueError(f"input columns {clash} would be overwritten by the scorer's outputs")
    return frame


def approx_lengths(frame: pd.DataFrame) -> np.ndarray:
    """:func:`approx_length` of every row's ``messages``, as int64."""
    return np.array([approx_length(m) for m in frame["messages"]], dtype=np.int64)


def length_sorted_batches(frame: pd.DataFrame, batch_size: int) -> list[np.ndarray]:
    """Row positions, longest (by :func:`approx_length`) first, cut into chunks of ``batch_size``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = np.argsort(-approx_lengths(frame), kind="stable")
    return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]


def _object_array(values: Sequence[Any]) -> np.ndarray:
    out = np.empty(len(values), dtype=object)  # element-wise: numpy would otherwise nest the lists
    for i, value in enumerate(values):
        out[i] = value
    return out


def _attach(frame: pd.DataFrame, positions: np.ndarray, scores: np.ndarray, hidden: Sequence[np.ndarray],
            lengths: np.ndarray) -> pd.DataFrame:
    """The input rows (index and columns untouched) plus the outputs, put back in input order."""
    positions = np.asarray(positions, dtype=np.int64)
    if len(positions) != len(frame) or not np.array_equal(np.sort(positions), np.arange(len(frame))):
        raise RuntimeError(f"scoring returned {len(positions)} rows for {len(frame)} inputs "
                           "(lost or duplicated)")
    back = np.argsort(positions)
    result = frame.copy()
    result["score"] = np.asarray(scores, dtype=np.float64)[back]
    result["hidden"] = _object_array([np.asarray(hidden[i], dtype=np.float32) for i in back])
    result["length"] = np.asarray(lengths, dtype=np.int64)[back]
    return result


def _empty_result(frame: pd.DataFrame) -> pd.DataFrame:
    return _attach(frame, np.zeros(0, dtype=np.int64), np.zeros(0), [], np.zeros(0, dtype=np.int64))


def score_locally(rows: Sequence[Mapping[str, Any]] | pd.DataFrame, model_path: str, *,
                  max_length: int = 2048, truncation_side: str = "left", batch_size: int = 32,
                  num_actors: int = 1, cpus_per_actor: float = 1.0, use_gpu: bool = False) -> pd.DataFrame:
    """:func:`score_conversations` in this process, without Ray: one scorer, the same batches.

    Takes the same arguments; the placement ones (``num_actors``, ``cpus_per_actor``) have no
    effect here, so callers can switch between the two functions freely.
    """
    del num_actors, cpus_per_actor  # placement only means something to Ray
    frame = _as_frame(rows)
    if frame.empty:
        return _empty_result(frame)
    scorer = RewardScorer(model_path, max_length=max_length, truncation_side=truncation_side,
                          use_gpu=use_gpu)
    messages = frame["messages"].tolist()
    positions, scores, hidden, lengths = [], [], [], []
    for chunk in length_sorted_batches(frame, batch_size):
        out = scorer({_ROW: chunk, "messages": _object_array([messages[i] for i in chunk])})
        positions.append(out[_ROW])
        scores.append(out["score"])
        hidden.extend(out["hidden"])
        lengths.append(out["length"])
    return _attach(frame, np.concatenate(positions), np.concatenate(scores), hidden, np.concatenate(lengths))


def _blocks(frame: pd.DataFrame, batch_size: int, num_actors: int) -> list[pa.Table]:
    """Arrow blocks of whole length-sorted batches, longest first, each about ``1 / (2 * num_actors)``
    of the work still left (guided self-scheduling; work = padded characters).

    Ray Data hands blocks to whichever actor is free, so a run ends when its last block does. Shrinking
    blocks send the long batches out first in large blocks and leave a tail of single short batches:
    the actors finish within about one short batch of each other, where equal blocks can leave one
    actor idle for a whole block at the end. Every block except the one ending with the last (short)
    batch is a multiple of ``batch_size`` rows, so ``map_batches`` cuts exactly the driver's batches.
    """
    batches = length_sorted_batches(frame, batch_size)
    approx = approx_lengths(frame)
    costs = np.array([len(b) * approx[b].max() for b in batches], dtype=np.float64)
    messages = [as_messages(m) for m in frame["messages"]]
    blocks, start, left = [], 0, costs.sum()
    while start < len(batches):
        stop, taken = start + 1, costs[start]
        while stop < len(batches) and taken + costs[stop] <= left / (2 * num_actors):
            taken += costs[stop]
            stop += 1
        rows = np.concatenate(batches[start:stop])
        blocks.append(pa.table({_ROW: rows, "messages": [messages[i] for i in rows]}))
        start, left = stop, left - taken
    return blocks


def score_conversations(rows: Sequence[Mapping[str, Any]] | pd.DataFrame, model_path: str, *,
                        max_length: int = 2048, truncation_side: str = "left", batch_size: int = 32,
                        num_actors: int = 1, cpus_per_actor: float = 1.0,
                        use_gpu: bool = False) -> pd.DataFrame:
    """Score every row's ``messages`` with a Ray Data actor pool; the input rows plus ``score``,
    ``hidden`` and ``length``, in input order (index kept).

    Ray must already be initialised (stages call :func:`pipeline.raycluster.ensure_ray`). Each of
    ``num_actors`` actors holds one model copy and reserves ``cpus_per_actor`` CPUs (plus one GPU
    when ``use_gpu``); on a 2-core machine keep ``cpus_per_actor <= 1`` so other work is not starved.
    Only the row position and ``messages`` travel through Ray; the other columns stay on the driver.
    Each message must have ``role`` and ``content``.
    """
    import ray

    if not ray.is_initialized():
        raise RuntimeError("Ray is not initialised: call pipeline.raycluster.ensure_ray(cfg) before scoring")
    frame = _as_frame(rows)
    if frame.empty:
        return _empty_result(frame)
    blocks = _blocks(frame, batch_size, num_actors)
    resources: dict[str, float] = {"num_cpus": cpus_per_actor}
    if use_gpu:
        resources["num_gpus"] = 1
    scored = ray.data.from_arrow(blocks).map_batches(
        RewardScorer,
        fn_constructor_kwargs={"model_path": model_path, "max_length": max_length,
                               "truncation_side": truncation_side, "use_gpu": use_gpu},
        compute=ray.data.ActorPoolStrategy(size=max(1, min(num_actors, len(blocks)))),  # no idle model copies
        batch_size=batch_size,
        batch_format="numpy",
        **resources,
    )
    # The scorer returns only the row position and the outputs. No select_columns: it would be a
    # separate CPU task that waits until the actors free their CPUs, holding back every output to the end.
    out = scored.to_pandas()
    return _attach(frame, out[_ROW].to_numpy(dtype=np.int64), out["score"].to_numpy(dtype=np.float64),
                   list(out["hidden"]), out["length"].to_numpy(dtype=np.int64))
