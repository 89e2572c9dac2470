"""Register stage: log the final reward model to MLflow as a pyfunc, register it, promote it by score, write the report.

Entry: :func:`register_model` (stage ``register``; needs ``train``, uses ``data``, ``tune``, ``rewardbench``,
``best_of_n`` when present).

The logged model
    ``mlflow.pyfunc.log_model(name="reward_model", python_model=pipeline/pyfunc_model.py, artifacts={"model":
    <train's model folder>})`` in the stage's MLflow run (:mod:`pipeline.pyfunc_model` says what ``predict``
    does; a loaded model never needs this project). Signature, a two-row input example and explicit
    ``pip_requirements`` (torch, transformers, mlflow) are logged with it.

Registry (when ``tracking.enabled``)
    The model is registered under ``tracking.registered_model_name`` and awaited until READY. The new
    version gets alias ``candidate``, and also ``champion`` when its score beats the current champion's
    (strictly) or there is no champion. The score is the RewardBench metric ``rewardbench.score_metric``
    (``rewardbench/<benchmark>/<metric>``; default the first benchmark's ``overall``), else the train stage's
    final ``train/val_accuracy``. Scores are
    compared only under the same ``score_metric``: a champion scored by another metric, or without a
    score, is kept (the ``decision_reason`` tag says why; move the alias by hand to override). Version
    tags: ``score_metric``, ``score``, ``previous_champion_version``, ``previous_champion_score``,
    ``decision`` (``promoted`` | ``kept previous champion``), ``decision_reason``, ``source_run_id``.

Outputs (manifest names → files in the stage folder):

* ``model_uri`` — ``registry.json``: ``{"registered": true, "registered_model", "version", "uri":
  "models:/<name>/<version>", "aliases", "score_metric", "score", "decision", ...}``; with tracking off
  ``{"registered": false, "reason", "model_dir", ...}``;
* ``report`` — ``report.md`` and ``report_html`` — ``report.html`` (:func:`pipeline.report.write_report`),
  also logged as artifacts (folder ``report``) of the stage run and the pipeline's parent run.

Metrics: ``register/version``, ``register/score``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import pandas as pd
import torch

from pipeline import pyfunc_model
from pipeline.pyfunc_model import PairScorer

if TYPE_CHECKING:
    from pipeline.artifacts import Manifest
    from pipeline.stage import StageContext, StageResult

MODEL_ARTIFACT = "reward_model"
CANDIDATE, CHAMPION = "candidate", "champion"
PROMOTED, KEPT = "promoted", "kept previous champion"
_READY_TIMEOUT_S = 300.0


# ============================================================================ the stage


def register_model(ctx: StageContext) -> StageResult:
    """Stage entry (module docstring): log + register + promote, then write and log the report."""
    from pipeline.artifacts import write_json
    from pipeline.report import write_report
    from pipeline.stage import StageResult

    cfg = ctx.cfg
    model_dir = Path(ctx.upstream["train"].output("model"))
    metric, score = select_score(ctx.upstream, cfg.rewardbench.score_metric)
    ctx.log(f"  register: score {metric} = {_show(score)}")
    if cfg.tracking.enabled and ctx.tracker.active:
        record = log_and_register(ctx, registrable_folder(ctx, model_dir), metric, score)
        ctx.log(f"  register: {record['uri']} aliases {record['aliases']} ({record['decision']}: "
                f"{record['decision_reason']})")
    else:
        reason = "tracking.enabled is false" if not cfg.tracking.enabled else "no MLflow run for this stage"
        ctx.log(f"  register: model NOT registered ({reason}); writing the report only")
        record = {"registered": False, "reason": reason, "registered_model": None, "version": None, "uri": None,
                  "aliases": [], "model_dir": str(model_dir), "score_metric": metric, "score": score}
    registry = write_json(ctx.out_dir / "registry.json", record)
    md_path, html_path = write_report(ctx.run_dir, cfg, dict(ctx.upstream), ctx.out_dir, registry=record,
                                      tracking_uri=ctx.tracker.uri)
    _log_report(ctx, [registry, md_path, html_path, md_path.parent / "report_files"])
    metrics: dict[str, Any] = {}
    if record.get("version") is not None:
        metrics["register/version"] = int(record["version"])
    if score is not None:
        metrics["register/score"] = score
    return StageResult(outputs={"model_uri": str(registry), "report": str(md_path), "report_html": str(html_path)},
                       metrics=metrics)


def select_score(upstream: Mapping[str, Manifest], metric: str = "") -> tuple[str, float | None]:
    """``(score_metric, score)``: the RewardBench stage's metric ``metric`` (``<benchmark>/<key>`` as logged, e.g.
    ``rmbench/hard``) when given, else the first benchmark's overall; without a RewardBench score, train's final
    val_accuracy. A named metric the stage did not log is an error (a promotion must not silently fall back)."""
    bench = upstream.get("rewardbench")
    if bench is None and metric:
        raise ValueError(f"rewardbench.score_metric={metric!r} but the rewardbench stage has not run (add it to "
                         "run.stages, or unset rewardbench.score_metric to promote on train/val_accuracy)")
    if bench is not None and metric:
        value = _number(bench.metrics.get(metric))
        if value is None:
            logged = sorted(k for k in bench.metrics if k.endswith("/overall"))
            raise ValueError(f"rewardbench.score_metric {metric!r}: not among the RewardBench stage's metrics "
                             f"(overall scores logged: {logged})")
        return f"rewardbench/{metric}", value
    if bench is not None and "metrics" in bench.outputs:
        path = bench.outputs["metrics"]
        name = next((k[: -len("/metrics")] for k, v in bench.outputs.items()
                     if k.endswith("/metrics") and v == path), "rewardbench")
        overall = _number(_read_json(path).get("overall"))
        if overall is not None:
            return f"rewardbench/{name}/overall", overall
    train = upstream.get("train")
    if train is not None and "metrics" in train.outputs:
        value = _number(_read_json(train.outputs["metrics"]).get("final", {}).get("val_accuracy"))
        if value is not None:
            return "train/val_accuracy", value
    return "none", None


def decide(metric: str, score: float | None, champion: Any | None) -> dict[str, str]:
    """Version tags of the promotion decision; ``champion`` is the current champion's ModelVersion (or None)."""
    tags = {"score_metric": metric, "score": _show(score), "previous_champion_version": "none",
            "previous_champion_score": "none"}
    if champion is None:
        return {**tags, "decision": PROMOTED, "decision_reason": "no champion yet"}
    old_metric = champion.tags.get("score_metric", "none")
    old_score = _number(champion.tags.get("score"))
    tags.update(previous_champion_version=str(champion.version), previous_champion_score=_show(old_score))
    if score is None:
        reason = "this version has no score"
    elif old_score is None or old_metric != metric:
        reason = (f"not comparable: champion v{champion.version} scored by {old_metric} "
                  f"({_show(old_score)}), this version by {metric}")
    elif score > old_score:
        return {**tags, "decision": PROMOTED,
                "decision_reason": f"{metric} {_show(score)} > {_show(old_score)} of v{champion.version}"}
    else:
        reason = f"{metric} {_show(score)} <= {_show(old_score)} of v{champion.version}"
    return {**tags, "decision": KEPT, "decision_reason": reason}


