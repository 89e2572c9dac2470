"""The two CPU settings of the embedded default, each timed against its peer in the same run, in one process:

    python benchmarks/default_cpu_settings.py [--rounds 3] [--steps 40] [--out settings.json]

1. ``train.zero_stage`` 0 vs 2 for one training rank (the default's one worker): ``--steps`` optimizer steps of the
   default's model, data and batches (``train_local``, one process, the default's 2 threads), the two stages back
   to back each round, the order swapped every round. Reported: the ratio of the loop's step time (stage 0 over
   stage 2) and of the engine's build time, median and min-max over rounds, and whether the two runs' loss curves
   and validation accuracy agree.
2. Scoring threads, 1 vs 2 (``rewardbench.cpus_per_actor`` / ``best_of_n.cpus_per_actor``: Ray sets an actor's
   ``OMP_NUM_THREADS`` to its CPUs): the Best-of-N stage's 2,048 candidates (128 prompts × 16) scored by
   :class:`pipeline.scoring.RewardScorer` with the untrained default model, ``torch.set_num_threads`` 1 then 2
   (order swapped every round). Reported: seconds on 2 threads over seconds on 1, and the largest score change.

Print the CPU with the numbers: absolute times differ between machines and days; the ratios are the result.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.calibrate_default import tokenised
from pipeline import modeling, synthetic
from pipeline.config import load_config
from pipeline.scoring import RewardScorer
from pipeline.train_loop import train_local


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def train_once(stage: int, steps: int, train_rows: list[dict], val_rows: list[dict]) -> dict:
    import torch

    cfg = load_config(None, [f"train.zero_stage={stage}", f"train.stop_after_steps={steps}", "train.lr=1e-4",
                             "train.log_every=1000"])
    torch.set_num_threads(int(cfg.train.cpus_per_worker))
    history: list[dict] = []
    train_local(cfg, train_rows, val_rows, report=lambda m, checkpoint_dir=None, final=False: history.append(m),
                one_process=True)
    final = history[-1]
    return {"steps_s": final["phase/steps_s"], "engine_s": final["phase/engine_s"],
            "val_accuracy": final["val_accuracy"], "losses": [h["loss"] for h in history if "loss" in h]}


def score_once(threads: int, scorer: RewardScorer, messages: np.ndarray) -> tuple[float, np.ndarray]:
    import torch

    torch.set_num_threads(threads)
    start = time.perf_counter()
    scores = np.concatenate([scorer({"messages": messages[i: i + 32]})["score"] for i in range(0, len(messages), 32)])
    return time.perf_counter() - start, scores


def candidates(cfg) -> np.ndarray:
    bon = cfg.best_of_n
    prompts = synthetic.reasoning_prompts(bon.prompts.synthetic, "test", bon.num_prompts)
    conversations = [[{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": t}]
                     for p in prompts for t in synthetic.sample_candidates(p, bon.n_max, error_rate=bon.error_rate,
                                                                         coarse_share=bon.coarse_share, seed=bon.seed)]
    messages = np.empty(len(conversations), dtype=object)
    messages[:] = conversations
    order = np.argsort([len(m[1]["content"]) for m in conversations], kind="stable")  # the stage's length order
    return messages[order]


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    cfg = load_config(None, [])
    tok = modeling.load_tokenizer(modeling.resolve_model_path(cfg.model.name_or_path))
    spec = cfg.data.sources[0].synthetic
    train_rows = tokenised(tok, synthetic.generate(spec, "train"), cfg.data.max_length)
    val_rows = tokenised(tok, synthetic.generate(spec, "validation"), cfg.data.max_length)
    result: dict = {"cpu": cpu_name(), "cores": len(os.sched_getaffinity(0)), "rounds": []}
    print(f"CPU: {result['cpu']}, {result['cores']} cores", flush=True)

    same_curve = True
    for r in range(args.rounds):
        runs = {}
        for stage in ((0, 2) if r % 2 == 0 else (2, 0)):
            runs[stage] = train_once(stage, args.steps, train_rows, val_rows)
        same_curve &= bool(np.allclose(runs[0]["losses"], runs[2]["losses"], rtol=1e-4, atol=1e-6))
        same_curve &= runs[0]["val_accuracy"] == runs[2]["val_accuracy"]
        result["rounds"].append({"zero0_over_zero2_step_time": runs[0]["steps_s"] / runs[2]["steps_s"],
                                 "zero0_over_zero2_engine_time": runs[0]["engine_s"] / runs[2]["engine_s"],
                                 "zero0_steps_s": runs[0]["steps_s"], "zero2_steps_s": runs[2]["steps_s"]})
        print(f"round {r + 1}: {args.steps} steps in {runs[0]['steps_s']:.1f} s (ZeRO-0) vs {runs[2]['steps_s']:.1f} s "
              f"(ZeRO-2), val_accuracy {runs[0]['val_accuracy']:.3f} vs {runs[2]['val_accuracy']:.3f}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        from pipeline.train_loop import reward_model_for

        model = reward_model_for(cfg, tok)
        modeling.save_reward_model(model, tok, tmp)
        scorer = RewardScorer(tmp, max_length=cfg.rewardbench.max_length)
        messages = candidates(cfg)
        score_once(2, scorer, messages[:64])  # warm-up
        largest = 0.0
        for r in range(args.rounds):
            timed = {}
            for threads in ((1, 2) if r % 2 == 0 else (2, 1)):
                timed[threads] = score_once(threads, scorer, messages)
            largest = max(largest, float(np.abs(timed[1][1] - timed[2][1]).max()))
            result["rounds"][r]["two_over_one_thread_scoring_time"] = timed[2][0] / timed[1][0]
            print(f"round {r + 1}: {len(messages)} candidates scored in {timed[1][0]:.1f} s (1 thread) vs "
                  f"{timed[2][0]:.1f} s (2 threads)", flush=True)
    for key in ("zero0_over_zero2_step_time", "zero0_over_zero2_engine_time", "two_over_one_thread_scoring_time"):
        result[key] = spread([x[key] for x in result["rounds"]])
    result["zero0_and_zero2_same_curve_and_accuracy"] = same_curve
    result["largest_score_change_between_thread_counts"] = largest
    print(json.dumps({k: v for k, v in result.items() if k != "rounds"}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
