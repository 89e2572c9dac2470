"""Best-of-N stage: how much gold reward does selecting by the trained reward model buy, per nat of KL?

Entry: :func:`run_best_of_n` (stage ``best_of_n``; uses the ``train`` stage's exported model when
``best_of_n.reward_model`` is empty).

Pipeline (``cfg.best_of_n``):

1. **Prompts** (``prompts``, one of):

   * ``{synthetic: {<SyntheticSpec keys>}}`` — built-in reasoning problems with known answers, from the
     held-out TEST templates (:func:`pipeline.synthetic.reasoning_prompts`);
   * ``{path: <file.jsonl|.json|.parquet, optionally .gz>, field?: prompt}`` — rows whose ``field`` is a
     prompt string or a ``[{role, content}, ...]`` list ending with a user turn; ids from ``prompt_id`` or
     ``id`` when present, else ``<file name>#<row index>``;
   * ``{hf: <hub id or save_to_disk folder>, split?: test, name?: <config>, field?: prompt}`` — the same
     rows through ``datasets``.

   The first ``num_prompts`` rows are used.
2. **Policy** draws one pool of ``n_max`` candidates per prompt: ``synthetic`` uses the offline sampler
   (:func:`pipeline.synthetic.sample_candidates`, wrong with probability ``error_rate``, coarsely with ``coarse_share``); ``hf`` samples a
   causal LM (``policy_model``: hub id, folder, or ``tiny:llama`` for tests) inside a Ray Data actor pool
   that loads the model once per actor (one GPU per actor when ``train.use_gpu``; ``best_of_n.engine``: vLLM on GPU
   when installed). The prompt is rendered with the tokenizer's chat template plus generation prompt,
   else as ``"User: ...\\n\\nAssistant:"``.
3. **Proxy** score of every candidate, ``[*prompt messages, {assistant: candidate}]``, by the reward model
   through :func:`pipeline.scoring.score_conversations`.
4. **Gold** score: ``verifier`` (1.0 iff the last number equals the known answer; synthetic prompts only)
   or ``rm`` (another reward model, ``gold_model``, scored the same way as the proxy).
5. **Estimation** (:func:`estimate`): for each prompt ``k`` the pool holds ``(proxy_k, gold_k)``. For every
   ``n`` in ``bon_math.n_grid(n_max)`` (1, 2, 4, ..., n_max) the table row is

   * ``gold_mean``: mean over prompts of the *exact* expectation of the gold score of the proxy-best of
     ``n`` candidates drawn without replacement from the pool (Nakano et al. 2021 / Gao et al. 2022
     unbiased estimator, ties broken uniformly) — one pool of ``n_max`` serves every ``n``;
   * ``gold_ci_low/high``: 95% percentile bootstrap over prompts (``bootstrap`` resamples, ``seed``);
   * ``proxy_mean``: the same expectation of the proxy score itself (what the reward model believes);
   * ``oracle_gold_mean``: best-of-n selected by the gold score (the selection ceiling);
   * ``kl``: the analytic bound ``log n - (n-1)/n`` nats of KL(best-of-n || policy), not a measurement.

Outputs (manifest names → files in the stage folder, all logged as MLflow artifacts):

* ``candidates`` — ``candidates.parquet``: ``prompt_id, candidate_id, text, proxy, gold``, one row per
  candidate (``num_prompts × n_max`` rows);
* ``results`` — ``results.csv``: exactly ``n, kl, gold_mean, gold_ci_low, gold_ci_high, proxy_mean,
  oracle_gold_mean``, one row per ``n``; ``results.json`` holds the same rows plus the settings;
* ``plot`` — ``plot.png``: gold (with its CI band) and oracle gold against √KL, proxy on a second axis.

Metrics: ``bon/gold_at_1``, ``bon/gold_at_nmax``, ``bon/gain`` (= gold at n_max − gold at n = 1),
``bon/oracle_at_nmax``; the per-n curves are also logged as MLflow metric series with ``step = n``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline import bon_math, formats, generation, readers, synthetic
from pipeline.artifacts import save_png, write_json
from pipeline.config import BestOfNConfig, ConfigError, PipelineConfig, PromptsConfig
from pipeline.raycluster import ensure_ray
from pipeline.stage import StageContext, StageResult

CANDIDATE_COLUMNS: tuple[str, ...] = ("prompt_id", "candidate_id", "text", "proxy", "gold")
KL_AXIS_LABEL = "√KL (analytic bound)"
KL_DEFINITION = "analytic bound KL(best-of-n || policy) <= log n - (n-1)/n nats (Stiennon et al. 2020)"

_SCORE_BATCH = 32  # conversations per scoring forward batch (scoring's own default)
_ROLES = {"system", "user", "assistant"}


def run_best_of_n(ctx: StageContext) -> StageResult:
    """Sample, score and estimate the Best-of-N curve; write and log the three outputs (module docstring)."""
    bon = ctx.cfg.best_of_n
    source = bon.prompts
    check_settings(bon, source)
    reward_model = resolve_reward_model(ctx)  # fail before any sampling when there is nothing to score with
    prompts = load_prompts(source, bon.num_prompts)
    ensure_ray(ctx.cfg)
    ctx.log(f"best-of-n: {len(prompts)} prompts x {bon.n_max} candidates, policy={bon.policy}, gold={bon.gold}")
    candidates = sample_pools(prompts, ctx.cfg)
    candidates["proxy"] = score_candidates(candidates, prompts, reward_model, ctx.cfg)
    candidates["gold"] = gold_scores(candidates, prompts, ctx.cfg)
    table = estimate(candidates, bon.n_max, n_boot=bon.bootstrap, seed=bon.seed)
    outputs = write_outputs(candidates, table, Path(ctx.out_dir), settings=_settings(bon, len(prompts)))
    track_outputs(ctx, outputs, table)
    metrics = bon_math.summary_metrics(table)
    ctx.log(f"best-of-n: gold@1={metrics['bon/gold_at_1']:.3f} gold@{bon.n_max}={metrics['bon/gold_at_nmax']:.3f} "
            f"(oracle {metrics['bon/oracle_at_nmax']:.3f})")
    ctx.log(f"best-of-n: {bon_math.verdict(metrics)}")
    ctx.tracker.set_tags({"bon.verdict": bon_math.verdict(metrics)})
    return StageResult(outputs=outputs, metrics=metrics)


# ----------------------------------------------------------------- configuration


def check_settings(bon: BestOfNConfig, source: PromptsConfig) -> None:
    """Cross-field checks the generic config validation cannot know about."""
    if bon.gold == "verifier" and source.kind != "synthetic":
        raise ConfigError("best_of_n.gold=verifier needs best_of_n.prompts={synthetic: ...}: the verifier checks "
                          f"the built-in problems' known answers, and {source.kind} prompts have none; "
                          "use best_of_n.gold=rm with best_of_n.gold_model")
    if bon.policy == "synthetic" and source.kind != "synthetic":
        raise ConfigError("best_of_n.policy=synthetic only answers the built-in problems (prompts={synthetic: ...}); "
                          "use best_of_n.policy=hf with best_of_n.policy_model for your own prompts")
    if bon.num_prompts < 1:
        raise ConfigError("best_of_n.num_prompts must be >= 1")
    if bon.bootstrap < 1:
        raise ConfigError("best_of_n.bootstrap must be >= 1 (resamples for the confidence interval)")
    if bon.policy == "hf" and not (bon.temperature > 0 and 0 < bon.top_p <= 1 and bon.max_new_tokens >= 1):
        raise ConfigError("best_of_n: best-of-n needs sampling: temperature > 0, 0 < top_p <= 1, "
                          "max_new_tokens >= 1")


def resolve_reward_model(ctx: StageContext) -> str:
    """``best_of_n.reward_model``, else the ``train`` stage's exported ``model``; a ValueError if neither."""
    if ctx.cfg.best_of_n.reward_model:
        return ctx.cfg.best_of_n.reward_model
    if "train" in ctx.upstream:
        return ctx.upstream["train"].output("model")
    raise ValueError("best_of_n: no reward model to evaluate: set best_of_n.reward_model (hub id or folder) "
                     "or run the train stage first in this run directory")