def pip_requirements() -> list[str]:
    import transformers

    # The public version: a local tag (2.13.0+cpu) does not resolve on PyPI.
    return [f"torch=={torch.__version__.split('+')[0]}", f"transformers=={transformers.__version__}",
            f"mlflow=={mlflow.__version__}"]


def input_example() -> pd.DataFrame:
    return pd.DataFrame({"prompt": ["What is 6 times 7?", "Name a primary colour."],
                         "response": ["6 times 7 is 42.", "Red is a primary colour."]})


def registrable_folder(ctx: StageContext, model_dir: Path) -> Path:
    """The folder the registry logs: the export itself, or for a LoRA adapter export (``lora.export=adapter``) the
    adapter merged into its base model beside it (``model_merged/``), so the registered model, its pyfunc and
    serving need neither PEFT nor the base model's path."""
    from pipeline import lora, modeling

    if not lora.is_adapter_export(model_dir):
        return model_dir
    merged = ctx.out_dir / "model_merged"
    tok = modeling.load_tokenizer(str(model_dir))
    modeling.save_reward_model(lora.load_adapter_export(model_dir), tok, merged)
    ctx.log(f"  register: LoRA adapter export merged into {merged} for the registry")
    return merged


def lora_line(used: Mapping[str, Any], final: Mapping[str, Any]) -> str:
    """The version description's line on how many parameters trained: LoRA's r, alpha, targets, or full."""
    counts = ""
    if "params/trainable" in final and "params/total" in final:
        trainable, total = int(final["params/trainable"]), int(final["params/total"])
        counts = f"; {trainable:,} of {total:,} parameters trained ({100 * trainable / max(total, 1):.2f}%)"
    if int(used.get("lora.r", 0) or 0) > 0:
        targets = used.get("lora.target_modules") or "()"
        targets = "the architecture's default" if targets in ("()", "[]") else targets
        return (f"- LoRA: r {used['lora.r']}, alpha {used.get('lora.alpha')}, targets {targets}, export "
                f"{used.get('lora.export', 'merged')}{', 4-bit backbone (QLoRA)' if used.get('lora.load_in_4bit') == 'True' else ''}"
                f"{counts}")
    return f"- full fine-tuning (no LoRA){counts}"


