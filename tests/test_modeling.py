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


# ---------------------------------------------------------------- fp32 rewards, dropout, the template's calendar


def test_bf16_model_rewards_are_fp32_and_close_pairs_no_longer_tie():
    """In bf16 the reward spacing near |r| = 3 is 2^-6: the model's own bf16 logits tie close pairs; the head
    applied in fp32 (forward_rewards) separates them."""
    tok = M.load_tokenizer("tiny:bert")
    model = M.build_reward_model("tiny:bert", tok, seed=3).to(torch.bfloat16)
    with torch.no_grad():
        M.score_head(model).bias.fill_(3.0)  # rewards near 3, where bf16 rounds to multiples of 2^-6
    words = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "red", "blue")
    ids, mask = M.pad_batch([tok(f"The answer is {w}")["input_ids"] for w in words], tok.pad_token_id)
    with torch.no_grad():
        old = model(input_ids=ids, attention_mask=mask).logits[:, 0]
        new, _ = M.forward_rewards(model, ids, mask)
    assert old.dtype == torch.bfloat16 and new.dtype == torch.float32

    def ties(r):
        return int((r[:, None] == r[None, :]).triu(1).sum())

    assert ties(old) > 0, "the fixture must reproduce bf16 ties"
    assert ties(new) == 0


def _local_model(tmp_path, config, tok):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    return str(tmp_path / "m")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_dropout_is_off_by_module_rule_whatever_the_config_calls_it(family, tmp_path):
    from transformers import GPT2Config, LlamaConfig

    tok = M.load_tokenizer("tiny:llama")
    small = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id)
    config = (GPT2Config(n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.5, **small)
              if family == "gpt2" else
              LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          attention_dropout=0.5, **small))
    model = M.build_reward_model(_local_model(tmp_path, config, tok), tok)
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert all(m.p == 0.0 for m in dropouts) and not model.training
    ids, mask = M.pad_batch([tok("a b c d e f")["input_ids"]] * 2, tok.pad_token_id)
    first, _ = M.forward_rewards(model, ids, mask)  # with gradients, as in training
    second, _ = M.forward_rewards(model, ids, mask)
    assert torch.equal(first, second)


def test_random_tiny_models_are_built_without_dropout_and_in_eval_mode():
    tok = M.load_tokenizer("tiny:bert")
    assert not M.build_reward_model("tiny:bert", tok).training


LLAMA32_DATE = ('{%- if not date_string is defined %}{%- if strftime_now is defined %}'
                '{%- set date_string = strftime_now("%d %b %Y") %}{%- else %}{%- set date_string = "26 Jul 2024" %}'
                '{%- endif %}{%- endif %}{{- "Today Date: " + date_string + "\\n" }}'
                "{%- for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{%- endfor %}")
CLOCK_ONLY = ('{{- "Now: " + strftime_now("%Y-%m-%d") + "\\n" }}'
              "{%- for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{%- endfor %}")


@pytest.mark.parametrize("template", [LLAMA32_DATE, CLOCK_ONLY])
def test_tokenisation_never_depends_on_the_calendar(template, monkeypatch, tmp_path):
    import datetime as dt

    from transformers.utils import chat_template_utils

    class Clock(dt.datetime):
        today_is = dt.datetime(2031, 3, 9)

        @classmethod
        def now(cls, tz=None):
            return cls.today_is

    monkeypatch.setattr(chat_template_utils, "datetime", Clock)
    tok = M.load_tokenizer("tiny:llama", template_date="2025-01-02")
    tok.chat_template = template
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    first = M.encode_messages(tok, messages)
    Clock.today_is = dt.datetime(2032, 11, 30)
    assert M.encode_messages(tok, messages) == first
    text = tok.decode(first).lower().replace(" ", "")
    assert "2031" not in text and ("02jan2025" in text or "2025-01-02" in text), text
    tok.save_pretrained(tmp_path / "tok")  # the date travels with the exported tokenizer
    again = M.load_tokenizer(str(tmp_path / "tok"))
    assert again.init_kwargs["template_date"] == "2025-01-02" and M.encode_messages(again, messages) == first


