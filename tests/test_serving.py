"""The endpoint's core without Ray or HTTP: request validation and rewards equal to plain transformers'."""

from __future__ import annotations

import pytest
import torch

from pipeline import modeling
from pipeline.serving import BadRequest, RewardService, conversations_of, texts_of

pytestmark = pytest.mark.unit
LIMITS = {"max_texts": 4, "max_chars": 50}


@pytest.mark.parametrize("body, status, message", [
    ([1, 2], 422, "must be a JSON object"), ({"qury": ["a"]}, 422, "'query' is missing \\(the body has: qury\\)"),
    ({"query": {"a": 1}}, 422, "must be a list of strings"), ({"query": [1]}, 422, "'query\\[0\\]' must be a string"),
    ({"query": ["ok", "  "]}, 422, "'query\\[1\\]' is empty"), ({"query": ["a"] * 5}, 413, "at most 4"),
    ({"query": ["x" * 51]}, 413, "at most 50")])
def test_get_reward_bodies_are_checked_naming_the_field(body, status, message):
    with pytest.raises(BadRequest, match=message) as err:
        texts_of(body, LIMITS)
    assert err.value.status == status


def test_an_empty_query_asks_for_no_rewards():
    """OpenRLHF sends ``{"query": []}`` to every server past the first when a step has fewer samples than servers."""
    assert texts_of({"query": [], "prompts": [], "labels": []}, LIMITS) == []
    assert texts_of({"model": "m", "messages": ["a"]}, LIMITS, "messages") == ["a"]


def test_score_bodies_prompt_response_or_messages():
    assert conversations_of({"prompt": "q", "response": "a"}, LIMITS) == [
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]]
    assert len(conversations_of({"prompt": ["q", "r"], "response": ["a", "b"]}, LIMITS)) == 2
    one = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert conversations_of({"messages": one}, LIMITS) == [one]
    assert conversations_of({"messages": [one, one]}, LIMITS) == [one, one]
    for body, message in (({"prompt": ["q"], "response": "a"}, "equal length"),
                          ({"messages": [{"role": "tool", "content": "x"}]}, "role system, user or assistant"),
                          ({"messages": [{"role": "user", "content": ""}]}, "content' is empty")):
        with pytest.raises(BadRequest, match=message):
            conversations_of(body, LIMITS)


def test_service_rewards_equal_plain_transformers_and_truncation_is_flagged(tmp_path):
    tok = modeling.load_tokenizer("tiny:llama")
    folder = modeling.save_reward_model(modeling.build_reward_model("tiny:llama", tok, seed=2), tok, tmp_path / "rm",
                                        extra_config={"reward_mean": 0.5, "reward_std": 2.0})
    service = RewardService(str(folder), max_length=16, truncation_side="left")
    texts = ["short one", "a somewhat longer text with a few more words in it", "mid length text here"]
    encoded = service.encode_texts(texts)
    rewards = service.rewards([ids for ids, _ in encoded])
    model, plain_tok = modeling.load_exported(folder)
    for text, reward, (_, truncated) in zip(texts, rewards, encoded, strict=True):
        ids = plain_tok(text, return_token_type_ids=False)["input_ids"]
        assert truncated == (len(ids) > 16)
        if not truncated:
            with torch.no_grad():
                expected = model(input_ids=torch.tensor([ids])).logits[0, 0].item()
            assert reward == pytest.approx(expected, abs=1e-5)
    assert service.normalised([2.5]) == [1.0]