def _settings(bon: BestOfNConfig, num_prompts: int) -> dict[str, Any]:
    return {"num_prompts": num_prompts, "n_max": bon.n_max, "policy": bon.policy, "gold": bon.gold,
            "bootstrap": bon.bootstrap, "ci": "95% percentile bootstrap over prompts", "seed": bon.seed,
            "kl": KL_DEFINITION}


# ----------------------------------------------------------------- prompts


def load_prompts(source: PromptsConfig, limit: int) -> list[dict[str, Any]]:
    """The first ``limit`` prompts as ``{prompt_id, prompt, messages, ...}`` rows (unique ids).

    ``prompt`` is the last user turn (for display), ``messages`` the conversation to answer. Synthetic
    rows keep ``answer`` and ``solution`` for the verifier and the offline sampler.
    """
    if source.kind == "synthetic":
        rows = synthetic.reasoning_prompts(source.synthetic, "test", limit)
        return [{**r, "messages": [{"role": "user", "content": r["prompt"]}]} for r in rows]
    target = getattr(source, source.kind)
    if source.kind == "path":
        located = readers.read_path(target)
    else:
        split = source.split or "test"
        ds = readers.load_hf(target, name=source.name, split=split)
        located = list(formats.iter_indexed_rows(ds.select(range(min(limit, len(ds)))).to_list(), f"{target}:{split}"))
    label = Path(target).name or target
    prompts = [_prompt_row(row, where, source.field or "prompt", fallback_id=f"{label}#{i}")
               for i, (where, row) in enumerate(located[:limit])]
    if not prompts:
        raise ValueError(f"best_of_n: no prompts in {target}")
    ids = [p["prompt_id"] for p in prompts]
    if len(set(ids)) != len(ids):
        duplicated = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise ValueError(f"best_of_n: duplicate prompt ids in {target}: {duplicated}")
    return prompts


