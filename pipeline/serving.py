"""The reward model behind an HTTP endpoint on Ray Serve, for RLHF stacks, Best-of-N at inference and data filtering.

``python run_pipeline.py serve [--model M] [--host 127.0.0.1] [--port 8000]``; the model is ``serve.model``:
``models:/<name>@<alias>``, ``models:/<name>/<version>`` or ``models:/<name>/latest`` (the MLflow registry; default:
the registry's champion), a run directory (its train stage's export) or a ``save_pretrained`` folder.

Routes (JSON):

* ``POST /get_reward`` ``{"query": ["<rendered text>", ...], ...}`` → ``{"rewards": [...], "truncated": [...]}``:
  OpenRLHF's remote reward model (``--reward.remote_url``, ``--remote_rm_url`` before v0.10.2). Other fields
  (``prompts``, ``labels``) are ignored; ``{"query": []}`` (what OpenRLHF sends the extra servers when it has fewer
  samples than URLs) gets ``{"rewards": [], "truncated": []}``. A whole rollout in one request is scored in pieces
  of ``serve.max_batch_tokens`` through the shared batcher.
* ``POST /v1/score/evaluation`` ``{"model": ..., "messages": ["<rendered text>", ...]}`` → ``{"scores": [...]}``:
  LLaMA-Factory's ``reward_model_type: api``.
* ``POST /score`` ``{"prompt": ..., "response": ...}`` (strings, or lists of strings of equal length) or
  ``{"messages": [<conversation>, ...]}``: rendered with the model's chat template at its template date, exactly as
  training and the RewardBench stage render them → ``{"rewards", "truncated"}`` and, when the model carries its
  validation reward mean and standard deviation, ``"normalized_rewards"`` = (r − mean) / std.
* ``GET /health``; ``GET /metadata`` (registry name, version, alias, backbone, max length, template date; behind
  the token when one is set).

A rendered text is encoded by :func:`pipeline.modeling.encode_text`: the reward of a text equals the reward training
computes for the conversation it renders (no second BOS, the template's after-turn whitespace restored after a
policy's stop token). Rewards are the score head applied in fp32 to a backbone in fp32 on CPU (bf16 on GPU), as the
RewardBench stage scores. Requests are batched across callers (``serve.batch``) under a token budget
(``serve.max_batch_tokens``); inside a batch, sequences are sorted by length and split into forwards of least padded
cost (:func:`pipeline.scoring.length_groups`). Encoding and forwards run off the event loop, so ``/health`` answers
while a large request is scored. Over-length inputs are truncated as in training (the first token and the end are
kept) and flagged. Safe by default: loopback only unless told otherwise, an optional bearer token (the environment
variable named by ``serve.token_env``, compared in constant time), a byte cap on the body (413 before it is read
whole), a token cap per request, a bounded queue (503 with ``Retry-After`` beyond it), and a 4xx naming the field for
malformed or over-nested JSON, missing fields, wrong types and empty strings.
"""

# No "from __future__ import annotations" here: Ray Serve pickles the deployment class by value, and FastAPI must
# find the routes' annotations (Request) as objects, not as names to look up in a module the replica never imports.
import asyncio
import hmac
import json
import os
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import Request
from fastapi.responses import JSONResponse

from pipeline import modeling, scoring
from pipeline.config import PipelineConfig

APP_NAME = "normbt-reward-model"
_NO_LIMIT = 1_000_000_000


