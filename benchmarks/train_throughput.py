"""Training throughput: our loop vs TRL's ``RewardTrainer``, and NormBT vs BT step time, measured in one run.

    pip install -e '.[bench]'
    python benchmarks/train_throughput.py [--workload hh-rlhf|synthetic] [--rounds 5] [--sides trl,bt,normbt]

Two workloads: ``synthetic`` (the synthetic benchmark rendered by our data code: short pairs of nearly equal
length) and ``hh-rlhf`` (the real HH-RLHF helpful + harmless train samples in ``../shared/data``, as the data
stage normalises them, ``--max-length`` 512: lengths from a few dozen to 512 tokens, where batching by length
matters). Same model, same pre-tokenised pairs, same batch size, optimizer (AdamW, fixed lr), precision (fp32, no
gradient checkpointing: TRL's defaults are bf16 and checkpointing) and process count (one process; DeepSpeed
ZeRO-0 on our side, the HF Trainer on TRL's). Each side keeps its own batching: ours groups pairs of similar
length (``train.length_group_window``), TRL pads random batches (its default).

Every measurement runs in a fresh process (TRL must not see the ``torch.distributed`` group our loop makes, and
nothing is warm from the run before). The sides (``--sides``, default all three) run in turn ``--rounds`` times,
the order rotated each round, so that drift in the machine's speed hits all alike. A run's step time is the
median over its steps after the first two. Per round: ours(NormBT)/TRL pairs/s, and NormBT/BT as the median of
the step-by-step ratios (both train the same batches in the same order); printed per round, then the median with
the min-max spread and a 95% t-interval of the mean over rounds. Targets: ours/TRL >= 2 on hh-rlhf (>= 1.5 on
synthetic), NormBT/BT <= 1.02 with the interval inside +-2%.

``--interleaved`` measures NormBT/BT alone, holding everything else still: one process and one engine train
each batch with a BT step and a NormBT step back to back (the first of the two alternating), so machine drift
between runs, which dominates the separate-process design on a shared 2-core machine, cancels in every ratio.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline import formats, modeling, readers, synthetic  # noqa: E402
from pipeline.compare import t_interval  # noqa: E402
from pipeline.config import load_config  # noqa: E402

SHARED = Path(os.environ.get("NORMBT_SHARED_DATA", REPO.parent / "shared" / "data"))
HH_FILES = ("hh_rlhf/helpful_train_sample.jsonl", "hh_rlhf/harmless_train_sample.jsonl")
SIDES = ("trl", "bt", "normbt")


def conversations(workload: str, n: int | None) -> list[dict]:
    """``n`` pairs (hh-rlhf: None, all of them) as ``{prompt, chosen, rejected}`` message lists, in file order."""
    if workload == "synthetic":
        return list(synthetic.generate(synthetic.SyntheticSpec(n_train=n), "train"))[:n]
    records, quarantined = [], []
    for name in HH_FILES:
        good, bad = formats.normalise_batch(readers.read_path(str(SHARED / name), strict=False), source=name)
        records += good
        quarantined += bad
    if quarantined:  # counted, never silent: the data stage would quarantine the same rows
        print(f"hh-rlhf: {len(quarantined)} rows quarantined ({quarantined[0]['reason']}, ...)", file=sys.stderr)
    if n is None:
        return records
    if len(records) < n:
        raise SystemExit(f"hh-rlhf: {len(records)} usable pairs in {SHARED}, {n} needed (fewer --steps?)")
    return records[:n]


def make_rows(model: str, workload: str, n: int, max_length: int) -> list[dict]:
    tok = modeling.load_tokenizer(model)
    rows = []
    for r in conversations(workload, n):
        ids = {s: modeling.truncate_ids(modeling.encode_messages(tok, r["prompt"] + r[s]), max_length)
               for s in ("chosen", "rejected")}
        rows.append({"chosen_ids": ids["chosen"], "rejected_ids": ids["rejected"], "chosen_len": len(ids["chosen"]),
                     "rejected_len": len(ids["rejected"]), "margin": None})
    return rows


def ours(model: str, rows: list[dict], steps: int, batch: int, loss: str) -> list[float]:
    """Seconds of each optimizer step of ``pipeline.train_loop.run_loop`` (one process) after the first two."""
    from pipeline.train_loop import train_local

    cfg = load_config(None, [f"model.name_or_path={model}", f"loss.name={loss}", "train.zero_stage=0",
                             f"train.micro_batch_size={batch}", f"train.max_steps={steps}", "train.lr=1e-5",
                             "train.scheduler=constant", "train.warmup_ratio=0", "train.max_grad_norm=1.0",
                             "train.log_every=1"])  # a report per step: the intervals below are step times
    times: list[float] = []
    last = [time.perf_counter()]

    def report(metrics: dict, checkpoint_dir: str | None = None, final: bool = False) -> None:
        now = time.perf_counter()
        if not final:
            times.append(now - last[0])
        last[0] = time.perf_counter()

    train_local(cfg, rows, rows[:batch], report=report)
    return times[2:]


def trl(model: str, rows: list[dict], steps: int, batch: int) -> list[float]:
    """Seconds of each optimizer step of TRL's RewardTrainer on the same pre-tokenised pairs, after the first two."""
    import datasets
    from transformers import TrainerCallback
    from trl import RewardConfig, RewardTrainer

    tok = modeling.load_tokenizer(model)
    net = modeling.build_reward_model(model, tok)
    ds = datasets.Dataset.from_list([{"chosen_ids": r["chosen_ids"], "rejected_ids": r["rejected_ids"]} for r in rows])
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t)

    with tempfile.TemporaryDirectory() as out:
        args = RewardConfig(output_dir=out, per_device_train_batch_size=batch, max_steps=steps, learning_rate=1e-5,
                            lr_scheduler_type="constant", logging_steps=10**6, save_strategy="no", report_to=[],
                            use_cpu=True, dataloader_num_workers=0, max_grad_norm=1.0, disable_tqdm=True,
                            center_rewards_coefficient=None, max_length=None,
                            # TRL defaults to bf16 autocast and gradient checkpointing; our loop trains fp32
                            # without checkpointing on CPU (bf16 matmuls are emulated on CPUs without native
                            # bf16, e.g. AVX2: 30 s/step instead of < 1 s). Same numerics on both sides.
                            bf16=False, gradient_checkpointing=False)
        RewardTrainer(model=net, args=args, train_dataset=ds, processing_class=tok, callbacks=[Timer()]).train()
    return times[2:]