def test_scored_index_matches_the_models_own_pooling_when_eos_is_the_pad_token(tmp_path):
    from pipeline.decoders import make_decoder

    folder = make_decoder(tmp_path / "llama", "llama")
    tok = M.load_tokenizer(folder)
    assert tok.pad_token_id == tok.eos_token_id
    ids = M.encode_messages(tok, CONV[0][0])
    assert ids[-1] == tok.eos_token_id, "the template ends the reply with EOS, which is also the pad token"
    assert M.scored_index(ids, tok.pad_token_id) == len(ids) - 2
    input_ids, _ = M.pad_batch([ids], tok.pad_token_id)
    assert int(M.scored_positions(input_ids, tok.pad_token_id)[0]) == len(ids) - 2


@pytest.mark.parametrize("name", ["tiny:llama", "llama-folder"])
def test_batched_encoding_equals_one_conversation_at_a_time(name, tmp_path):
    from pipeline.decoders import make_decoder

    tok = M.load_tokenizer(make_decoder(tmp_path / "d", "llama") if name == "llama-folder" else name)
    conversations = [c for pair in CONV for c in pair] + [[{"role": "user", "content": "only a question"}]]
    one_by_one = [M.encode_batch(tok, [c])[0] for c in conversations]
    assert M.encode_batch(tok, conversations) == one_by_one
    assert [M.encode_messages(tok, c) for c in conversations] == one_by_one
    assert len({tuple(x) for x in one_by_one}) == len(one_by_one)


@pytest.mark.parametrize("name", ["tiny:llama", "tiny:bert"])
def test_layernorm_head_input_is_trained_and_exported_with_the_model(name, tmp_path):
    """The LayerNorm baseline: the head reads LayerNorm(h) in training (forward_pairs), the flag travels in
    config.json, and every scorer of this project (forward_rewards, the MLflow pyfunc) scores the exported model
    exactly as training did."""
    from pipeline import pyfunc_model
    tok = M.load_tokenizer(name)
    model = M.build_reward_model(name, tok, seed=1, head_input_norm="layernorm")
    batch = _batch(tok)
    with torch.no_grad():
        rc, rr, hc, hr = M.forward_pairs(model, batch)
        plain_rewards = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
    head = M.score_head(model)
    torch.testing.assert_close(hc.mean(-1), torch.zeros(2), atol=1e-5, rtol=0)  # normalised: zero mean per vector
    torch.testing.assert_close(head(torch.cat([hc, hr])).squeeze(-1), torch.cat([rc, rr]), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(plain_rewards, torch.cat([rc, rr]))  # without the rule the head reads raw h
    folder = M.save_reward_model(model, tok, tmp_path / "rm")
    loaded, _ = M.load_exported(folder)
    assert getattr(loaded.config, M.HEAD_INPUT_NORM) == "layernorm"
    with torch.no_grad():
        after, _ = M.forward_rewards(loaded, batch["input_ids"], batch["attention_mask"])
        with pyfunc_model._head_in_fp32(loaded):
            pyfunc = loaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
    torch.testing.assert_close(after, torch.cat([rc, rr]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pyfunc, torch.cat([rc, rr]), rtol=1e-5, atol=1e-6)


def test_pooled_forward_returns_the_mean_of_the_last_hidden_states():
    tok = M.load_tokenizer("tiny:bert")
    model = M.build_reward_model("tiny:bert", tok, seed=1)
    batch = _batch(tok)
    with torch.no_grad():
        rc, rr, pc, pr = M.forward_pairs(model, batch, pooled=True)
        rc0, rr0, _, _ = M.forward_pairs(model, batch)
        last = model(**batch, output_hidden_states=True).hidden_states[-1]
    mask = batch["attention_mask"].unsqueeze(-1).float()
    torch.testing.assert_close(torch.cat([pc, pr]), (last * mask).sum(1) / mask.sum(1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([rc, rr]), torch.cat([rc0, rr0]))  # the rewards do not change
