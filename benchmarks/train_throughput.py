"""Training throughput: our loop vs TRL's ``RewardTrainer``, and NormBT vs BT step time, measured in one run.

    pip install -e '.[bench]'
    python benchmarks/train_throughput.py [--model embedded:minilm] [--steps 30] [--batch 16] [--repeats 2]

Same model, same pre-tokenised pairs (the synthetic benchmark rendered by our data code), same batch size,
max length, optimizer (AdamW, fixed lr), precision (fp32, no gradient checkpointing: TRL's defaults are bf16
and checkpointing) and process count (one process; DeepSpeed ZeRO-0 on our side, the HF Trainer on TRL's).
Step time is the median over steps after the first two of each run (warm-up excluded); our BT and NormBT runs
alternate ``--repeats`` times and pool their steps. Prints pairs/s for each and the ratios; targets: ours/TRL
>= 1.5, NormBT/BT <= 1.02.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline import modeling, synthetic  # noqa: E402
from pipeline.config import load_config  # noqa: E402


def make_rows(model: str, n: int, max_length: int) -> list[dict]:
    tok = modeling.load_tokenizer(model)
    rows = []
    for r in synthetic.generate(synthetic.SyntheticSpec(n_train=n), "train"):
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


def trl(model: str, rows: list[dict], steps: int, batch: int) -> float:
    """Median seconds per optimizer step of TRL's RewardTrainer on the same pre-tokenised pairs."""
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
    return statistics.median(times[2:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="embedded:minilm")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2,
                        help="alternate our BT and NormBT runs this many times (pooled medians), so that "
                             "drift in the machine's speed hits both alike")
    args = parser.parse_args()
    rows = make_rows(args.model, args.steps * args.batch + args.batch, args.max_length)
    # TRL first: our loop initialises torch.distributed (DeepSpeed), after which the HF Trainer would wrap
    # its model in a one-process DDP and pay for it.
    t_trl = trl(args.model, rows, args.steps, args.batch)
    bt, nbt = [], []
    for _ in range(args.repeats):
        bt += ours(args.model, rows, args.steps, args.batch, "bt")
        nbt += ours(args.model, rows, args.steps, args.batch, "normbt")
    t_bt, t_nbt = statistics.median(bt), statistics.median(nbt)
    print(f"model {args.model}, batch {args.batch} pairs, {args.steps} steps, 1 process, {os.cpu_count()} CPUs, "
          f"ours x {args.repeats} alternating")
    print(f"TRL RewardTrainer        : {args.batch / t_trl:7.1f} pairs/s  ({t_trl * 1000:.0f} ms/step)")
    print(f"ours, BT                 : {args.batch / t_bt:7.1f} pairs/s  ({t_bt * 1000:.0f} ms/step)")
    print(f"ours, NormBT             : {args.batch / t_nbt:7.1f} pairs/s  ({t_nbt * 1000:.0f} ms/step)")
    print(f"ratio ours(NormBT)/TRL pairs/s : {t_trl / t_nbt:.2f}x   (target >= 1.5)")
    print(f"ratio NormBT/BT step time      : {t_nbt / t_bt:.3f}   (target <= 1.02)")


if __name__ == "__main__":
    main()
