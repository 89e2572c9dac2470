"""The reward model behind an HTTP endpoint on Ray Serve, for RLHF stacks, Best-of-N at inference and data filtering.

``python run_pipeline.py serve [--model M] [--host 127.0.0.1] [--port 8000]``; the model is ``serve.model``:
``models:/<name>@<alias>`` or ``models:/<name>/<version>`` (the MLflow registry; default: the registry's champion),
a run directory (its train stage's export) or a ``save_pretrained`` folder.

Routes (JSON):

* ``POST /get_reward`` ``{"query": ["<full text>", ...]}`` → ``{"rewards": [...], "truncated": [...]}``: OpenRLHF's
  remote reward model contract (``--remote_rm_url``). Each text is tokenised as plain transformers does,
  ``tokenizer(text)`` with the tokenizer's default special tokens: the text must already carry the model's chat
  template (:func:`pipeline.modeling.encode_messages` renders it).
* ``POST /score`` ``{"prompt": ..., "response": ...}`` (strings, or lists of strings of equal length) or
  ``{"messages": [<conversation>, ...]}``: rendered with the model's chat template at its template date, exactly as
  training and the RewardBench stage render them → ``{"rewards", "truncated"}`` and, when the model carries its
  validation reward mean and standard deviation, ``"normalized_rewards"`` = (r − mean) / std.
* ``GET /health``; ``GET /metadata`` (registry name, version, alias, backbone, max length, template date).

Rewards are the score head applied in fp32 (:func:`pipeline.modeling.forward_rewards`). Requests are batched across
callers (``serve.batch``) under a token budget (``serve.max_batch_tokens``); inside a batch, sequences are sorted by
length and split into forwards of least padded cost (:func:`pipeline.scoring.length_groups`), so many short requests
share a forward and one long request does not pad a batch of short ones. Over-length inputs are truncated as in
training (the first token and the end are kept) and flagged. Safe by default: loopback only unless told otherwise, an
optional bearer token (the environment variable named by ``serve.token_env``), request size limits, and a 4xx
naming the field for malformed JSON, missing fields, wrong types and empty strings.
"""

# No "from __future__ import annotations" here: Ray Serve pickles the deployment class by value, and FastAPI must
# find the routes' annotations (Request) as objects, not as names to look up in a module the replica never imports.
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import Request

from pipeline import modeling, scoring
from pipeline.config import PipelineConfig

APP_NAME = "normbt-reward-model"


class RewardService:
    """Rewards of token-id sequences with one exported model (no Ray, no HTTP: the endpoint's core)."""

    def __init__(self, folder: str, *, max_length: int, truncation_side: str, use_gpu: bool = False) -> None:
        self.device = torch.device("cuda" if use_gpu else "cpu")
        model, tokenizer = modeling.load_exported(folder, dtype=torch.bfloat16 if use_gpu else None)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        self.model, self.tokenizer = model.to(self.device).eval(), tokenizer
        tokenizer.model_max_length = 1_000_000_000  # we truncate ourselves, keeping the end
        self.max_length = scoring.usable_length(model, tokenizer, max_length)
        self.truncation_side = truncation_side
        self.pad_id = int(model.config.pad_token_id)
        self.overhead = scoring.FORWARD_OVERHEAD_TOKENS[self.device.type]
        self.max_tokens = scoring.MAX_TOKENS_PER_FORWARD[self.device.type]
        mean, std = getattr(model.config, "reward_mean", None), getattr(model.config, "reward_std", None)
        self.norm = (float(mean), float(std)) if mean is not None and std else None

    def cut(self, ids: list[int]) -> tuple[list[int], bool]:
        return modeling.truncate_ids(ids, self.max_length, self.truncation_side), len(ids) > self.max_length

    def encode_texts(self, texts: Sequence[str]) -> list[tuple[list[int], bool]]:
        """``tokenizer(text)`` with the default special tokens, as plain transformers scores a text."""
        ids = self.tokenizer(list(texts), return_token_type_ids=False)["input_ids"]
        return [self.cut(list(x)) for x in ids]

    def encode_conversations(self, conversations: Sequence[Sequence[dict]]) -> list[tuple[list[int], bool]]:
        return [self.cut(x) for x in modeling.encode_batch(self.tokenizer, conversations)]

    def rewards(self, sequences: Sequence[Sequence[int]]) -> np.ndarray:
        """fp32 rewards (as float64), in input order; forwards of similar lengths under a token budget."""
        out = np.zeros(len(sequences), dtype=np.float64)
        lengths = np.array([len(s) for s in sequences], dtype=np.int64)
        for group in scoring.length_groups(lengths, self.overhead, self.max_tokens):
            ids, mask = modeling.pad_batch([sequences[i] for i in group], self.pad_id)
            with torch.inference_mode():
                rewards, _ = modeling.forward_rewards(self.model, ids.to(self.device), mask.to(self.device))
            out[group] = rewards.double().cpu().numpy()
        return out

    def normalised(self, rewards: Sequence[float]) -> list[float] | None:
        return None if self.norm is None else [(r - self.norm[0]) / self.norm[1] for r in rewards]