def scorer_options(ctx: StageContext, model_dir: Path) -> dict[str, Any]:
    """The pyfunc's ``model_config``: RewardBench's truncation, capped for encoders at their position limit."""
    from transformers import AutoConfig

    from pipeline import modeling

    rb = ctx.cfg.rewardbench
    limit = rb.max_length
    config = AutoConfig.from_pretrained(str(model_dir))
    position_limit = getattr(config, "max_position_embeddings", None)
    if modeling.is_encoder(config) and isinstance(position_limit, int) and position_limit > 0:
        limit = min(limit, position_limit)
    return {"max_length": int(limit), "truncation_side": rb.truncation_side,
            "batch_size": int(max(1, min(rb.batch_size, 64))), "device": "auto"}


def log_and_register(ctx: StageContext, model_dir: Path, metric: str, score: float | None) -> dict[str, Any]:
    from mlflow import MlflowClient
    from mlflow.models import infer_signature

    from pipeline.tracking import mlflow_globals, redact

    uri, run_id, name = ctx.tracker.uri, ctx.tracker.run_id, ctx.cfg.tracking.registered_model_name
    options = scorer_options(ctx, model_dir)
    example = input_example()
    signature = infer_signature(example, PairScorer.load(model_dir, **options).score_frame(example))
    started = time.time()
    with mlflow_globals(uri):
        with mlflow.start_run(run_id=run_id, nested=True):
            info = mlflow.pyfunc.log_model(
                name=MODEL_ARTIFACT, python_model=Path(pyfunc_model.__file__).resolve(), artifacts={"model": str(model_dir)},
                model_config=options, signature=signature, input_example=example,
                pip_requirements=pip_requirements())
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        client.update_run(run_id, status="RUNNING")  # leaving start_run() ended it; the runner finishes it
        champion = current_champion(client, name)
        version = mlflow.register_model(info.model_uri, name, await_registration_for=0).version
    wait_until_ready(client, name, version)
    tags = {**decide(metric, score, champion), "source_run_id": run_id, "logged_model_id": info.model_id}
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    client.update_model_version(name, version, description=version_description(ctx, model_dir, metric, score))
    client.set_registered_model_alias(name, CANDIDATE, version)
    if tags["decision"] == PROMOTED:
        client.set_registered_model_alias(name, CHAMPION, version)
    aliases = sorted(client.get_model_version(name, version).aliases)
    ctx.tracker.set_tags({"register.model": name, "register.version": version, "register.decision": tags["decision"]})
    ctx.log(f"  register: logged and registered in {time.time() - started:.1f}s")
    return {"registered": True, "registered_model": name, "version": int(version),
            "uri": f"models:/{name}/{version}", "aliases": aliases, "score_metric": metric, "score": score,
            **{k: tags[k] for k in ("decision", "decision_reason", "previous_champion_version",
                                    "previous_champion_score")},
            "logged_model_uri": info.model_uri, "run_id": run_id, "tracking_uri": redact(uri),
            "model_dir": str(model_dir)}


