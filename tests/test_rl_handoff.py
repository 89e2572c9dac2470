"""The served reward is the trained reward, for the text RL clients really send (no Ray: the endpoint's core, the
routes in one process, the pyfunc).

For each tokenizer style (``tests/chat_styles.py``), one conversation is scored five ways that must agree to 1e-5:
the train loop's forward over training's ids, ``/score`` on the messages, ``/get_reward`` on the README's recipe
text, ``/get_reward`` on the text OpenRLHF sends, and the registered pyfunc. The clients' requests are replayed
as their code sends them:

* OpenRLHF v0.11.0 (``openrlhf/utils/agent.py``, commit 3c3be623, ``SingleTurnAgentExecutor``): the prompt is the
  policy's chat template with the generation prompt, tokenised with ``add_special_tokens=False``; the query is
  ``decode(prompt_ids + response_ids, skip_special_tokens=False)``, the response ending at the policy's stop
  token; ``_fetch_rewards_via_http`` splits the queries over the servers in slices of ``ceil(n / servers)`` and
  posts ``{"query", "prompts", "labels"}`` to each with aiohttp; the reply's ``scores`` (else ``rewards``) is read.
* OpenRLHF before v0.10 (``openrlhf/utils/remote_rm_utils.py``, commit 07c34b30): the whole rollout's queries in
  one ``requests.post(url, json={"query": queries}, timeout=180)``, then ``response.json()["rewards"]``.
* LLaMA-Factory (``src/llamafactory/train/ppo/ppo_utils.py::get_rewards_from_server``, commit 0b1f4a34):
  ``requests.post(url, json={"model": "model", "messages": texts})``, then ``json.loads(response.text)["scores"]``;
  the texts are ``batch_decode(query + response ids, skip_special_tokens=False)`` (``trainer.py::get_rewards``).
"""

from __future__ import annotations

import asyncio
import json
import math
import socket
import threading
import time

import numpy as np
import pytest
import torch

from pipeline import modeling, serving
from pipeline.pyfunc_model import PairScorer
from tests import chat_styles

pytestmark = pytest.mark.unit
CONVERSATION = [{"role": "user", "content": "What is 6 times 7?"}, {"role": "assistant", "content": "42."}]
OTHER = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue is a colour."}]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("styles")
    return {style: chat_styles.reward_model_folder(style, root / style, seed=3) for style in chat_styles.STYLES}


def train_loop_rewards(folder: str, conversations: list) -> list[float]:
    """What the train loop computes: training's ids (the data stage's encode_batch), one forward over the pair."""
    model, tok = modeling.load_exported(folder, dtype=torch.float32)
    ids = modeling.encode_batch(tok, conversations)
    batch = modeling.collate_pairs(ids[:1], ids[1:], model.config.pad_token_id)
    with torch.no_grad():
        chosen, rejected, _, _ = modeling.forward_pairs(model, batch)
    return [chosen.item(), rejected.item()]


def openrlhf_query(tok, conversation: list, stop: str) -> str:
    """OpenRLHF v0.11.0's query text for a policy that generated the conversation's last turn and stopped."""
    prompt = tok.apply_chat_template(conversation[:-1], tokenize=False, add_generation_prompt=True)
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    action_ids = tok(conversation[-1]["content"], add_special_tokens=False)["input_ids"] + [
        tok.convert_tokens_to_ids(stop)]
    return tok.decode(prompt_ids + action_ids, skip_special_tokens=False)


def client_texts(style: str, folder: str, conversation: list) -> dict[str, str]:
    tok = modeling.load_tokenizer(folder)
    texts = {"readme": tok.decode(modeling.encode_messages(tok, conversation))}
    if chat_styles.stop_token(style):
        texts["openrlhf"] = openrlhf_query(tok, conversation, chat_styles.stop_token(style))
    else:  # an encoder generates nothing; its text may come back without its [CLS]/[SEP]
        texts["decoded_without_specials"] = tok.decode(modeling.encode_messages(tok, conversation),
                                                       skip_special_tokens=True)
    return texts


@pytest.mark.parametrize("style", chat_styles.STYLES)
def test_every_route_gives_the_trained_reward_for_every_clients_text(exports, style):
    folder = exports[style]
    trained = train_loop_rewards(folder, [CONVERSATION, OTHER])
    service = serving.RewardService(folder, max_length=2048, truncation_side="left")
    scored = service.rewards([ids for ids, _ in service.encode_conversations([CONVERSATION, OTHER])])
    assert scored == pytest.approx(trained, abs=1e-5), "/score vs the train loop"
    texts = client_texts(style, folder, CONVERSATION)
    for client, text in texts.items():
        (ids, _), = service.encode_texts([text])
        assert service.rewards([ids])[0] == pytest.approx(trained[0], abs=1e-5), f"/get_reward on {client}'s text"
    pyfunc = PairScorer.load(folder, device="cpu")
    assert pyfunc.rewards(["What is 6 times 7?"], ["42."])[0] == pytest.approx(trained[0], abs=1e-5)
    assert pyfunc.text_rewards(list(texts.values())) == pytest.approx([trained[0]] * len(texts), abs=1e-5)