def interleaved(model: str, rows: list[dict], steps: int, batch: int) -> list[float]:
    """NormBT/BT step time with everything else held still: one process, one engine, each batch trained by a BT
    step and a NormBT step back to back (which goes first alternates), timed around ``train_one_step`` (the
    loop's own step: forward, loss, backward, optimizer step). Per batch, NormBT's time over BT's; the first
    two batches are warm-up. Drift in the machine's speed between batches cancels in each ratio."""
    from pipeline import losses
    from pipeline.distributed import Collectives, compute_device
    from pipeline.train_loop import LoopPlan, build_engine, global_batches, single_process_env, train_one_step

    single_process_env(one_process=True)
    common = [f"model.name_or_path={model}", "train.zero_stage=0", "train.num_workers=1",
              f"train.micro_batch_size={batch}", "train.lr=1e-5", "train.scheduler=constant", "train.warmup_ratio=0"]
    cfg = {loss: load_config(None, [*common, f"loss.name={loss}"]) for loss in ("bt", "normbt")}
    engine, net, tok = build_engine(cfg["normbt"], LoopPlan(max_steps=2 * steps, steps_per_epoch=steps,
                                                            world_size=1, rank=0), use_gpu=False)
    device = compute_device(False)
    comm, ema = Collectives(device), losses.DistanceEMA(0.9)
    ratios = []
    # more steps than batches: the batches come round again (the weights have moved on; both losses alike)
    batches = itertools.cycle(list(global_batches([rows], global_batch=batch, seed=0, epoch=0)))
    for i, rows_i in zip(range(steps), batches):
        took = {}
        for loss in (("bt", "normbt") if i % 2 == 0 else ("normbt", "bt")):
            start = time.perf_counter()
            train_one_step(cfg[loss], engine, net, [rows_i], ema, tok.pad_token_id, device, 2 * i, comm,
                           diagnostics=[])  # the loop records them every step by default (grad_diag_every)
            took[loss] = time.perf_counter() - start
        ratios.append(took["normbt"] / took["bt"])
    return ratios[2:]


def one_run(args: argparse.Namespace) -> None:
    """``--side``: measure one side in this process and print its step times as the last line (JSON)."""
    rows = make_rows(args.model, args.workload, args.steps * args.batch + args.batch, args.max_length)
    times = trl(args.model, rows, args.steps, args.batch) if args.side == "trl" else \
        ours(args.model, rows, args.steps, args.batch, args.side)
    tokens = statistics.mean(r["chosen_len"] + r["rejected_len"] for r in rows)
    print(json.dumps({"side": args.side, "step_s": times, "mean_tokens_per_pair": tokens}))