class BadRequest(ValueError):
    """A request the endpoint refuses with a 4xx; the message names the field."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


def texts_of(body: Any, limits: dict[str, int]) -> list[str]:
    """``/get_reward``'s ``query``: a non-empty list of non-empty strings (a single string is one text)."""
    query = _field(body, "query")
    texts = [query] if isinstance(query, str) else query
    if not isinstance(texts, list) or not texts:
        raise BadRequest("field 'query' must be a non-empty list of strings")
    return [_text(t, f"query[{i}]", limits) for i, t in enumerate(_capped(texts, "query", limits))]


def conversations_of(body: Any, limits: dict[str, int]) -> list[list[dict[str, str]]]:
    """``/score``: ``prompt`` + ``response`` (strings or equal-length lists), or ``messages`` (one conversation or a
    list of them), as ``[{role, content}, ...]`` conversations."""
    if isinstance(body, dict) and "messages" in body:
        messages = body["messages"]
        many = isinstance(messages, list) and messages and isinstance(messages[0], list)
        conversations = _capped(messages if many else [messages], "messages", limits)
        return [_conversation(c, f"messages[{i}]" if many else "messages", limits) for i, c in enumerate(conversations)]
    prompt, response = _field(body, "prompt"), _field(body, "response")
    if isinstance(prompt, str) and isinstance(response, str):
        prompt, response = [prompt], [response]
    if not isinstance(prompt, list) or not isinstance(response, list) or len(prompt) != len(response) or not prompt:
        raise BadRequest("fields 'prompt' and 'response' must be two strings or two lists of strings of equal length")
    _capped(prompt, "prompt", limits)
    return [[{"role": "user", "content": _text(p, f"prompt[{i}]", limits)},
             {"role": "assistant", "content": _text(r, f"response[{i}]", limits)}]
            for i, (p, r) in enumerate(zip(prompt, response, strict=True))]


def _field(body: Any, name: str) -> Any:
    if not isinstance(body, dict):
        raise BadRequest(f"the body must be a JSON object with field {name!r}, got {type(body).__name__}")
    if name not in body:
        raise BadRequest(f"field {name!r} is missing (the body has: {', '.join(map(str, body)) or 'nothing'})")
    return body[name]


def _capped(items: list, name: str, limits: dict[str, int]) -> list:
    if not isinstance(items, list) or not items:
        raise BadRequest(f"field {name!r} must be a non-empty list")
    if len(items) > limits["max_texts"]:
        raise BadRequest(f"field {name!r} has {len(items)} items; at most {limits['max_texts']} per request", 413)
    return items


