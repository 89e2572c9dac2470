"""RewardBench stage: score preference benchmarks with a reward model; accuracy overall, per section,
per subset and per representation-distance bin.

Model: ``rewardbench.model`` (hub id or ``save_pretrained`` folder) when set, else the ``model`` output
of the ``train`` stage. Scoring goes through :func:`pipeline.scoring.score_conversations` (a Ray Data
actor pool; GPU actors in bf16 when ``train.use_gpu``). Every response ``y`` to prompt ``x`` is scored
as the conversation ``[user: x, assistant: y]``.

Benchmarks (``rewardbench.benchmarks``), each a mapping with ``name`` and exactly one source:

* ``path``: a ``.jsonl`` (optionally ``.gz``), ``.json`` (array) or ``.parquet`` file, a glob of them, or a
  folder (every such file inside, sorted);
* ``hf`` + ``split`` (+ optional ``config``, ``revision``): ``datasets.load_dataset(hf, name=config,
  split=split, revision=revision)``, e.g. ``{hf: allenai/reward-bench, split: filtered}``;
* ``synthetic``: :class:`pipeline.synthetic.SyntheticSpec` keys; its test split in RewardBench v1 form.

Optional keys: ``format`` (``v1`` | ``v2`` | ``rm_bench`` | ``judgebench`` | ``rmb``; default: ``v2`` when
``chosen`` is a list, else ``v1``) and ``limit`` (first N rows). v1/v2 rows hold ``prompt``, ``chosen``,
``rejected`` and optionally ``subset`` (default: the benchmark name) and ``id`` (default: the row number).
RewardBench v1 gives one chosen and one rejected string per row; RewardBench 2 gives lists of strings (Ties: ids
``ref:<p>`` / ``tied:<p>``). ``rm_bench``, ``judgebench`` and ``rmb`` read their authors' public schemas and
score as their authors do (:mod:`pipeline.judge_benchmarks`); their rows that cannot be scored, and v2 rows whose
``num_correct`` / ``total_completions`` disagree with their lists, are quarantined with a counted reason
(``<name>/quarantine.json``; ``quarantine`` in ``metrics.json``).

Contract: files under ``<out_dir>/<name>/``

* ``scores.parquet``, one row per example: ``id`` (string), ``subset``, ``section``,
  ``score_chosen``, ``score_rejected``, ``correct``, ``distance``.

  - v1: scores are floats; ``correct = score_chosen > score_rejected`` (bool; a tie is wrong);
    ``distance = ‖h_chosen − h_rejected‖₂`` with ``h`` the score head's input.
  - JudgeBench and RMB: as v1 (JudgeBench's chosen is the response its label prefers; ``correct`` is the
    authors' two-order decision, a tie wrong; extra columns ``label``, ``response_model``).
  - RM-Bench: scores are lists of 3 (concise, detailed, markdown); ``correct`` is the row's share of its 9
    chosen x rejected comparisons won (strict ``>``); ``distance`` the mean over the 3 same-style pairs.
  - v2: scores are lists in the data's response order; ``correct`` is the official best-of-k
    credit (:func:`pipeline.metrics.v2_row_credit`: 1 for a clean win, 1/k for a k-way tie at the
    top, else 0; NaN for Ties rows, which are judged per prompt); ``distance = ‖h_chosen[0] − h_r*‖₂``
    where ``r*`` is the highest-scoring rejected response: the one comparison that decides whether
    the row earns credit, i.e. the v2 counterpart of the v1 pair.

* ``metrics.json``: ``format``, ``model``, ``subsets`` (accuracy or v2 score per subset),
  ``sections``, ``overall``, ``counts`` (examples per subset), ``distance_bins`` (records of the table
  below) and ``missing`` (official subsets absent); v2 also ``ties`` (Ties components); RM-Bench, JudgeBench
  and RMB also ``details`` (RM-Bench: ``easy`` / ``normal`` / ``hard`` and per domain; logged as
  ``<name>/<detail>``), RM-Bench ``matrices`` (per domain, chosen style x rejected style), JudgeBench
  ``response_model``. RM-Bench sections are the domains (safety pooled), JudgeBench's the source groups,
  RMB's the goals (Helpfulness, Harmlessness); their ``overall`` is the authors' (RM-Bench: mean of domains;
  JudgeBench and RMB: pooled over pairs). Sections:
  v1 with only official subsets uses the official weights (:func:`pipeline.metrics.v1_metrics`);
  other v1 data (e.g. the synthetic benchmark) weights subsets by example count
  (:func:`pipeline.metrics.sections_from_map` over the official and synthetic section maps; unknown
  subsets go to ``Other``); v2 reports each of its subsets as its own section. ``overall`` is the
  unweighted mean of the sections (v1) or subsets (v2). ``tie_rate``: share of examples whose deciding
  comparison is an exact score tie (rewards are fp32, so it should be ~0). ``length_controls``: per section
  and ``all``, what judging by length alone scores on the same examples (``longer_wins``, ``shorter_wins``;
  characters; an equal length counts one half; v2: the share of the chosen among the responses tied for the
  longest / shortest pick; plain means over examples): a section score near ``longer_wins`` may be a length
  preference. NaN is written as ``null``.
* ``accuracy_by_distance.csv`` (:func:`pipeline.metrics.accuracy_by_distance_bin` with
  ``rewardbench.distance_bins`` quantile bins, per section and ``all``; v2 without Ties rows) and
  ``accuracy_by_distance.png`` (written when the table is not empty).

Manifest outputs: ``<name>/scores``, ``<name>/metrics``, ``<name>/distance_bins``,
``<name>/distance_plot`` (when written) for every benchmark, and plain ``scores`` / ``metrics`` for the
first one. Metrics (also logged to MLflow with the files): ``<name>/overall``,
``<name>/section/<Section>``, ``<name>/subset/<subset>``, ``<name>/length_control/longer_wins[/<Section>]``
and ``shorter_wins`` likewise, names with characters other than letters,
digits, ``_ - .`` replaced by ``_``.
"""

from __future__ import annotations

from pipeline.benchmarks import score_benchmark
from pipeline.raycluster import ensure_ray
from pipeline.stage import StageContext, StageResult


def resolve_model(ctx: StageContext) -> str:
    """``rewardbench.model`` if set, else the train stage's exported model folder."""
    if ctx.cfg.rewardbench.model:
        return ctx.cfg.rewardbench.model
    train = ctx.upstream.get("train")
    if train is None:
        raise ValueError("rewardbench: no model to score; set rewardbench.model=<hub id or folder>, "
                         "or run the train stage first (e.g. --stages data,train,rewardbench)")
    return train.output("model")


def score_rewardbench(ctx: StageContext) -> StageResult:
    """Stage entry: score every configured benchmark (see the module docstring for the contract)."""
    benches = ctx.cfg.rewardbench.benchmarks
    model_path = resolve_model(ctx)
    ensure_ray(ctx.cfg)
    outputs: dict[str, str] = {}
    stage_metrics: dict[str, float] = {}
    for bench in benches:
        files, flat = score_benchmark(bench, model_path, ctx)
        outputs.update(files)
        stage_metrics.update(flat)
    first = benches[0].name
    outputs["scores"], outputs["metrics"] = outputs[f"{first}/scores"], outputs[f"{first}/metrics"]
    return StageResult(outputs=outputs, metrics=stage_metrics)