class RewardService:
    """Rewards of token-id sequences with one exported model (no Ray, no HTTP: the endpoint's core)."""

    def __init__(self, folder: str, *, max_length: int, truncation_side: str, use_gpu: bool = False) -> None:
        self.device = torch.device("cuda" if use_gpu else "cpu")
        # fp32 on CPU whatever dtype the export was saved in: the RewardBench stage scores in fp32 there.
        model, tokenizer = modeling.load_exported(folder, dtype=torch.bfloat16 if use_gpu else torch.float32)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        self.model, self.tokenizer = model.to(self.device).eval(), tokenizer
        # The usable length reads the tokenizer's own model_max_length: read it before lifting it.
        self.max_length = scoring.usable_length(model, tokenizer, max_length)
        tokenizer.model_max_length = _NO_LIMIT  # we truncate ourselves, keeping the end
        self.frame = modeling.text_frame(tokenizer)
        self.truncation_side = truncation_side
        self.pad_id = int(model.config.pad_token_id)
        self.overhead = scoring.FORWARD_OVERHEAD_TOKENS[self.device.type]
        self.max_tokens = scoring.MAX_TOKENS_PER_FORWARD[self.device.type]
        mean, std = getattr(model.config, "reward_mean", None), getattr(model.config, "reward_std", None)
        self.norm = (float(mean), float(std)) if mean is not None and std else None
        # One forward at a time: the fp32 head hook sits on the shared model, and CPU forwards compete for cores.
        self.forward_lock = threading.Lock()

    def cut(self, ids: list[int]) -> tuple[list[int], bool]:
        return modeling.truncate_ids(ids, self.max_length, self.truncation_side), len(ids) > self.max_length

    def encode_texts(self, texts: Sequence[str]) -> list[tuple[list[int], bool]]:
        """Rendered texts as training encodes the conversations they render (:func:`modeling.encode_text`)."""
        return [self.cut(x) for x in modeling.encode_texts(self.tokenizer, texts, self.frame)]

    def encode_conversations(self, conversations: Sequence[Sequence[dict]]) -> list[tuple[list[int], bool]]:
        return [self.cut(x) for x in modeling.encode_batch(self.tokenizer, conversations)]

    def rewards(self, sequences: Sequence[Sequence[int]]) -> np.ndarray:
        """fp32 rewards (as float64), in input order; forwards of similar lengths under a token budget."""
        out = np.zeros(len(sequences), dtype=np.float64)
        lengths = np.array([len(s) for s in sequences], dtype=np.int64)
        for group in scoring.length_groups(lengths, self.overhead, self.max_tokens):
            ids, mask = modeling.pad_batch([sequences[i] for i in group], self.pad_id)
            with self.forward_lock, torch.inference_mode():
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


def texts_of(body: Any, limits: dict[str, int], field: str = "query") -> list[str]:
    """Rendered texts: ``/get_reward``'s ``query`` or LLaMA-Factory's ``messages``, a list of non-empty strings (a
    single string is one text). An empty list is a valid request for no rewards: OpenRLHF sends ``{"query": []}``
    to every server beyond the first when a step has fewer samples than servers."""
    query = _field(body, field)
    texts = [query] if isinstance(query, str) else query
    if not isinstance(texts, list):
        raise BadRequest(f"field {field!r} must be a list of strings")
    if texts:
        _capped(texts, field, limits)
    return [_text(t, f"{field}[{i}]", limits) for i, t in enumerate(texts)]


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


# ------------------------------------------------------------------ HTTP: the routes, with or without Ray Serve


