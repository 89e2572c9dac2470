"""MLflow tracking: one parent run per pipeline run, a nested run per stage, rank-zero only.

Every MLflow call of the project goes through this module, with explicit run ids (``MlflowClient``)
rather than MLflow's global active-run stack, so Ray workers and Tune trials can log into the right
run from any process. Only rank 0 logs: :func:`for_rank` returns a no-op logger elsewhere.

Tracking URI: ``tracking.tracking_uri``, else ``MLFLOW_TRACKING_URI``, else a local SQLite store under
the run root (the model registry needs a database). Credentials (``MLFLOW_TRACKING_USERNAME`` /
``_PASSWORD`` / ``_TOKEN``, ``HF_TOKEN``) come from the environment only; URIs are redacted before
they reach params, tags or logs.
"""

from __future__ import annotations

import json
import os
import re
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

from pipeline.config import PipelineConfig, flatten, plain

_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")
_SECRET_KEY = re.compile(r"token|secret|password|passwd|api[_-]?key|credential", re.IGNORECASE)
PARENT_TAG = "mlflow.parentRunId"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"


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
    """Logs into one MLflow run by id. Cheap to pickle: Ray workers rebuild the client lazily."""

    def __init__(self, uri: str | None, run_id: str | None) -> None:
        self.uri, self.run_id = uri, run_id
        self._client = None

    @property
    def active(self) -> bool:
        return bool(self.uri and self.run_id)

    def __getstate__(self) -> dict:
        return {"uri": self.uri, "run_id": self.run_id, "_client": None}

    @property
    def client(self):
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if not self.active or not metrics:
            return
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        batch = [Metric(_key(k), float(v), stamp, step or 0) for k, v in metrics.items() if _finite_number(v)]
        self.client.log_batch(self.run_id, metrics=batch, synchronous=True)

    def log_params(self, params: Mapping[str, Any]) -> None:
        if not self.active or not params:
            return
        from mlflow.entities import Param

        items = [Param(_key(k), str(redact(v))[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 90):  # log_batch accepts at most 100 params per call
            self.client.log_batch(self.run_id, params=items[i: i + 90], synchronous=True)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if not self.active:
            return
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(redact(v)))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if not self.active:
            return
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        elif path.is_file():
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_datasets(self, records: list[Mapping[str, Any]]) -> None:
        """Dataset inputs of the run (the UI's Dataset column and the model's lineage): one per record with
        ``name, digest, source, source_type, schema, profile, context`` (see the data stage's datasets.json)."""
        if not self.active or not records:
            return
        from mlflow.entities import Dataset, DatasetInput, InputTag

        inputs = [DatasetInput(Dataset(name=r["name"], digest=r["digest"], source_type=r["source_type"],
                                       source=json.dumps({"uri": redact(r["source"])}), schema=json.dumps(r["schema"]),
                                       profile=json.dumps(r["profile"])),
                               tags=[InputTag("mlflow.data.context", r["context"])]) for r in records]
        self.client.log_inputs(self.run_id, datasets=inputs)

    def child(self, name: str, tags: Mapping[str, str] | None = None) -> "RunLogger":
        """A nested run under this one (per stage, per Tune trial)."""
        if not self.active:
            return RunLogger(None, None)
        parent = self.client.get_run(self.run_id)
        run = self.client.create_run(parent.info.experiment_id, run_name=name,
                                     tags={PARENT_TAG: self.run_id, **(tags or {})})
        return RunLogger(self.uri, run.info.run_id)

    def finish(self, status: str = "FINISHED") -> None:
        if self.active:
            self.client.set_terminated(self.run_id, status=status)


def _key(key: str) -> str:
    # MLflow keys allow alphanumerics, _ - . space / only.
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", key)


def _finite_number(v: Any) -> bool:
    try:
        return float(v) == float(v) and abs(float(v)) != float("inf")
    except (TypeError, ValueError):
        return False


def for_rank(rank: int, uri: str | None, run_id: str | None) -> RunLogger:
    """The single place that decides who logs: rank 0 gets a live logger, other ranks a no-op."""
    return RunLogger(uri, run_id) if rank == 0 else RunLogger(None, None)


def start_pipeline_run(cfg: PipelineConfig, run_dir: Path) -> RunLogger:
    """The parent run of this pipeline run: reused from ``run.json`` on a rerun, so a resumed run keeps
    one history. If the caller already has an active MLflow run (a notebook, an outer job), the
    pipeline's run is nested under it instead of clobbering it."""
    if not cfg.tracking.enabled:
        return RunLogger(None, None)
    import mlflow
    from mlflow import MlflowClient

    uri = resolve_tracking_uri(cfg)
    with _first_use_lock(uri):
        return _start_pipeline_run(cfg, run_dir, uri, MlflowClient(tracking_uri=uri), mlflow.active_run())


def _start_pipeline_run(cfg: PipelineConfig, run_dir: Path, uri: str, client: Any, outer: Any) -> RunLogger:
    state_file = Path(run_dir) / "run.json"
    if state_file.is_file():
        run_id = json.loads(state_file.read_text()).get("mlflow_run_id")
        if run_id and _run_exists(client, run_id):
            client.update_run(run_id, status="RUNNING")
            return RunLogger(uri, run_id)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment_name)
    exp_id = experiment.experiment_id if experiment else client.create_experiment(cfg.tracking.experiment_name)
    if experiment is None or EXPERIMENT_KIND_TAG not in experiment.tags:
        # MLflow 3's UI opens an experiment in its GenAI (traces) view unless told it is model development
        client.set_experiment_tag(exp_id, EXPERIMENT_KIND_TAG, "custom_model_development")
    tags = {"pipeline.run_dir": str(run_dir)}
    if outer is not None:
        tags[PARENT_TAG] = outer.info.run_id
    run = client.create_run(exp_id, run_name=cfg.run.name, tags=tags)
    logger = RunLogger(uri, run.info.run_id)
    logger.log_params(params_of(cfg))
    state_file.parent.mkdir(parents=True, exist_ok=True)
    state_file.write_text(json.dumps({"mlflow_run_id": run.info.run_id, "tracking_uri": redact(uri)}))
    return logger


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
    except Exception:  # noqa: BLE001 - a missing run or a wiped store both mean "start a new one"
        return False


@contextmanager
def stage_run(parent: RunLogger, stage: str, cfg_hash: str) -> Iterator[RunLogger]:
    """A nested run for one stage attempt; marked FAILED if the stage raises."""
    run = parent.child(stage, tags={"pipeline.stage": stage, "pipeline.hash": cfg_hash})
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