def _prompt_row(row: Mapping[str, Any], where: str, field: str, *, fallback_id: str) -> dict[str, Any]:
    if field not in row:
        raise ValueError(f"best_of_n: prompt row at {where} has no {field!r} field (keys: {sorted(row)})")
    messages = _as_messages(row[field], where)
    own_id = row.get("prompt_id", row.get("id"))
    return {"prompt_id": str(own_id) if own_id is not None else fallback_id, "prompt": messages[-1]["content"],
            "messages": messages}


def _as_messages(value: Any, where: str) -> list[dict[str, str]]:
    """A prompt string, or a ``{role, content}`` list ending with a user turn."""
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"best_of_n: empty prompt at {where}")
        return [{"role": "user", "content": value}]
    turns = list(value) if isinstance(value, (list, tuple, np.ndarray)) else None
    if not turns or not all(isinstance(t, Mapping) and t.get("role") in _ROLES and isinstance(t.get("content"), str)
                            for t in turns):
        raise ValueError(f"best_of_n: prompt at {where} must be a string or a list of {{role, content}} messages")
    if turns[-1]["role"] != "user":
        raise ValueError(f"best_of_n: prompt at {where} must end with a user turn, not {turns[-1]['role']!r}")
    return [{"role": t["role"], "content": t["content"]} for t in turns]


# ----------------------------------------------------------------- policy


