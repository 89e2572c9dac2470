"""The reward-model contract: one forward, hidden = score-head input, export round trip."""

import pytest
import torch

from pipeline import modeling as M

pytestmark = pytest.mark.unit
CONV = [
    ([{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "2+2 is 4."}],
     [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 5, I think, maybe."}]),
    ([{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi!"}],
     [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "No."}]),
]


@pytest.fixture(scope="module", params=["tiny:llama", "tiny:bert", "embedded:minilm"])
def model_and_tok(request):
    tok = M.load_tokenizer(request.param)
    return request.param, M.build_reward_model(request.param, tok, seed=1), tok


def _batch(tok):
    chosen = [M.encode_messages(tok, c) for c, _ in CONV]
    rejected = [M.encode_messages(tok, r) for _, r in CONV]
    return M.collate_pairs(chosen, rejected, tok.pad_token_id)


def test_hidden_is_score_head_input(model_and_tok):
    """score(hidden) must reproduce the model's own (HF-pooled) reward, padding included."""
    _, model, tok = model_and_tok
    batch = _batch(tok)
    assert (batch["attention_mask"] == 0).any(), "the fixture must exercise padding"
    rc, rr, hc, hr = M.forward_pairs(model, batch)
    head = M.score_head(model)
    assert rc.shape == (2,) and hc.shape == (2, head.in_features)
    torch.testing.assert_close(head(torch.cat([hc, hr])).squeeze(-1), torch.cat([rc, rr]), rtol=1e-5, atol=1e-6)


def test_each_sequence_scores_the_same_alone_and_padded(model_and_tok):
    _, model, tok = model_and_tok
    batch = _batch(tok)
    rewards, _ = M.forward_rewards(model, batch["input_ids"], batch["attention_mask"])
    for i in range(batch["input_ids"].shape[0]):
        n = int(batch["attention_mask"][i].sum())
        alone, _ = M.forward_rewards(model, batch["input_ids"][i:i + 1, :n], batch["attention_mask"][i:i + 1, :n])
        torch.testing.assert_close(alone[0], rewards[i], rtol=1e-4, atol=1e-5)


def test_new_head_starts_near_zero_and_dropout_is_off(model_and_tok):
    _, model, _ = model_and_tok
    head = M.score_head(model)
    std = head.weight.std().item()
    assert std < 2.0 / (head.in_features + 1)
    assert head.bias is None or head.bias.abs().max().item() == 0.0
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))


def test_export_round_trip_scores_identically(model_and_tok, tmp_path):
    name, model, tok = model_and_tok
    batch = _batch(tok)
    with torch.no_grad():
        before, _ = M.forward_rewards(model.eval(), batch["input_ids"], batch["attention_mask"])
    folder = M.save_reward_model(model, tok, tmp_path / "rm", extra_config={"reward_mean": 0.25, "reward_std": 2.0})
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer_config.json").is_file()
    from transformers import AutoModelForSequenceClassification

    plain = AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
    assert plain.config.reward_mean == 0.25 and plain.config.num_labels == 1
    with torch.no_grad():
        after = plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)


def test_truncation_keeps_first_token_and_end():
    ids = list(range(10))
    assert M.truncate_ids(ids, 4, "left") == [0, 7, 8, 9]
    assert M.truncate_ids(ids, 4, "right") == [0, 1, 2, 3]
    assert M.truncate_ids(ids, 20) == ids


def test_plain_template_and_unknown_names():
    assert M.plain_template([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]) == \
        "User: a\n\nAssistant: b"
    with pytest.raises(ValueError, match="tiny:gpt9"):
        M.build_reward_model("tiny:gpt9", M.load_tokenizer("tiny:llama"))
    with pytest.raises(ValueError, match="embedded:minilm"):
        M.resolve_model_path("embedded:nope")


def test_tiny_causal_lm_generates():
    tok = M.load_tokenizer("tiny:llama")
    lm = M.build_causal_lm("tiny:llama", tok)
    ids = tok("hello", return_tensors="pt", return_token_type_ids=False)
    out = lm.generate(**ids, max_new_tokens=3, do_sample=True, pad_token_id=tok.pad_token_id)
    assert out.shape[1] == ids["input_ids"].shape[1] + 3