@pytest.mark.parametrize("style", chat_styles.STYLES)
def test_the_pyfunc_encodes_text_as_the_library_does(exports, style):
    """The pyfunc cannot import this project: its copy of the encoding rule is checked against the library's."""
    from pipeline import pyfunc_model

    tok = modeling.load_tokenizer(exports[style])
    frame = modeling.text_frame(tok)
    for conversation in (CONVERSATION, OTHER):
        for text in client_texts(style, exports[style], conversation).values():
            assert pyfunc_model.text_ids(tok, text) == modeling.encode_text(tok, text, frame)


def test_a_roberta_export_is_cut_to_the_positions_it_has_in_serving_and_the_pyfunc(tmp_path):
    """RoBERTa's position ids start after the padding index: 34 positions hold 32 tokens. Both scorers used to read
    ``max_position_embeddings`` (or a lifted tokenizer limit) and crashed on a 33-34 token input."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    tok = modeling.load_tokenizer("embedded:minilm")
    tok.model_max_length = 32
    config = RobertaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, max_position_embeddings=34, pad_token_id=tok.pad_token_id,
                           num_labels=1, type_vocab_size=1)
    folder = modeling.save_reward_model(RobertaForSequenceClassification(config).eval(), tok, tmp_path / "rm")
    long_text = " ".join(["word"] * 31)  # 31 words + [CLS] + [SEP] = 33 tokens
    service = serving.RewardService(str(folder), max_length=2048, truncation_side="left")
    (ids, truncated), = service.encode_texts([long_text])
    assert service.max_length == 32 and truncated and len(ids) == 32
    assert np.isfinite(service.rewards([ids])).all()
    assert np.isfinite(PairScorer.load(folder, device="cpu").text_rewards([long_text])).all()


def test_a_bf16_export_is_scored_in_fp32_on_cpu_as_the_rewardbench_stage_scores_it(exports, tmp_path):
    from pipeline import scoring

    model, tok = modeling.load_exported(exports["llama3"], dtype=torch.bfloat16)
    folder = modeling.save_reward_model(model, tok, tmp_path / "bf16")
    service = serving.RewardService(str(folder), max_length=2048, truncation_side="left")
    assert {p.dtype for p in service.model.parameters()} == {torch.float32}
    assert {p.dtype for p in PairScorer.load(folder, device="cpu").model.parameters()} == {torch.float32}
    reference = scoring.RewardScorer(str(folder))({"messages": np.array([CONVERSATION], dtype=object)})["score"]
    served = service.rewards([ids for ids, _ in service.encode_conversations([CONVERSATION])])
    assert served == pytest.approx(reference, abs=1e-6)


# ---------------------------------------------------------------- the routes over real HTTP, in one process


SETTINGS = {"max_texts": 4096, "max_chars": 200_000, "max_request_tokens": 400_000, "max_body_bytes": 4 * 2**20,
            "max_batch_tokens": 512, "token": None}


@pytest.fixture(scope="module")
def endpoint(exports):
    """The routes on uvicorn on a loopback port (no Ray): ``(url, service)``."""
    import uvicorn

    service = serving.RewardService(exports["chatml"], max_length=2048, truncation_side="left")

    async def score_chunk(sequences):
        return (await serving.score_alone(service, [sequences]))[0]

    api = serving.RewardAPI(service, SETTINGS, {"source": exports["chatml"]}, score_chunk)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(serving.plain_app(api), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", service
    server.should_exit = True
    thread.join(timeout=10)


def rollout(service, n: int) -> list[str]:
    tok = service.tokenizer
    return [openrlhf_query(tok, [{"role": "user", "content": f"What is {i} times 7?"},
                                 {"role": "assistant", "content": f"{7 * i}."}], "<|im_end|>") for i in range(n)]


def test_openrlhf_current_client_one_sample_per_post_over_two_servers(endpoint):
    """OpenRLHF v0.11.0 with ``--reward.remote_url a,b``: one sample per step goes to the first server, and the
    second gets ``{"query": [], "prompts": [], "labels": []}`` (it used to answer 422 and the reward was lost)."""
    import aiohttp

    url, service = endpoint
    query = rollout(service, 1)
    urls = [f"{url}/get_reward", f"{url}/get_reward"]

    async def fetch():  # _fetch_rewards_via_http, as written there
        size = math.ceil(len(query) / len(urls))
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=180)) as session:
            replies = []
            for i, rm in enumerate(urls):
                payload = {"query": query[i * size:(i + 1) * size], "prompts": ["p"][i * size:(i + 1) * size],
                           "labels": [None][i * size:(i + 1) * size]}
                async with session.post(rm, json=payload) as response:
                    response.raise_for_status()
                    replies.append(await response.json())
            return replies

    first, second = asyncio.run(fetch())
    score = first.get("scores") if first.get("scores") is not None else first.get("rewards")
    (ids, _), = service.encode_texts(query)
    assert score == pytest.approx([service.rewards([ids])[0]], abs=1e-6)
    assert second == {"rewards": [], "truncated": []}


def test_openrlhf_legacy_client_a_whole_rollout_in_one_post(endpoint):
    """OpenRLHF before v0.10 posts the rollout's 1,024 texts at once (it used to get 413 past 256 texts); the
    request is scored in pieces of max_batch_tokens and the rewards come back in order."""
    import requests

    url, service = endpoint
    queries = rollout(service, 1024)
    response = requests.post(url=f"{url}/get_reward", json={"query": queries},
                             headers={"Content-Type": "application/json"}, timeout=180)
    response.raise_for_status()
    rewards = response.json()["rewards"]
    expected = service.rewards([ids for ids, _ in service.encode_texts(queries)])
    assert len(rewards) == 1024 and rewards == pytest.approx(expected.tolist(), abs=1e-6)


def test_llama_factory_api_reward_model(endpoint):
    import requests

    url, service = endpoint
    messages = rollout(service, 3)
    response = requests.post(f"{url}/v1/score/evaluation", json={"model": "model", "messages": messages},
                             headers={"Content-Type": "application/json"})
    scores = json.loads(response.text)["scores"]
    assert scores == pytest.approx(service.rewards([ids for ids, _ in service.encode_texts(messages)]).tolist(),
                                   abs=1e-6)


@pytest.mark.parametrize("body, status", [
    (b"[" * 100_000, 400),  # nested past the parser's recursion limit: was a 500
    (b'{"query": ["x"], "pad": "' + b"y" * (5 * 2**20) + b'"}', 413),  # over max_body_bytes
])
def test_bodies_the_parser_cannot_take_are_refused_with_a_4xx(endpoint, body, status):
    import requests

    url, _ = endpoint
    response = requests.post(f"{url}/get_reward", data=body, headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text


def test_an_over_size_body_is_refused_before_it_is_read_whole(endpoint):
    """A Content-Length over the cap gets 413 at once: the client is still sending when the answer comes."""
    url, _ = endpoint
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(b"POST /get_reward HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000000000\r\n\r\n{\"query\": [")
        assert conn.recv(200).startswith(b"HTTP/1.1 413")


def test_health_answers_while_a_maximum_size_request_is_scored(endpoint):
    """Encoding and forwards run off the event loop: /health answers in under a second meanwhile."""
    import requests

    url, service = endpoint
    queries = rollout(service, 3000)
    done = threading.Event()

    def big() -> None:
        requests.post(f"{url}/get_reward", json={"query": queries}, timeout=300)
        done.set()

    thread = threading.Thread(target=big)
    thread.start()
    time.sleep(0.3)
    latencies = []
    while not done.is_set() and len(latencies) < 20:
        start = time.perf_counter()
        assert requests.get(f"{url}/health", timeout=5).status_code == 200
        latencies.append(time.perf_counter() - start)
        time.sleep(0.05)
    thread.join()
    assert len(latencies) >= 3, "the big request finished before /health was asked three times"
    assert max(latencies) < 1.0, latencies


def test_a_text_that_fails_its_forward_fails_only_its_own_caller(exports):
    service = serving.RewardService(exports["chatml"], max_length=2048, truncation_side="left")
    good = [ids for ids, _ in service.encode_texts(["<|im_start|>user\nhi<|im_end|>\n"])]
    bad = [[10**9]]  # an id past the vocabulary: the embedding lookup raises
    out = asyncio.run(serving.score_alone(service, [good, bad, good]))
    assert "rewards" in out[0] and "rewards" in out[2] and "error" in out[1]
    assert out[0]["rewards"] == pytest.approx(service.rewards(good).tolist(), abs=1e-6)


def test_a_request_is_split_into_pieces_under_the_token_budget():
    sequences = [[1] * n for n in (300, 300, 100, 600, 50)]
    chunks = serving.token_chunks(sequences, 512)
    assert chunks == [[0], [1, 2], [3], [4]]
    assert sorted(i for c in chunks for i in c) == list(range(5))


def test_a_replica_on_another_node_opens_the_staged_copy(exports, tmp_path):
    """The driver's model folder does not exist on another node: the replica copies the one staged under
    ray.storage_path, and says what to set when there is none."""
    staged = serving.stage_model(exports["chatml"], str(tmp_path / "storage"))
    elsewhere = serving.replica_folder(str(tmp_path / "not-on-this-node"), staged)
    service = serving.RewardService(elsewhere, max_length=2048, truncation_side="left")
    original = serving.RewardService(exports["chatml"], max_length=2048, truncation_side="left")
    ids = [x for x, _ in original.encode_conversations([CONVERSATION])]
    assert service.rewards(ids) == pytest.approx(original.rewards(ids), abs=0)
    assert serving.replica_folder(exports["chatml"], staged) == exports["chatml"]
    with pytest.raises(FileNotFoundError, match="ray.storage_path"):
        serving.replica_folder(str(tmp_path / "not-on-this-node"), None)