def sample_pools(prompts: list[dict[str, Any]], cfg: PipelineConfig) -> pd.DataFrame:
    """``prompt_id, candidate_id, text``: ``n_max`` candidates per prompt, in prompt order."""
    bon = cfg.best_of_n
    if bon.policy == "synthetic":
        rows = [{"prompt_id": p["prompt_id"], "candidate_id": j, "text": text}
                for p in prompts
                for j, text in enumerate(synthetic.sample_candidates(p, bon.n_max, error_rate=bon.error_rate,
                                                                     coarse_share=bon.coarse_share,
                                                                     seed=bon.seed))]
        frame = pd.DataFrame(rows, columns=["prompt_id", "candidate_id", "text"])
    else:
        frame = generation.generate_with_ray(prompts, cfg)
    return _in_prompt_order(frame, prompts, bon.n_max)


def _in_prompt_order(frame: pd.DataFrame, prompts: list[dict[str, Any]], n_max: int) -> pd.DataFrame:
    """Ray Data gives no row-order guarantee: sort back and check every pool is complete."""
    order = {p["prompt_id"]: i for i, p in enumerate(prompts)}
    counts = frame.groupby("prompt_id").size()
    short = [pid for pid in order if counts.get(pid, 0) != n_max]
    if short:
        raise RuntimeError(f"best_of_n: {len(short)} prompt(s) did not get exactly {n_max} candidates, "
                           f"e.g. {short[:3]}")
    frame = frame.assign(_order=frame["prompt_id"].map(order), candidate_id=frame["candidate_id"].astype("int64"))
    return frame.sort_values(["_order", "candidate_id"]).drop(columns="_order").reset_index(drop=True)


# ----------------------------------------------------------------- proxy and gold