def _text(value: Any, where: str, limits: dict[str, int]) -> str:
    if not isinstance(value, str):
        raise BadRequest(f"field {where!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise BadRequest(f"field {where!r} is empty")
    if len(value) > limits["max_chars"]:
        raise BadRequest(f"field {where!r} has {len(value)} characters; at most {limits['max_chars']}", 413)
    return value


def _conversation(value: Any, where: str, limits: dict[str, int]) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise BadRequest(f"field {where!r} must be a non-empty list of {{role, content}} messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise BadRequest(f"field {where}[{i}] must be a message with role system, user or assistant")
        out.append({"role": m["role"], "content": _text(m.get("content"), f"{where}[{i}].content", limits)})
    return out


# ------------------------------------------------------------------ the Ray Serve deployment


def build_app(folder: str, settings: dict[str, Any], metadata: dict[str, Any]) -> Any:
    """The Ray Serve application: a FastAPI ingress over :class:`RewardService`, batched across callers."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse
    from ray import serve

    app = FastAPI(title="NormBT reward model")

    @serve.deployment(num_replicas=settings["num_replicas"], max_ongoing_requests=settings["max_ongoing"],
                      ray_actor_options={"num_cpus": settings["cpus"], "num_gpus": settings["gpus"]})
    @serve.ingress(app)
    class RewardEndpoint:
        def __init__(self) -> None:
            self.service = RewardService(folder, max_length=settings["max_length"],
                                         truncation_side=settings["truncation_side"], use_gpu=settings["gpus"] > 0)
            self.limits = {"max_texts": settings["max_texts"], "max_chars": settings["max_chars"]}
            self.token = settings.get("token")
            self.score_one.set_max_batch_size(max(settings["max_batch_tokens"], self.service.max_length))
            self.score_one.set_batch_wait_timeout_s(settings["batch_wait_ms"] / 1000)

        @serve.batch(max_batch_size=8192, batch_wait_timeout_s=0.005, batch_size_fn=lambda items: sum(map(len, items)))
        async def score_one(self, sequences: list[list[int]]) -> list[float]:
            return self.service.rewards(sequences).tolist()

        async def _checked(self, request: Request) -> Any:
            if self.token and request.headers.get("authorization") != f"Bearer {self.token}":
                raise BadRequest("missing or wrong bearer token (Authorization: Bearer <token>)", 401)
            try:
                return json.loads(await request.body())
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise BadRequest(f"the body is not valid JSON: {err}", 400) from None

        async def _rewards(self, encoded: list[tuple[list[int], bool]]) -> dict[str, Any]:
            import asyncio

            rewards = await asyncio.gather(*(self.score_one(ids) for ids, _ in encoded))
            return {"rewards": list(rewards), "truncated": [t for _, t in encoded]}

        @app.post("/get_reward")
        async def get_reward(self, request: Request) -> Any:
            try:
                texts = texts_of(await self._checked(request), self.limits)
            except BadRequest as err:
                return JSONResponse({"detail": str(err)}, status_code=err.status)
            return await self._rewards(self.service.encode_texts(texts))

        @app.post("/score")
        async def score(self, request: Request) -> Any:
            try:
                conversations = conversations_of(await self._checked(request), self.limits)
                encoded = self.service.encode_conversations(conversations)
            except BadRequest as err:
                return JSONResponse({"detail": str(err)}, status_code=err.status)
            except Exception as err:  # noqa: BLE001 - e.g. a chat template refusing a system turn
                return JSONResponse({"detail": f"the chat template refused the conversation: {err}"}, status_code=422)
            out = await self._rewards(encoded)
            normalised = self.service.normalised(out["rewards"])
            return {**out, **({"normalized_rewards": normalised} if normalised is not None else {})}

        @app.get("/health")
        async def health(self) -> Any:
            return {"status": "ok"}

        @app.get("/metadata")
        async def metadata_route(self) -> Any:
            return {**metadata, "max_length": self.service.max_length,
                    "template_date": modeling.template_date(self.service.tokenizer).isoformat(),
                    "normalized": self.service.norm is not None}

    return RewardEndpoint.bind()


def resolve_model(cfg: PipelineConfig, spec: str | None = None) -> tuple[str, dict[str, Any]]:
    """``(save_pretrained folder, metadata)`` for ``spec`` (default ``serve.model``, else the registry's champion)."""
    spec = spec or cfg.serve.model or f"models:/{cfg.tracking.registered_model_name}@champion"
    if spec.startswith("models:/"):
        return _from_registry(cfg, spec)
    path = Path(spec).expanduser()
    manifest = path / "train" / "manifest.json"
    if manifest.is_file():  # a run directory
        folder = json.loads(manifest.read_text())["outputs"]["model"]
        return folder, {"source": str(path), "backbone": _backbone(folder)}
    if (path / "config.json").is_file():
        return str(path), {"source": str(path), "backbone": _backbone(str(path))}
    raise FileNotFoundError(f"serve.model {spec!r}: not a models:/ URI, a run directory or a save_pretrained folder")


def _from_registry(cfg: PipelineConfig, uri: str) -> tuple[str, dict[str, Any]]:
    """Download the registered pyfunc and return its reward-model folder (the ``model`` artifact)."""
    import mlflow
    from mlflow import MlflowClient

    from pipeline.tracking import mlflow_globals, resolve_tracking_uri

    tracking_uri = resolve_tracking_uri(cfg)
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    name, _, ref = uri.removeprefix("models:/").partition("@")
    if ref:
        version = client.get_model_version_by_alias(name, ref)
    else:
        name, _, number = name.partition("/")
        version = client.get_model_version(name, number)
    # models:/ URIs resolve against the process-wide registry URI, whatever tracking_uri says.
    with mlflow_globals(tracking_uri):
        local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version.version}")
    folder = next(p.parent for p in Path(local).rglob("config.json") if (p.parent / "model.safetensors").is_file())
    return str(folder), {"registered_model": name, "version": str(version.version), "alias": ref or None,
                         "aliases": sorted(version.aliases), "run_id": version.run_id, "source": uri,
                         "backbone": _backbone(str(folder))}


def _backbone(folder: str) -> str:
    config = json.loads((Path(folder) / "config.json").read_text())
    return str(config.get("_name_or_path") or config.get("model_type") or "unknown")


def settings_of(cfg: PipelineConfig) -> dict[str, Any]:
    s, rb = cfg.serve, cfg.rewardbench
    token = os.environ.get(s.token_env) if s.token_env else None
    return {"num_replicas": s.num_replicas, "cpus": s.cpus_per_replica, "gpus": s.gpus_per_replica,
            "max_batch_tokens": s.max_batch_tokens, "batch_wait_ms": s.batch_wait_ms,
            "max_texts": s.max_texts_per_request, "max_chars": s.max_text_chars, "token": token or None,
            "max_length": rb.max_length, "truncation_side": rb.truncation_side,
            # a replica must be able to hold a whole batch's requests, or batches never fill
            "max_ongoing": max(64, s.max_batch_tokens // 16)}


def start(cfg: PipelineConfig, *, model: str | None = None, host: str | None = None, port: int | None = None) -> str:
    """Deploy the endpoint (Ray as configured: the local cluster by default) and return its URL once it answers."""
    from ray import serve

    from pipeline.raycluster import ensure_ray

    folder, metadata = resolve_model(cfg, model)
    host, port = host or cfg.serve.host, port or cfg.serve.port
    ensure_ray(cfg)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(folder, settings_of(cfg), metadata), name=APP_NAME, route_prefix="/")
    url = f"http://{host}:{port}"
    wait_until_healthy(url, settings_of(cfg).get("token"))
    return url


def wait_until_healthy(url: str, token: str | None, timeout_s: float = 120.0) -> None:
    import urllib.error
    import urllib.request

    deadline = time.time() + timeout_s
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    while True:
        try:
            with urllib.request.urlopen(urllib.request.Request(f"{url}/health", headers=headers), timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.time() > deadline:
            raise TimeoutError(f"the reward endpoint at {url} did not answer /health within {timeout_s:.0f}s")
        time.sleep(0.5)


def stop() -> None:
    from ray import serve

    serve.shutdown()
