"""MLflow tracking: one parent run per pipeline run, a nested run per stage, rank-zero only.

Every MLflow call of the project goes through this module, with explicit run ids (``MlflowClient``)
rather than MLflow's global active-run stack, so Ray workers and Tune trials can log into the right
run from any process. Only rank 0 logs: :func:`for_rank` returns a no-op logger elsewhere.

Tracking URI: ``tracking.tracking_uri``, else ``MLFLOW_TRACKING_URI``, else a local SQLite store under
the run root (the model registry needs a database). Credentials (``MLFLOW_TRACKING_USERNAME`` /
``_PASSWORD`` / ``_TOKEN``, ``HF_TOKEN``) come from the environment only; URIs are redacted before
they reach params, tags or logs.

A tracking server that goes away must not stop training. Every logging call (metrics, params, tags,
artifacts, datasets, a run's end) made while the server cannot be reached (its ``/health`` gives no answer within
``HEALTH_TIMEOUT_S``, or the call fails to get through) is appended to a spool file in the run directory
(``tracking_spool.jsonl``) and sent, in order and with its own timestamps, by the next call that gets through, by
the next stage, or by the next run of the same command; the runs it reaches get ``tracking.outage`` and
``tracking.spooled_calls`` tags saying so. After a failure the server is left alone for 10 s, doubling up to 1 min. Creating a run (the pipeline's, a stage's,
a trial's) cannot be deferred: it waits up to ``tracking.wait_s`` for the server, then stops with
:class:`TrackingUnavailable`, leaving finished stages done for the rerun.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

from pipeline.config import PipelineConfig, flatten, plain

_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")
_SECRET_KEY = re.compile(r"token|secret|password|passwd|api[_-]?key|credential", re.IGNORECASE)
PARENT_TAG = "mlflow.parentRunId"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
SPOOL_NAME = "tracking_spool.jsonl"
# After a server was found unreachable, calls go straight to the spool for this long, doubling with each failure
# in a row up to MAX_RETRY_AFTER_S: a training step must not wait on a server that was down a moment ago.
RETRY_AFTER_S = 10.0
MAX_RETRY_AFTER_S = 60.0
HEALTH_TIMEOUT_S = 5.0
# MLflow's REST client retries a refused connection 7 times over about 4 minutes (for rate limits), and its retry
# settings are process environment, which cannot be changed per call while other threads run. So a server is
# asked first, with a short timeout, whether it answers at all; only then does the call go to MLflow.
_FAILURES: dict[str, tuple[float, int]] = {}  # uri -> (when it was last found unreachable, failures in a row)
_STATE_LOCK = threading.Lock()


class TrackingUnavailable(RuntimeError):
    """The MLflow server could not be reached for something that cannot wait for it (creating a run)."""


def is_outage(err: BaseException) -> bool:
    """True when ``err`` says the server could not be reached (refused, reset, timed out, or 5xx after MLflow's
    retries), not that it answered about the request (a 4xx: wrong credentials, a deleted run)."""
    import requests

    if isinstance(err, (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError,
                        TimeoutError)):
        return True
    text = str(err)  # MLflow's REST client wraps transport failures as "failed with [timeout] exception"
    return text.startswith("API request to ") and ("failed with exception" in text
                                                   or "failed with timeout exception" in text)


def answers(uri: str) -> bool:
    """Whether an HTTP tracking server answers at all (any HTTP status counts), asked with a short timeout before
    every call (one round trip; a server that died a second ago must not cost MLflow's minutes of retries); other
    stores (SQLite, files) always count as answering."""
    import urllib.error
    import urllib.request

    if not uri.startswith(("http://", "https://")):
        return True
    try:  # the URI's user:password@ stays out: urllib cannot take it, and it must not reach a log
        urllib.request.urlopen(_USERINFO.sub(r"\g<scheme>", uri).rstrip("/") + "/health",  # noqa: S310
                               timeout=HEALTH_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        pass  # it answered (an auth proxy's 401, a hosted MLflow without /health)
    except (urllib.error.URLError, OSError):
        return False
    return True


def _down(uri: str) -> None:
    with _STATE_LOCK:
        _, streak = _FAILURES.get(uri, (0.0, 0))
        _FAILURES[uri] = (time.time(), streak + 1)


def _up(uri: str) -> None:
    with _STATE_LOCK:
        _FAILURES.pop(uri, None)


def _resting(uri: str) -> bool:
    """True while the server was found unreachable too recently to ask again."""
    when, streak = _FAILURES.get(uri, (0.0, 0))
    return streak > 0 and time.time() - when < min(MAX_RETRY_AFTER_S, RETRY_AFTER_S * 2 ** (streak - 1))


def redact(value: Any) -> Any:
    """Strip ``user:password@`` from URIs inside strings (and nested lists/dicts)."""
    if isinstance(value, str):
        return _USERINFO.sub(r"\g<scheme>***@", value)
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    if isinstance(value, dict):
        return {k: ("***" if _SECRET_KEY.search(str(k)) else redact(v)) for k, v in value.items()}
    return value


def params_of(cfg: PipelineConfig) -> dict[str, str]:
    """``flatten(cfg)`` as MLflow params: redacted, stringified, capped at MLflow's value length."""
    out = {}
    for key, value in flatten(cfg).items():
        value = redact(plain(value))
        text = json.dumps(value, default=str) if isinstance(value, (list, dict)) else str(value)
        out[key] = text if len(text) <= 6000 else text[:5990] + "...(cut)"
    return out


def resolve_tracking_uri(cfg: PipelineConfig) -> str:
    uri = cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    root = Path(cfg.run.root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


class RunLogger:
    """Logs into one MLflow run by id. Cheap to pickle: Ray workers rebuild the client lazily.

    ``spool``: the file that keeps calls the server could not take (None: such a call raises);
    ``wait_s``: how long creating a child run waits for an unreachable server; ``parent_id``: the run this one
    is nested in, when this logger created it."""

    spool: str | None = None
    wait_s: float = 300.0
    parent_id: str | None = None

    def __init__(self, uri: str | None, run_id: str | None, spool: str | Path | None = None,
                 wait_s: float = 300.0, parent_id: str | None = None) -> None:
        self.uri, self.run_id = uri, run_id
        self.spool = str(spool) if spool else None
        self.wait_s = wait_s
        self.parent_id = parent_id
        self._client = None

    @property
    def active(self) -> bool:
        return bool(self.uri and self.run_id)

    def __getstate__(self) -> dict:
        return {"uri": self.uri, "run_id": self.run_id, "spool": self.spool, "wait_s": self.wait_s,
                "parent_id": self.parent_id, "_client": None}

    @property
    def client(self):
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if not self.active or not metrics:
            return
        stamp = int(time.time() * 1000)
        rows = [[_key(k), float(v), stamp, step or 0] for k, v in metrics.items() if _finite_number(v)]
        self._send("metrics", {"rows": rows})

    def log_params(self, params: Mapping[str, Any]) -> None:
        if not self.active or not params:
            return
        items = [[_key(k), str(redact(v))[:6000]] for k, v in params.items()]
        for i in range(0, len(items), 90):  # log_batch accepts at most 100 params per call
            self._send("params", {"rows": items[i: i + 90]})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if not self.active or not tags:
            return
        self._send("tags", {"tags": {k: str(redact(v)) for k, v in tags.items()}})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if not self.active or not Path(path).exists():
            return
        self._send("artifact", {"path": str(Path(path).resolve()), "artifact_path": artifact_path})

    def log_datasets(self, records: list[Mapping[str, Any]]) -> None:
        """Dataset inputs of the run (the UI's Dataset column and the model's lineage): one per record with
        ``name, digest, source, source_type, schema, profile, context`` (see the data stage's datasets.json)."""
        if not self.active or not records:
            return
        self._send("datasets", {"records": [dict(r) for r in records]})

    def child(self, name: str, tags: Mapping[str, str] | None = None) -> "RunLogger":
        """A nested run under this one (per stage, per Tune trial); waits up to ``wait_s`` for the server."""
        if not self.active:
            return RunLogger(None, None)

        def create() -> str:
            parent = self.client.get_run(self.run_id)
            return self.client.create_run(parent.info.experiment_id, run_name=name,
                                          tags={PARENT_TAG: self.run_id, **(tags or {})}).info.run_id

        run_id = wait_for_server(self.uri, create, f"create the MLflow run {name!r}", self.wait_s, self.spool)
        child = RunLogger(self.uri, run_id, self.spool, self.wait_s, parent_id=self.run_id)
        child.flush()  # calls an earlier outage kept: they go now that the server answers
        return child

    def finish(self, status: str = "FINISHED") -> None:
        if self.active:
            self._send("end", {"status": status})

    def pending(self) -> int:
        """How many calls wait in the spool (all runs')."""
        return _count_lines(self.spool)

    def flush(self) -> bool:
        """Send the spooled calls, oldest first; True when none is left."""
        if not self.active or not self.pending():
            return True
        return replay(self.uri, self.spool)

    def _send(self, op: str, payload: dict) -> None:
        """One call, or into the spool when the server cannot be reached (kept in order behind older ones)."""
        record = {"run_id": self.run_id, "op": op, "payload": payload, "at": time.time()}
        if self.spool is None:
            _OPS[op](self.client, self.run_id, payload)
            return
        if _resting(self.uri) or not self.flush():
            _append(self.spool, record)
            return
        try:
            if not answers(self.uri):
                raise ConnectionError(f"no answer from {redact(self.uri)}/health within {HEALTH_TIMEOUT_S:.0f}s")
            _OPS[op](self.client, self.run_id, payload)
        except Exception as err:
            if not is_outage(err):
                raise
            first = self.uri not in _FAILURES
            _down(self.uri)
            _append(self.spool, record)
            if first:
                print(f"MLflow at {redact(self.uri)} is unreachable ({_short(err)}): logging calls are kept in "
                      f"{self.spool} and sent when it answers again", file=sys.stderr, flush=True)


def _log_metrics(client: Any, run_id: str, payload: dict) -> None:
    from mlflow.entities import Metric

    client.log_batch(run_id, metrics=[Metric(k, v, t, s) for k, v, t, s in payload["rows"]], synchronous=True)


def _log_params(client: Any, run_id: str, payload: dict) -> None:
    from mlflow.entities import Param

    client.log_batch(run_id, params=[Param(k, v) for k, v in payload["rows"]], synchronous=True)


def _set_tags(client: Any, run_id: str, payload: dict) -> None:
    for k, v in payload["tags"].items():
        client.set_tag(run_id, k, v)


def _log_artifact(client: Any, run_id: str, payload: dict) -> None:
    path = Path(payload["path"])
    if path.is_dir():
        client.log_artifacts(run_id, str(path), payload["artifact_path"])
    elif path.is_file():
        client.log_artifact(run_id, str(path), payload["artifact_path"])
    else:  # replayed after the file went: said, never silently skipped
        raise FileNotFoundError(f"artifact {path} no longer exists")


def _log_datasets(client: Any, run_id: str, payload: dict) -> None:
    from mlflow.entities import Dataset, DatasetInput, InputTag

    inputs = [DatasetInput(Dataset(name=r["name"], digest=r["digest"], source_type=r["source_type"],
                                   source=json.dumps({"uri": redact(r["source"])}), schema=json.dumps(r["schema"]),
                                   profile=json.dumps(r["profile"])),
                           tags=[InputTag("mlflow.data.context", r["context"])]) for r in payload["records"]]
    client.log_inputs(run_id, datasets=inputs)


def _end_run(client: Any, run_id: str, payload: dict) -> None:
    client.set_terminated(run_id, status=payload["status"])


_OPS = {"metrics": _log_metrics, "params": _log_params, "tags": _set_tags, "artifact": _log_artifact,
        "datasets": _log_datasets, "end": _end_run}


def _short(err: BaseException) -> str:
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    return text if len(text) <= 200 else text[:197] + "..."


@contextmanager
def _locked(spool: str) -> Iterator[None]:
    """The spool's lock (a file beside it): the driver, Tune trials in threads and train workers share the spool."""
    Path(spool).parent.mkdir(parents=True, exist_ok=True)
    with open(spool + ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes
        yield


def _append(spool: str, record: dict) -> None:
    with _locked(spool), open(spool, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def _count_lines(spool: str | None) -> int:
    if not spool or not Path(spool).is_file():
        return 0
    with open(spool) as handle:
        return sum(1 for line in handle if line.strip())


def _reject(spool: str, rejected: list[dict]) -> None:
    """Calls the server refused for another reason than being down: kept beside the spool, said on stderr."""
    if not rejected:
        return
    with open(spool + ".rejected.jsonl", "a") as out:
        out.writelines(json.dumps(r) + "\n" for r in rejected)
    print(f"MLflow refused {len(rejected)} spooled call(s); they are kept in {spool}.rejected.jsonl with the error",
          file=sys.stderr, flush=True)


def replay(uri: str, spool: str, force: bool = False) -> bool:
    """Send a spool's calls in order until one fails to get through; keep the rest (rewritten whole, never cut
    short: a kill mid-replay sends at most one call twice). Calls the server refuses for another reason (a deleted
    run, a vanished file) and lines that do not parse go to ``<spool>.rejected.jsonl``. Every run reached gets
    tags saying an outage happened. True when nothing is left. ``force``: ask the server even while resting."""
    if _resting(uri) and not force:
        return False
    if not answers(uri):
        _down(uri)
        return False
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    with _locked(spool):
        lines = Path(spool).read_text().splitlines() if Path(spool).is_file() else []
        sent, rejected, reached = 0, [], {}
        try:
            for line in lines:
                try:
                    record = json.loads(line) if line.strip() else None
                except json.JSONDecodeError as err:  # a line cut by a kill or a full disk
                    rejected.append({"line": line, "error": f"unreadable spool line: {err}"})
                    record = None
                if record is not None:
                    try:
                        _OPS[record["op"]](client, record["run_id"], record["payload"])
                        reached.setdefault(record["run_id"], [record["at"], 0])[1] += 1
                    except Exception as err:
                        if is_outage(err):
                            raise
                        rejected.append({**record, "error": _short(err)})
                sent += 1
        except Exception as err:
            if not is_outage(err):
                raise
            _down(uri)
        finally:
            tmp = spool + ".tmp"
            Path(tmp).write_text("".join(line + "\n" for line in lines[sent:] if line.strip()))
            os.replace(tmp, spool)
            _reject(spool, rejected)
    if sent == len(lines):
        _up(uri)
        _mark_outages(client, reached, spool)
    return sent == len(lines)


def _mark_outages(client: Any, reached: Mapping[str, list], spool: str) -> None:
    """Tags on each run a replay reached: when its first kept call was made, when it was sent, how many so far.
    Best effort: a run that cannot take a tag does not undo the replay."""
    sent_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for run_id, (first_at, count) in reached.items():
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(first_at))
        try:
            before = client.get_run(run_id).data.tags.get("tracking.spooled_calls", "0")
            client.set_tag(run_id, "tracking.spooled_calls", str(int(before) + count))
            client.set_tag(run_id, "tracking.outage", f"server unreachable from {since}; {count} call(s) kept in "
                                                      f"{spool} and sent at {sent_at}")
        except Exception as err:  # noqa: BLE001 - said, not raised: the calls themselves went
            print(f"MLflow run {run_id}: could not tag the outage ({_short(err)})", file=sys.stderr, flush=True)


def wait_for_server(uri: str, call: Any, what: str, wait_s: float, spool: str | None) -> Any:
    """``call()``, retried while the server cannot be reached, for up to ``wait_s``; then TrackingUnavailable."""
    deadline = time.time() + wait_s
    while True:
        try:
            if not answers(uri):
                raise ConnectionError(f"no answer from {redact(uri)}/health within {HEALTH_TIMEOUT_S:.0f}s")
            return call()
        except Exception as err:
            if not is_outage(err):
                raise
            _down(uri)
            if time.time() >= deadline:
                kept = _count_lines(spool)
                raise TrackingUnavailable(
                    f"the MLflow server {redact(uri)} did not answer for {wait_s:.0f}s (tracking.wait_s) when trying "
                    f"to {what}: {_short(err)}. Finished stages stay done"
                    + (f"; {kept} logging call(s) are kept in {spool} and go when it answers" if kept else "")
                    + ". Rerun the same command when the server is back (or set tracking.enabled=false)") from err
            time.sleep(min(5.0, max(0.0, deadline - time.time())))


def _key(key: str) -> str:
    # MLflow keys allow alphanumerics, _ - . space / only.
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", key)


def _finite_number(v: Any) -> bool:
    try:
        return float(v) == float(v) and abs(float(v)) != float("inf")
    except (TypeError, ValueError):
        return False


def for_rank(rank: int, uri: str | None, run_id: str | None, spool: str | None = None) -> RunLogger:
    """The single place that decides who logs: rank 0 gets a live logger, other ranks a no-op."""
    return RunLogger(uri, run_id, spool) if rank == 0 else RunLogger(None, None)


def start_pipeline_run(cfg: PipelineConfig, run_dir: Path) -> RunLogger:
    """The parent run of this pipeline run: reused from ``run.json`` on a rerun, so a resumed run keeps
    one history. If the caller already has an active MLflow run (a notebook, an outer job), the
    pipeline's run is nested under it instead of clobbering it."""
    if not cfg.tracking.enabled:
        return RunLogger(None, None)
    import mlflow
    from mlflow import MlflowClient

    uri = resolve_tracking_uri(cfg)
    outer = mlflow.active_run()
    spool = str(Path(run_dir).resolve() / SPOOL_NAME)

    def start() -> tuple[str, bool]:
        # what an earlier run of this command could not send goes first, in order (its run's end included)
        if _count_lines(spool) and not replay(uri, spool, force=True):
            raise ConnectionError(f"the calls kept in {spool} could not be sent")
        return _start_pipeline_run(cfg, run_dir, uri, MlflowClient(tracking_uri=uri), outer)

    with _first_use_lock(uri):
        run_id, created = wait_for_server(uri, start, "start the pipeline's MLflow run", cfg.tracking.wait_s, spool)
    logger = RunLogger(uri, run_id, spool, cfg.tracking.wait_s)
    if created:
        logger.log_params(params_of(cfg))
    return logger


def _start_pipeline_run(cfg: PipelineConfig, run_dir: Path, uri: str, client: Any, outer: Any) -> tuple[str, bool]:
    """The pipeline's run id, and whether it was created now (its params still to log)."""
    state_file = Path(run_dir) / "run.json"
    if state_file.is_file():
        run_id = json.loads(state_file.read_text()).get("mlflow_run_id")
        if run_id and _run_exists(client, run_id):
            client.update_run(run_id, status="RUNNING")
            return run_id, False
    experiment = client.get_experiment_by_name(cfg.tracking.experiment_name)
    exp_id = experiment.experiment_id if experiment else client.create_experiment(cfg.tracking.experiment_name)
    if experiment is None or EXPERIMENT_KIND_TAG not in experiment.tags:
        # MLflow 3's UI opens an experiment in its GenAI (traces) view unless told it is model development
        client.set_experiment_tag(exp_id, EXPERIMENT_KIND_TAG, "custom_model_development")
    tags = {"pipeline.run_dir": str(run_dir)}
    if outer is not None:
        tags[PARENT_TAG] = outer.info.run_id
    run = client.create_run(exp_id, run_name=cfg.run.name, tags=tags)
    state_file.parent.mkdir(parents=True, exist_ok=True)  # at once: a retry after an outage must find this run
    state_file.write_text(json.dumps({"mlflow_run_id": run.info.run_id, "tracking_uri": redact(uri)}))
    return run.info.run_id, True


@contextmanager
def _first_use_lock(uri: str) -> Iterator[None]:
    """Pipelines started together on one machine share the default SQLite store: the first MLflow call of
    each creates or migrates its tables (alembic), and two at once fail ("Online migration expected to match
    one row"); two may also both find no experiment and both create it. A lock file beside the database
    makes them take turns for that first use; a server or any other store needs none."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    lock_path = Path(uri.removeprefix("sqlite:///")).with_suffix(".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield


def _run_exists(client: Any, run_id: str) -> bool:
    try:
        client.get_run(run_id)
        return True
    except Exception as err:  # a missing run or a wiped store both mean "start a new one"
        if is_outage(err):  # but a server that does not answer says nothing about the run: a second run would duplicate it
            raise
        return False


@contextmanager
def ended(run: RunLogger) -> Iterator[RunLogger]:
    """``run`` (one stage attempt's) ends FINISHED, or FAILED if the block raises."""
    try:
        yield run
    except BaseException:
        run.finish("FAILED")
        raise
    run.finish("FINISHED")


@contextmanager
def mlflow_globals(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API (tracking + registry URI, no active experiment) at ``uri``; restore after.

    The pipeline otherwise never touches MLflow's globals; ``log_model`` only works through them. The
    setters also write ``MLFLOW_TRACKING_URI`` / ``MLFLOW_REGISTRY_URI``, restored exactly too, as is the
    code model MLflow keeps after executing this file. (Private MLflow 3.17 attributes: checked by the tests.)"""
    import mlflow
    from mlflow.models import model as model_module
    from mlflow.tracking import fluent
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    env_keys = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_ID")
    saved_env = {k: os.environ.get(k) for k in env_keys}
    saved = (tracking_utils._tracking_uri, registry_utils._registry_uri, fluent._active_experiment_id,
             model_module.__dict__.get("__mlflow_model__"))  # set_model() of a code model (the registered pyfunc's file) lands here
    try:
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        fluent._active_experiment_id = None  # start_run(run_id=...) rejects a run of another active experiment
        yield
    finally:
        mlflow.set_tracking_uri(saved[0])
        registry_utils._registry_uri = saved[1]
        fluent._active_experiment_id = saved[2]
        model_module.__dict__["__mlflow_model__"] = saved[3]
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
