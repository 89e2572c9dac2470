"""The scoring path without Ray: batching and sorting are invisible, truncation keeps the end."""

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline import modeling as M
from pipeline import scoring

pytestmark = pytest.mark.unit


def _conv(user: str, assistant: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


# Lengths vary a lot and are not in order, so both the global sort and the in-batch split reorder.
ROWS = [{"id": f"r{i}", "messages": _conv(f"Question {i}: " + "why? " * (i * 7 % 23),
                                          "Because. " * (i * 5 % 17 + 1))}
        for i in range(13)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tok = M.load_tokenizer("tiny:llama")
    folder = M.save_reward_model(M.build_reward_model("tiny:llama", tok, seed=3), tok,
                                 tmp_path_factory.mktemp("scoring") / "tiny-llama")
    model, loaded_tok = M.load_exported(folder)
    return str(folder), model, loaded_tok


def _alone(model, tok, messages, max_length=2048, side="left"):
    """Reference: one conversation, no padding, no batching."""
    ids = M.truncate_ids(M.encode_messages(tok, messages), max_length, side)
    x = torch.tensor([ids])
    with torch.inference_mode():
        reward, hidden = M.forward_rewards(model, x, torch.ones_like(x))
    return float(reward[0]), hidden[0].numpy(), len(ids)


def test_batched_sorted_scores_equal_each_conversation_alone(tiny):
    folder, model, tok = tiny
    out = scoring.score_locally(ROWS, folder, batch_size=4)
    assert list(out["id"]) == [r["id"] for r in ROWS], "input order restored"
    assert out["score"].dtype == np.float64 and out["length"].dtype == np.int64
    assert len(set(out["length"])) > 5, "the fixture must exercise padding"
    for row, score, hidden, length in zip(ROWS, out["score"], out["hidden"], out["length"]):
        ref_score, ref_hidden, ref_length = _alone(model, tok, row["messages"])
        assert length == ref_length
        assert hidden.dtype == np.float32 and hidden.shape == ref_hidden.shape
        np.testing.assert_allclose(score, ref_score, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(hidden, ref_hidden, rtol=1e-4, atol=1e-5)


def test_batch_size_does_not_change_scores_and_index_is_kept(tiny):
    folder, _, _ = tiny
    frame = pd.DataFrame(ROWS, index=[100 + i for i in range(len(ROWS))])
    one = scoring.score_locally(frame, folder, batch_size=1)
    many = scoring.score_locally(frame, folder, batch_size=64)
    assert list(one.index) == list(frame.index) == list(many.index)
    np.testing.assert_allclose(one["score"], many["score"], rtol=1e-4, atol=1e-5)


def test_left_truncation_keeps_first_token_and_the_end(tiny):
    folder, model, tok = tiny
    long = _conv("Tell me everything. " * 30, "The answer is forty-two, final.")
    full = M.encode_messages(tok, long)
    out = scoring.score_locally([{"messages": long}], folder, max_length=16)
    assert out["length"].iloc[0] == 16 < len(full)
    scorer = scoring.RewardScorer(folder, max_length=16)
    kept = scorer.encode(long)
    assert kept[0] == full[0] and kept[1:] == full[-15:], "left truncation keeps BOS/CLS and the response end"
    ref_score, _, _ = _alone(model, tok, long, max_length=16, side="left")
    np.testing.assert_allclose(out["score"].iloc[0], ref_score, rtol=1e-4, atol=1e-5)
    right = scoring.score_locally([{"messages": long}], folder, max_length=16, truncation_side="right")
    assert right["score"].iloc[0] != pytest.approx(ref_score), "right truncation scores the prompt start"


def _partitions(items):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in _partitions(rest):
        yield [[first], *part]
        for k in range(len(part)):
            yield [*part[:k], [first, *part[k]], *part[k + 1:]]


def _cost(lengths, groups, overhead):
    return sum(len(g) * max(lengths[i] for i in g) + overhead for g in groups)


@pytest.mark.parametrize("max_tokens", [None, 250, 100])
@pytest.mark.parametrize("overhead", [0, 8, 30, 1000])
def test_length_groups_find_the_cheapest_split(overhead, max_tokens):
    lengths = np.array([5, 100, 80, 7, 60, 99, 6, 45])
    groups = scoring.length_groups(lengths, overhead, max_tokens)
    assert sorted(np.concatenate(groups).tolist()) == list(range(len(lengths)))

    def allowed(group):
        return max_tokens is None or len(group) == 1 or len(group) * max(lengths[i] for i in group) <= max_tokens

    splits = [p for p in _partitions(list(range(len(lengths)))) if all(allowed(g) for g in p)]  # of 4140
    assert all(allowed(g) for g in groups)
    assert _cost(lengths, groups, overhead) == min(_cost(lengths, p, overhead) for p in splits)
    if overhead == 1000 and max_tokens is None:
        assert len(groups) == 1, "a costly forward is never split off"
    if max_tokens == 100:
        assert [len(g) for g in groups[:3]] == [1, 1, 1], "100, 99 and 80 run alone under the cap"


def test_encoder_length_is_capped_at_its_positions(tmp_path):
    tok = M.load_tokenizer("tiny:bert")
    folder = M.save_reward_model(M.build_reward_model("tiny:bert", tok), tok, tmp_path / "tiny-bert")
    assert scoring.RewardScorer(str(folder), max_length=4096).max_length == 512  # tokenizer's limit


def test_bad_inputs_and_empty_input(tiny, monkeypatch):
    folder, _, _ = tiny
    with pytest.raises(ValueError, match="'messages' column"):
        scoring.score_locally([{"text": "x"}], folder)
    with pytest.raises(ValueError, match="overwritten"):
        scoring.score_locally([{"messages": ROWS[0]["messages"], "score": 1.0}], folder)
    empty = scoring.score_locally(pd.DataFrame({"messages": [], "id": []}), folder)
    assert empty.empty and {"score", "hidden", "length"} <= set(empty.columns)
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    with pytest.raises(RuntimeError, match="ensure_ray"):
        scoring.score_conversations(ROWS, folder)


@pytest.mark.parametrize("num_actors", [1, 2, 4])
def test_blocks_cover_each_row_once_in_whole_batches_and_shrink(num_actors):
    rng = np.random.default_rng(num_actors)
    frame = pd.DataFrame({"messages": [_conv("q", "x" * int(n)) for n in rng.integers(1, 3000, size=803)]})
    blocks = scoring._blocks(frame, batch_size=8, num_actors=num_actors)
    rows = np.concatenate([b.column(scoring._ROW).to_numpy() for b in blocks])
    assert sorted(rows.tolist()) == list(range(len(frame)))
    order = np.concatenate(scoring.length_sorted_batches(frame, 8))
    assert rows.tolist() == order.tolist(), "blocks keep the longest-first batch order"
    assert all(b.num_rows % 8 == 0 for b in blocks[:-1]) and blocks[-1].num_rows == 803 % 8
    approx = scoring.approx_lengths(frame)
    work = [len(r) * approx[r].max() for r in (b.column(scoring._ROW).to_numpy() for b in blocks)]
    assert work[0] <= sum(work) / (2 * num_actors) + 8 * approx.max(), "first block: about 1/(2k) of the work"
    assert blocks[-1].num_rows <= 8 and blocks[-2].num_rows == 8, "the tail is single batches"
    assert len(blocks) < len(order) / 8, "fewer blocks than batches: each block costs Ray Data a task"