async def read_json(request: Request, max_bytes: int) -> Any:
    """The body as JSON; 413 when it is over ``max_bytes`` (by its Content-Length, or while it streams in, before it
    is held whole), 400 when it is not JSON or nests too deep for the parser."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise BadRequest(f"the body has {int(declared)} bytes; at most {max_bytes}", 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise BadRequest(f"the body has more than {max_bytes} bytes", 413)
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BadRequest(f"the body is not valid JSON: {err}", 400) from None
    except RecursionError:
        raise BadRequest("the body's JSON nests too deep", 400) from None


def token_chunks(sequences: Sequence[Sequence[int]], max_tokens: int) -> list[list[int]]:
    """Consecutive index ranges of ``sequences`` holding at most ``max_tokens`` tokens each (a longer sequence
    alone): the pieces a request is scored in, each one item of the shared batcher."""
    chunks, current, tokens = [], [], 0
    for i, ids in enumerate(sequences):
        if current and tokens + len(ids) > max_tokens:
            chunks.append(current)
            current, tokens = [], 0
        current.append(i)
        tokens += len(ids)
    return chunks + ([current] if current else [])


class RewardAPI:
    """The routes' logic, the same under Ray Serve and in a plain FastAPI app (tests, one process).

    ``score_chunk`` scores one piece of a request (a list of token-id sequences) and returns ``{"rewards": [...]}``
    or ``{"error": message}``; under Serve it is the batched method shared by all callers."""

    def __init__(self, service: RewardService, settings: dict[str, Any], metadata: dict[str, Any],
                 score_chunk: Callable[[list[list[int]]], Awaitable[dict[str, Any]]]) -> None:
        self.service, self.settings, self.info, self.score_chunk = service, settings, metadata, score_chunk
        self.limits = {"max_texts": settings["max_texts"], "max_chars": settings["max_chars"]}

    async def handle(self, route: str, request: Request) -> JSONResponse:
        handlers = {"get_reward": self._get_reward, "evaluation": self._evaluation, "score": self._score,
                    "metadata": self._metadata}
        try:
            self._authorised(request)
            return JSONResponse(await handlers[route](request))
        except BadRequest as err:
            return JSONResponse({"detail": str(err)}, status_code=err.status)

    def _authorised(self, request: Request) -> None:
        token = self.settings.get("token")
        given = request.headers.get("authorization") or ""
        if token and not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise BadRequest("missing or wrong bearer token (Authorization: Bearer <token>)", 401)

    async def _body(self, request: Request) -> Any:
        return await read_json(request, self.settings["max_body_bytes"])

    async def _get_reward(self, request: Request) -> dict[str, Any]:
        texts = texts_of(await self._body(request), self.limits, "query")
        return await self._rewards(await asyncio.to_thread(self.service.encode_texts, texts))

    async def _evaluation(self, request: Request) -> dict[str, Any]:
        texts = texts_of(await self._body(request), self.limits, "messages")
        out = await self._rewards(await asyncio.to_thread(self.service.encode_texts, texts))
        return {"scores": out["rewards"], "truncated": out["truncated"]}

    async def _score(self, request: Request) -> dict[str, Any]:
        conversations = conversations_of(await self._body(request), self.limits)
        try:
            encoded = await asyncio.to_thread(self.service.encode_conversations, conversations)
        except Exception as err:  # noqa: BLE001 - e.g. a chat template refusing a system turn
            raise BadRequest(f"the chat template refused the conversation: {err}") from None
        out = await self._rewards(encoded)
        normalised = self.service.normalised(out["rewards"])
        return {**out, **({"normalized_rewards": normalised} if normalised is not None else {})}

    async def _metadata(self, _request: Request) -> dict[str, Any]:
        return {**self.info, "max_length": self.service.max_length, "normalized": self.service.norm is not None,
                "template_date": modeling.template_date(self.service.tokenizer).isoformat()}

    async def _rewards(self, encoded: list[tuple[list[int], bool]]) -> dict[str, Any]:
        sequences = [ids for ids, _ in encoded]
        tokens = sum(map(len, sequences))
        if tokens > self.settings["max_request_tokens"]:
            raise BadRequest(f"the request encodes to {tokens} tokens; at most "
                             f"{self.settings['max_request_tokens']} per request", 413)
        chunks = token_chunks(sequences, self.settings["max_batch_tokens"])
        results = await asyncio.gather(*(self.score_chunk([sequences[i] for i in c]) for c in chunks))
        failed = [r["error"] for r in results if "error" in r]
        if failed:
            raise BadRequest(f"scoring failed: {failed[0]}", 500)
        return {"rewards": [x for r in results for x in r["rewards"]], "truncated": [t for _, t in encoded]}


ROUTES = (("POST", "/get_reward", "get_reward"), ("POST", "/v1/score/evaluation", "evaluation"),
          ("POST", "/score", "score"), ("GET", "/metadata", "metadata"))


async def score_alone(service: RewardService, chunks: list[list[list[int]]]) -> list[dict[str, Any]]:
    """Rewards of several callers' pieces in one pass off the event loop; if that pass fails (one bad input), each
    piece is scored on its own so that only the failing caller gets the error."""
    flat = [ids for chunk in chunks for ids in chunk]
    try:
        rewards = (await asyncio.to_thread(service.rewards, flat)).tolist()
    except Exception:  # noqa: BLE001 - narrowed below to the piece that fails
        if len(chunks) == 1:
            return [{"error": _error_text(chunks[0], service)}]
        return [(await score_alone(service, [chunk]))[0] for chunk in chunks]
    out, start = [], 0
    for chunk in chunks:
        out.append({"rewards": rewards[start: start + len(chunk)]})
        start += len(chunk)
    return out


def _error_text(chunk: list[list[int]], service: RewardService) -> str:
    try:
        service.rewards(chunk)
    except Exception as err:  # noqa: BLE001 - reported to the one caller whose input failed
        return f"{type(err).__name__}: {err}"
    return "a forward failed"


def plain_app(api: RewardAPI) -> Any:
    """The routes in a FastAPI app of their own, for one process without Ray (tests)."""
    from fastapi import FastAPI

    app = FastAPI(title="NormBT reward model")
    for method, path, route in ROUTES:
        app.add_api_route(path, _route(api, route), methods=[method])
    app.add_api_route("/health", _health, methods=["GET"])
    return app


def _route(api: RewardAPI, route: str) -> Callable[[Request], Awaitable[JSONResponse]]:
    async def endpoint(request: Request) -> JSONResponse:
        return await api.handle(route, request)

    return endpoint


async def _health() -> dict[str, str]:
    return {"status": "ok"}


def build_app(folder: str, settings: dict[str, Any], metadata: dict[str, Any]) -> Any:
    """The Ray Serve application: a FastAPI ingress over :class:`RewardAPI`, pieces of requests batched across
    callers under the token budget, a bounded queue."""
    from fastapi import FastAPI
    from ray import serve

    app = FastAPI(title="NormBT reward model")

    @serve.deployment(num_replicas=settings["num_replicas"], max_ongoing_requests=settings["max_ongoing"],
                      max_queued_requests=settings["max_queued"],
                      backpressure_config={"status_code": 503, "retry_after_s": settings["retry_after_s"]},
                      ray_actor_options={"num_cpus": settings["cpus"], "num_gpus": settings["gpus"]})
    @serve.ingress(app)
    class RewardEndpoint:
        def __init__(self) -> None:
            service = RewardService(replica_folder(folder, settings.get("staged")), max_length=settings["max_length"],
                                    truncation_side=settings["truncation_side"], use_gpu=settings["gpus"] > 0)
            self.api = RewardAPI(service, settings, metadata, self.score_chunk)
            self.score_chunk.set_max_batch_size(max(settings["max_batch_tokens"], service.max_length))
            self.score_chunk.set_batch_wait_timeout_s(settings["batch_wait_ms"] / 1000)

        # One item per piece of a request (never per text): the size function is summed afresh on every append.
        @serve.batch(max_batch_size=8192, batch_wait_timeout_s=0.005,
                     batch_size_fn=lambda chunks: sum(len(ids) for chunk in chunks for ids in chunk))
        async def score_chunk(self, chunks: list[list[list[int]]]) -> list[dict[str, Any]]:
            return await score_alone(self.api.service, chunks)

        @app.post("/get_reward")
        async def get_reward(self, request: Request) -> Any:
            return await self.api.handle("get_reward", request)

        @app.post("/v1/score/evaluation")
        async def evaluation(self, request: Request) -> Any:
            return await self.api.handle("evaluation", request)

        @app.post("/score")
        async def score(self, request: Request) -> Any:
            return await self.api.handle("score", request)

        @app.get("/metadata")
        async def metadata_route(self, request: Request) -> Any:
            return await self.api.handle("metadata", request)

        @app.get("/health")
        async def health(self) -> Any:
            return {"status": "ok"}

    return RewardEndpoint.bind()


# ------------------------------------------------------------------ which model, and where a replica finds it


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


def registry_version(client: Any, uri: str) -> Any:
    """The model version a ``models:/`` URI names: ``name@alias``, ``name/<number>`` or ``name/latest`` (the highest
    version number, as MLflow's own URI resolution reads ``latest``)."""
    name, _, alias = uri.removeprefix("models:/").partition("@")
    if alias:
        return client.get_model_version_by_alias(name, alias)
    name, _, ref = name.partition("/")
    if ref.lower() == "latest":
        versions = client.search_model_versions(f"name = '{name}'")
        if not versions:
            raise FileNotFoundError(f"{uri}: the registry has no version of {name!r}")
        return max(versions, key=lambda v: int(v.version))
    if not ref.isdigit():
        raise FileNotFoundError(f"{uri}: expected models:/<name>@<alias>, models:/<name>/<version> or "
                                f"models:/<name>/latest")
    return client.get_model_version(name, ref)


def _from_registry(cfg: PipelineConfig, uri: str) -> tuple[str, dict[str, Any]]:
    """Download the registered pyfunc and return its reward-model folder (the ``model`` artifact)."""
    import mlflow
    from mlflow import MlflowClient

    from pipeline.tracking import mlflow_globals, resolve_tracking_uri

    tracking_uri = resolve_tracking_uri(cfg)
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    version = registry_version(client, uri)
    # models:/ URIs resolve against the process-wide registry URI, whatever tracking_uri says.
    with mlflow_globals(tracking_uri):
        local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{version.name}/{version.version}")
    folder = next(p.parent for p in Path(local).rglob("config.json") if (p.parent / "model.safetensors").is_file())
    alias = uri.partition("@")[2] or None
    return str(folder), {"registered_model": version.name, "version": str(version.version), "alias": alias,
                         "aliases": sorted(version.aliases), "run_id": version.run_id, "source": uri,
                         "backbone": _backbone(str(folder))}


def _backbone(folder: str) -> str:
    config = json.loads((Path(folder) / "config.json").read_text())
    return str(config.get("_name_or_path") or config.get("model_type") or "unknown")


def stage_model(folder: str, storage: str | None) -> str | None:
    """Copy the model folder to ``<storage>/serve-models/<name>`` (``ray.storage_path``: shared by every node of a
    cluster) and return that URI, so a replica on another node can fetch it; None without a storage path."""
    if not storage:
        return None
    import hashlib

    import pyarrow.fs as pafs

    digest = hashlib.sha256(str(Path(folder).resolve()).encode()).hexdigest()[:16]
    fs, base = pafs.FileSystem.from_uri(storage if "://" in storage else str(Path(storage).resolve()))
    target = f"{base.rstrip('/')}/serve-models/{digest}"
    fs.create_dir(target, recursive=True)
    pafs.copy_files(str(Path(folder).resolve()), target, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)
    return f"{storage.rstrip('/')}/serve-models/{digest}"


def replica_folder(folder: str, staged: str | None) -> str:
    """The model folder as this replica's node sees it: the driver's path when it exists here, else a local copy of
    the staged one (:func:`stage_model`); a clear error when neither can be had."""
    if (Path(folder) / "config.json").is_file():
        return folder
    if not staged:
        raise FileNotFoundError(f"the model folder {folder} does not exist on this node, and no ray.storage_path was "
                                f"set to stage it through (set ray.storage_path to storage every node reaches)")
    import pyarrow.fs as pafs

    local = Path(tempfile.mkdtemp(prefix="normbt-serve-model-"))
    fs, path = pafs.FileSystem.from_uri(staged if "://" in staged else str(Path(staged).resolve()))
    pafs.copy_files(path, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return str(local)


# ------------------------------------------------------------------ start and stop


def settings_of(cfg: PipelineConfig) -> dict[str, Any]:
    s, rb = cfg.serve, cfg.rewardbench
    token = os.environ.get(s.token_env) if s.token_env else None
    return {"num_replicas": s.num_replicas, "cpus": s.cpus_per_replica, "gpus": s.gpus_per_replica,
            "max_batch_tokens": s.max_batch_tokens, "batch_wait_ms": s.batch_wait_ms,
            "max_texts": s.max_texts_per_request, "max_chars": s.max_text_chars, "token": token or None,
            "max_request_tokens": s.max_request_tokens, "max_body_bytes": s.max_body_bytes,
            "max_queued": s.max_queued_requests, "retry_after_s": s.retry_after_s,
            "max_length": rb.max_length, "truncation_side": rb.truncation_side,
            # a replica must be able to hold a whole batch's requests, or batches never fill
            "max_ongoing": max(64, s.max_batch_tokens // 16)}


def start(cfg: PipelineConfig, *, model: str | None = None, host: str | None = None, port: int | None = None) -> str:
    """Deploy the endpoint (Ray as configured: the local cluster by default) and return its URL once it answers."""
    from ray import serve

    from pipeline.raycluster import cluster_nodes, ensure_ray

    folder, metadata = resolve_model(cfg, model)
    host, port = host or cfg.serve.host, port or cfg.serve.port
    ensure_ray(cfg)
    running = serve_http_address()
    if running is not None and running != (host, port):
        raise ServeRunningElsewhere(
            f"Ray Serve already runs on this cluster at http://{running[0]}:{running[1]}; it keeps its address, so "
            f"--host {host} --port {port} would be ignored. Serve there (--host {running[0]} --port {running[1]}) or "
            f"use another cluster")
    serve.start(http_options={"host": host, "port": port})
    # A replica on another node cannot open a driver-local folder: stage a copy where every node reaches.
    staged = stage_model(folder, cfg.ray.storage_path) if cluster_nodes() > 1 else None
    settings = {**settings_of(cfg), "staged": staged}
    serve.run(build_app(folder, settings, metadata), name=APP_NAME, route_prefix="/")
    url = f"http://{host}:{port}"
    wait_until_healthy(url, settings.get("token"))
    return url


class ServeRunningElsewhere(RuntimeError):
    """Ray Serve already listens on another address than the one asked for."""


def serve_http_address() -> tuple[str, int] | None:
    """``(host, port)`` of the Ray Serve HTTP proxy already running on this cluster, or None."""
    from ray.serve.context import _get_global_client

    try:
        client = _get_global_client(raise_if_no_controller_running=False)
    except Exception:  # noqa: BLE001 - no controller: Serve is not running
        return None
    if client is None:
        return None
    options = client.http_config
    return str(options.host), int(options.port)


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
    """Delete this endpoint's app only: other Serve apps on a shared cluster keep running."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        return
    try:
        serve.delete(APP_NAME)
    except Exception as err:  # noqa: BLE001 - already gone, or Serve never started: nothing of ours runs
        print(f"serve: {APP_NAME} not deleted ({type(err).__name__}: {err})", flush=True)