def version_description(ctx: StageContext, model_dir: Path, metric: str, score: float | None) -> str:
    """What a reader of the registry needs to know about this version (Markdown): backbone, loss and its values,
    data, validation and benchmark scores, the run that produced it."""
    train = _read_json(ctx.upstream["train"].outputs.get("metrics", ""))
    used = train.get("config", {})  # the values training really used (tune's best ones applied)
    final = train.get("final", {})
    loss = used.get("loss.name", ctx.cfg.loss.name)
    values = ", ".join(f"{k.removeprefix('loss.')} {used[k]}" for k in ("loss.beta", "loss.eps") if k in used) \
        if loss == "normbt" else "plain Bradley-Terry"
    lines = [f"Reward model trained with **{loss}** ({values}), lr {used.get('train.lr', ctx.cfg.train.lr)}, "
             f"{final.get('step', '?')} steps.",
             f"- backbone: `{ctx.cfg.model.name_or_path}`",
             lora_line(used, final),
             f"- data: {', '.join(s.label for s in ctx.cfg.data.sources)}"]
    data = ctx.upstream.get("data")
    if data is not None and "stats" in data.outputs:
        rows = _read_json(data.outputs["stats"]).get("rows", {})
        lines[-1] += f" ({rows.get('train', '?')} train / {rows.get('validation', '?')} validation pairs)"
    if "val_accuracy" in final:
        lines.append(f"- validation accuracy: {final['val_accuracy']:.4f} ({final.get('val_pairs', '?')} pairs)")
    bench = ctx.upstream.get("rewardbench")
    if bench is not None:
        for key, path in sorted(bench.outputs.items()):
            if key.endswith("/metrics"):
                overall = _number(_read_json(path).get("overall"))
                lines.append(f"- {key.removesuffix('/metrics')} overall: {_show(overall)}")
    lines.append(f"- promotion score: {metric} = {_show(score)}")
    lines.append(f"- run: `{ctx.tracker.run_id}` (model folder `{model_dir}`)")
    return "\n".join(lines)


def current_champion(client: Any, name: str) -> Any | None:
    """The version holding alias ``champion``, or None (no such alias or no such registered model yet)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def wait_until_ready(client: Any, name: str, version: str | int, timeout_s: float = _READY_TIMEOUT_S) -> None:
    deadline, delay = time.time() + timeout_s, 0.2
    while True:
        mv = client.get_model_version(name, str(version))
        if mv.status == "READY":
            return
        if mv.status == "FAILED_REGISTRATION":
            raise RuntimeError(f"registering {name} v{version} failed: {mv.status_message}")
        if time.time() > deadline:
            raise TimeoutError(f"{name} v{version} still {mv.status} after {timeout_s:.0f}s")
        time.sleep(delay)
        delay = min(delay * 2, 5.0)


def _log_report(ctx: StageContext, paths: Sequence[Path]) -> None:
    """Report files as artifacts (folder ``report``) of the stage run and of the pipeline's parent run."""
    if not ctx.tracker.active:
        return
    from pipeline.tracking import PARENT_TAG, RunLogger

    loggers = [ctx.tracker]
    # the runner's stage loggers know their parent; asking the server would fail the stage in an outage, after the
    # model is registered (a rerun would register it again)
    parent_id = ctx.tracker.parent_id or ctx.tracker.client.get_run(ctx.tracker.run_id).data.tags.get(PARENT_TAG)
    if parent_id:
        loggers.append(RunLogger(ctx.tracker.uri, parent_id, ctx.tracker.spool))
    for logger in loggers:
        for path in paths:
            if Path(path).is_dir():
                logger.log_artifact(path, artifact_path=f"report/{Path(path).name}")
            else:
                logger.log_artifact(path, artifact_path="report")


def _read_json(path: str | Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _show(value: float | None) -> str:
    return "none" if value is None else repr(float(value))
