"""Calibration probe for the embedded default (not part of the pipeline): train the default's model on the
built-in benchmark in one process, without Ray, and print what the default run's summary would show —
validation accuracy by subset, Best-of-N gold by n on the synthetic policy — for a few settings and seeds.

    python benchmarks/calibrate_default.py train.lr=5e-5 best_of_n.error_rate=0.5 --seeds 0 1

Each setting is `key=value` overrides of the default config (the same keys as run_pipeline.py). What was tried
and what was chosen is in benchmarks/README.md ("Calibrating the embedded default").
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import bon_math, modeling, synthetic
from pipeline.config import from_flat, load_config
from pipeline.scoring import RewardScorer
from pipeline.train_loop import train_local


def tokenised(tok, rows: list[dict], max_length: int) -> list[dict]:
    out = []
    for r in rows:
        ids = modeling.encode_batch(tok, [r["prompt"] + r["chosen"], r["prompt"] + r["rejected"]])
        c, j = (modeling.truncate_ids(x, max_length) for x in ids)
        out.append({"chosen_ids": c, "rejected_ids": j, "chosen_len": len(c), "rejected_len": len(j),
                    "margin": None, "subset": r["subset"]})
    return out


def train(cfg, train_rows, val_rows, out: Path) -> tuple[list[dict], Path]:
    history: list[dict] = []

    def report(metrics, checkpoint_dir=None, final=False):
        history.append(dict(metrics))
        if final and checkpoint_dir:  # the exported model and the per-pair validation rewards
            shutil.copytree(Path(checkpoint_dir) / "model", out / "model", dirs_exist_ok=True)
            shutil.copy(Path(checkpoint_dir) / "validation_rewards.parquet", out / "validation_rewards.parquet")

    train_local(cfg, train_rows, val_rows, report=report, one_process=True)
    return history, out


def best_of_n(cfg, model_dir: Path) -> pd.DataFrame:
    bon = cfg.best_of_n
    spec = bon.prompts.synthetic
    prompts = synthetic.reasoning_prompts(spec, "test", bon.num_prompts)
    scorer = RewardScorer(str(model_dir), max_length=512)
    pools = []
    for p in prompts:
        texts = synthetic.sample_candidates(p, bon.n_max, error_rate=bon.error_rate,
                                               coarse_share=bon.coarse_share, seed=bon.seed)
        msgs = np.empty(len(texts), dtype=object)
        msgs[:] = [[{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": t}] for t in texts]
        proxy = scorer({"messages": msgs})["score"]
        gold = np.array([synthetic.verify(p, t) for t in texts])
        pools.append((proxy, gold))
    return bon_math.best_of_n_table(pools, bon_math.n_grid(bon.n_max), n_boot=bon.bootstrap, seed=bon.seed)


def test_accuracy(cfg, model_dir: Path) -> dict[str, float]:
    spec = cfg.rewardbench.benchmarks[0].synthetic
    rows = synthetic.generate(spec, "test")
    scorer = RewardScorer(str(model_dir), max_length=512)
    msgs = np.empty(2 * len(rows), dtype=object)
    msgs[:] = [r["prompt"] + r[side] for r in rows for side in ("chosen", "rejected")]
    s = scorer({"messages": msgs})["score"].reshape(-1, 2)
    frame = pd.DataFrame({"subset": [r["subset"] for r in rows], "ok": s[:, 0] > s[:, 1]})
    return frame.groupby("subset")["ok"].mean().round(3).to_dict() | {"all": round(float(frame["ok"].mean()), 3)}


def one(overrides: list[str], seed: int, with_test: bool, keep: str | None = None, with_bon: bool = True) -> dict:
    cfg = load_config(None, overrides)
    cfg = from_flat({"train.seed": seed, "model.seed": seed, "train.num_workers": 1,
                     "train.micro_batch_size": cfg.train.micro_batch_size * cfg.train.num_workers}, base=cfg)
    spec = cfg.data.sources[0].synthetic
    tok = modeling.load_tokenizer(modeling.resolve_model_path(cfg.model.name_or_path))
    train_rows = tokenised(tok, synthetic.generate(spec, "train"), cfg.data.max_length)
    random.Random(seed).shuffle(train_rows)
    val_rows = tokenised(tok, synthetic.generate(spec, "validation"), cfg.data.max_length)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        history, out = train(cfg, train_rows, val_rows, Path(tmp))
        train_s = time.time() - t0
        val = pd.read_parquet(out / "validation_rewards.parquet").sort_values("row")
        ok = (val["reward_chosen"] > val["reward_rejected"]).to_numpy()
        subsets = np.array([r["subset"] for r in val_rows])[val["row"].to_numpy()]
        by_subset = pd.Series(ok).groupby(subsets).mean().round(3).to_dict()
        table = best_of_n(cfg, out / "model") if with_bon else pd.DataFrame(columns=["n", "gold_mean", "gold_ci_low",
                                                                                      "gold_ci_high"])
        test = test_accuracy(cfg, out / "model") if with_test else {}
        if keep:
            shutil.copytree(out / "model", Path(keep) / f"seed{seed}", dirs_exist_ok=True)
    losses = [h["loss"] for h in history if "loss" in h]
    plain = [h["pair_loss"] for h in history if "pair_loss" in h]
    third = max(1, len(plain) // 3)
    return {"overrides": overrides, "seed": seed, "train_s": round(train_s, 1), "steps": len(losses),
            "loss_first": round(float(np.mean(losses[:2])), 3) if losses else None,
            "loss_last": round(float(np.mean(losses[-2:])), 3) if losses else None,
            "pair_loss_first_third": round(float(np.mean(plain[:third])), 3) if plain else None,
            "pair_loss_last_third": round(float(np.mean(plain[-third:])), 3) if plain else None,
            "val_acc": round(float(ok.mean()), 3), "val_by_subset": by_subset, "test": test,
            "bon_gold": dict(zip(table["n"].astype(int), table["gold_mean"].round(3))),
            "bon_ci_low": dict(zip(table["n"].astype(int), table["gold_ci_low"].round(3))),
            "bon_ci_high": dict(zip(table["n"].astype(int), table["gold_ci_high"].round(3)))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--test", action="store_true", help="also score the held-out test split")
    parser.add_argument("--keep", default=None, help="copy each seed's model to KEEP/seed<N>")
    parser.add_argument("--no-bon", action="store_true", help="validation only (e.g. a search trial's prefix)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    for seed in args.seeds:
        print(json.dumps(one(args.overrides, seed, args.test, args.keep, not args.no_bon), default=str), flush=True)


if __name__ == "__main__":
    main()