def measure(args: argparse.Namespace, side: str) -> dict:
    command = [sys.executable, __file__, "--side", side, "--model", args.model, "--workload", args.workload,
               "--steps", str(args.steps), "--batch", str(args.batch), "--max-length", str(args.max_length)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{side} run failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summary(name: str, values: list[float], fmt: str) -> str:
    _, low, high, _ = t_interval(values)
    return (f"{name}: median {format(statistics.median(values), fmt)}, min-max "
            f"{format(min(values), fmt)}-{format(max(values), fmt)}, 95% CI of the mean "
            f"[{format(low, fmt)}, {format(high, fmt)}] over {len(values)} rounds")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="embedded:minilm")
    parser.add_argument("--workload", choices=("hh-rlhf", "synthetic"), default="hh-rlhf")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run (the first two are warm-up)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5, help="each side runs once per round, this many rounds")
    parser.add_argument("--sides", default=",".join(SIDES), help="which of trl,bt,normbt to run (bt,normbt: "
                        "NormBT's cost alone, without TRL's long runs)")
    parser.add_argument("--interleaved", action="store_true",
                        help="NormBT/BT only: both losses on the same engine and batches, step by step, in one "
                        "process (--steps batches); the ratio's interval over batches instead of rounds")
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # one measurement (a child process)
    args = parser.parse_args()
    if args.side:
        one_run(args)
        return
    if args.interleaved:
        available = len(conversations(args.workload, None)) if args.workload == "hh-rlhf" else args.steps * args.batch
        rows = make_rows(args.model, args.workload, min(args.steps * args.batch, available), args.max_length)
        print(f"model {args.model}, workload {args.workload} (max length {args.max_length}), batch {args.batch} "
              f"pairs, {args.steps} batches each trained by BT and by NormBT back to back, first 2 dropped, "
              f"{os.cpu_count()} CPUs", flush=True)
        ratios = interleaved(args.model, rows, args.steps, args.batch)
        _, low, high, _ = t_interval(ratios)
        print(f"ratio NormBT/BT step time, paired by batch: median {statistics.median(ratios):.4f}, mean "
              f"{statistics.mean(ratios):.4f}, 95% CI of the mean [{low:.4f}, {high:.4f}], min-max "
              f"{min(ratios):.3f}-{max(ratios):.3f} over {len(ratios)} batches (target <= 1.02, interval inside "
              f"0.98-1.02)")
        return
    sides = [s for s in args.sides.split(",") if s]
    if set(sides) - set(SIDES) or "normbt" not in sides or len(sides) < 2:
        raise SystemExit(f"--sides: normbt and at least one of trl, bt, from {SIDES}; got {args.sides}")
    print(f"model {args.model}, workload {args.workload} (max length {args.max_length}), batch {args.batch} pairs, "
          f"{args.steps} steps per run (first 2 dropped), 1 process each, {os.cpu_count()} CPUs, "
          f"{args.rounds} rounds of {', '.join(sides)}, the order rotated each round", flush=True)
    vs_trl, normbt_bt = [], []
    for k in range(args.rounds):
        order = sides[k % len(sides):] + sides[:k % len(sides)]  # no side always runs first or after another
        runs = {side: measure(args, side) for side in order}
        step = {side: statistics.median(run["step_s"]) for side, run in runs.items()}
        line = [f"round {k + 1} ({' -> '.join(order)}): " + ", ".join(
            f"{side} {args.batch / step[side]:.2f} pairs/s" for side in sides)]
        if "trl" in runs:
            vs_trl.append(step["trl"] / step["normbt"])
            line.append(f"ours(NormBT)/TRL {vs_trl[-1]:.2f}x")
        if "bt" in runs:
            # Both runs train the same batches in the same order: step i of one is step i of the other, so the
            # ratio is taken step by step (batches of very different lengths cancel), then its median.
            paired = [n / b for n, b in zip(runs["normbt"]["step_s"], runs["bt"]["step_s"])]
            normbt_bt.append(statistics.median(paired))
            line.append(f"NormBT/BT {normbt_bt[-1]:.3f} (median of {len(paired)} paired steps)")
        print("; ".join(line), flush=True)
    target = 2.0 if args.workload == "hh-rlhf" else 1.5
    if vs_trl:
        print(summary(f"ratio ours(NormBT)/TRL pairs/s (target >= {target})", vs_trl, ".2f"))
    if normbt_bt:
        print(summary("ratio NormBT/BT step time, paired by step (target <= 1.02, interval inside 0.98-1.02)",
                      normbt_bt, ".3f"))

if __name__ == "__main__":
    main()