def score_candidates(candidates: pd.DataFrame, prompts: list[dict[str, Any]], model_path: str,
                     cfg: PipelineConfig) -> np.ndarray:
    """Reward-model score of each candidate as ``[*prompt messages, {assistant: text}]``, in row order."""
    from pipeline.scoring import score_conversations

    messages = {p["prompt_id"]: p["messages"] for p in prompts}
    rows = [{"prompt_id": pid, "candidate_id": int(cid),
             "messages": [*messages[pid], {"role": "assistant", "content": text}]}
            for pid, cid, text in candidates[["prompt_id", "candidate_id", "text"]].itertuples(index=False)]
    use_gpu = cfg.train.use_gpu
    # No more actors (each loads the model) than there are batches to score.
    cpus = cfg.best_of_n.cpus_per_actor
    actors = generation.actor_count(use_gpu, -(-len(rows) // _SCORE_BATCH), cpus)
    scored = score_conversations(rows, model_path, batch_size=_SCORE_BATCH, num_actors=actors,
                                 cpus_per_actor=cpus, use_gpu=use_gpu)
    keys = ["prompt_id", "candidate_id"]
    scored = scored[[*keys, "score"]].astype({"candidate_id": "int64"})
    # Scores come back in whatever order the actor pool finished: join on the candidate key.
    joined = candidates[keys].merge(scored, on=keys, how="left", validate="one_to_one")
    if joined["score"].isna().any():
        raise RuntimeError(f"best_of_n: {int(joined['score'].isna().sum())} candidate(s) got no score from "
                           f"{model_path}")
    return joined["score"].to_numpy(dtype=np.float64)


def gold_scores(candidates: pd.DataFrame, prompts: list[dict[str, Any]], cfg: PipelineConfig) -> np.ndarray:
    """``verifier``: 1.0 iff the candidate's last number is the answer; ``rm``: the gold reward model's score."""
    bon = cfg.best_of_n
    if bon.gold == "rm":
        return score_candidates(candidates, prompts, bon.gold_model, cfg)
    by_id = {p["prompt_id"]: p for p in prompts}
    return np.array([synthetic.verify(by_id[pid], text) for pid, text in
                     candidates[["prompt_id", "text"]].itertuples(index=False)], dtype=np.float64)


# ----------------------------------------------------------------- estimation and outputs


def estimate(candidates: pd.DataFrame, n_max: int, *, n_boot: int, seed: int) -> pd.DataFrame:
    """The Best-of-N table over ``n_grid(n_max)`` from one pool per prompt (module docstring, step 5).

    ``candidates`` needs ``prompt_id, proxy, gold``; each prompt's rows form its pool. Returns exactly
    :data:`pipeline.bon_math.TABLE_COLUMNS`, one row per ``n``.
    """
    pools = [(pool["proxy"].to_numpy(np.float64), pool["gold"].to_numpy(np.float64))
             for _, pool in candidates.groupby("prompt_id", sort=False)]
    return bon_math.best_of_n_table(pools, bon_math.n_grid(n_max), n_boot=n_boot, seed=seed)


def write_outputs(candidates: pd.DataFrame, table: pd.DataFrame, out_dir: Path,
                  settings: Mapping[str, Any]) -> dict[str, str]:
    """Write ``candidates.parquet``, ``results.csv`` + ``results.json`` and ``plot.png``; return manifest outputs."""
    out_dir.mkdir(parents=True, exist_ok=True)
    candidates_path = out_dir / "candidates.parquet"
    candidates[list(CANDIDATE_COLUMNS)].to_parquet(candidates_path, index=False)
    results_path = out_dir / "results.csv"
    table.to_csv(results_path, index=False)
    write_json(out_dir / "results.json", {**settings, "rows": table.to_dict(orient="records")})
    plot_path = plot_curves(table, out_dir / "plot.png")
    return {"candidates": str(candidates_path), "results": str(results_path), "plot": str(plot_path)}


def plot_curves(table: pd.DataFrame, path: Path) -> Path:
    """Gold (with its bootstrap band) and oracle gold against √KL; proxy on a right-hand axis (other units)."""
    # Explicit Agg canvas: no pyplot global state, works without a display and inside Ray workers.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    x = np.sqrt(table["kl"].to_numpy(np.float64))
    fig = Figure(figsize=(7.0, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.fill_between(x, table["gold_ci_low"], table["gold_ci_high"], color="C0", alpha=0.2,
                    label="gold 95% CI (bootstrap over prompts)")
    ax.plot(x, table["gold_mean"], marker="o", color="C0", label="gold, selected by the reward model")
    ax.plot(x, table["oracle_gold_mean"], marker="^", linestyle="--", color="C2", label="gold, oracle selection")
    for xi, yi, n in zip(x, table["gold_mean"], table["n"], strict=True):
        ax.annotate(f"n={int(n)}", (xi, yi), textcoords="offset points", xytext=(3, -12), fontsize="x-small")
    proxy_ax = ax.twinx()
    proxy_ax.plot(x, table["proxy_mean"], marker="s", linestyle=":", color="C1", label="proxy (reward model)")
    ax.margins(x=0.08)  # room for the n= labels at the ends
    ax.set_xlabel(KL_AXIS_LABEL)
    ax.set_ylabel("gold score")
    proxy_ax.set_ylabel("proxy score")
    ax.grid(alpha=0.3)
    handles = ax.get_legend_handles_labels()[0] + proxy_ax.get_legend_handles_labels()[0]
    ax.legend(handles=handles, fontsize="small", loc="best")
    ax.set_title("Best-of-N")
    return save_png(fig, path)


def track_outputs(ctx: StageContext, outputs: Mapping[str, str], table: pd.DataFrame) -> None:
    """Artifacts plus the per-n curves as metric series (step = n) for MLflow's charts."""
    for path in (*outputs.values(), Path(ctx.out_dir) / "results.json"):
        ctx.tracker.log_artifact(path, "best_of_n")
    for row in table.itertuples(index=False):
        ctx.tracker.log_metrics({"bon/curve_gold": row.gold_mean, "bon/curve_proxy": row.proxy_mean,
                                 "bon/curve_oracle": row.oracle_gold_mean, "bon/curve_kl": row.kl}, step=int(row.n))
