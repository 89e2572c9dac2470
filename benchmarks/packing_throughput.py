"""Packing and checkpointing on real HH-RLHF lengths, with a tiny decoder: padded-token fraction and step-time ratios.

    python benchmarks/packing_throughput.py [--rounds 5] [--micro-batches 12] [--micro-batch 4] [--out packing.json]

The pairs are the HH-RLHF helpful + harmless train samples in ``../shared/data`` as the data stage normalises them,
tokenised by ``tiny:llama``'s tokenizer, ``--max-length`` 512 per side.

1. Padded-token fraction (:func:`pipeline.train_loop.padding_fraction`) of every micro-batch of one epoch, as the
   training loop cuts them (shuffled windows grouped by length, ``train.length_group_window`` 64, 2 workers), as
   random batches would be (no grouping), and packed (none, by construction).
2. Step time of ``tiny:llama`` (fp32, AdamW, forward + backward + step) on the same ``--micro-batches`` micro-batches,
   three ways: padded, packed (``train.packing``) and padded with activation checkpointing. Each round runs the
   three back to back on every micro-batch (the order rotated each round), so the machine's drift hits all alike;
   a round's ratio (packed/padded pairs/s, checkpointed/plain step time) is the median of the per-micro-batch
   ratios, reported as the median and min-max spread over ``--rounds``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.train_throughput import make_rows
from pipeline import losses, modeling
from pipeline.train_loop import global_batches, micro_slices, padding_fraction


def micro_batches(rows: list[dict], *, micro: int, world: int, window: int, group: bool) -> list[list[dict]]:
    """One epoch's micro-batches of every rank, grouped by length as the loop does, or in file order."""
    global_batch = micro * world
    if group:
        windows = [rows[i: i + global_batch * window] for i in range(0, len(rows), global_batch * window)]
        batches = global_batches(windows, global_batch=global_batch, seed=0, epoch=0)
    else:
        batches = (rows[i: i + global_batch] for i in range(0, len(rows) - global_batch + 1, global_batch))
    return [mb for b in batches for r in range(world) for mb in micro_slices(b, micro=micro, accum=1, world=world,
                                                                              rank=r)]


def step_seconds(model, optimizer, batch: dict) -> float:
    start = time.perf_counter()
    rc, rr, hc, hr = modeling.forward_pairs(model, batch)
    loss, _ = losses.normbt_loss(rc, rr, hc, hr, mu=1.0, eps=1e-3)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def _median_ratio(numerators: list[float], denominators: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(numerators, denominators, strict=True))


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--micro-batches", type=int, default=12)
    parser.add_argument("--micro-batch", type=int, default=4, help="pairs per micro-batch")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    rows = make_rows("tiny:llama", "hh-rlhf", None, args.max_length)
    result: dict = {"pairs": len(rows), "max_length": args.max_length, "micro_batch": args.micro_batch}
    for name, group in (("grouped", True), ("random", False)):
        mbs = micro_batches(rows, micro=args.micro_batch, world=2, window=64, group=group)
        result[f"padding_fraction_{name}"] = statistics.mean(padding_fraction(mb, packing=False) for mb in mbs)
    result["padding_fraction_packed"] = 0.0
    print(f"{len(rows)} HH-RLHF pairs: padded-token fraction {result['padding_fraction_grouped']:.3f} grouped by "
          f"length (the loop's batching), {result['padding_fraction_random']:.3f} random batches, 0 packed",
          flush=True)

    torch.manual_seed(0)
    tok = modeling.load_tokenizer("tiny:llama")
    chosen = micro_batches(rows, micro=args.micro_batch, world=2, window=64, group=True)[: args.micro_batches]
    pad = tok.pad_token_id
    padded = [modeling.collate_pairs([r["chosen_ids"] for r in mb], [r["rejected_ids"] for r in mb], pad)
              for mb in chosen]
    packed = [modeling.pack_pairs([r["chosen_ids"] for r in mb], [r["rejected_ids"] for r in mb], pad)
              for mb in chosen]
    models = {}
    for mode in ("padded", "packed", "checkpointed"):
        model = modeling.build_reward_model("tiny:llama", tok, dtype=torch.float32)
        if mode == "checkpointed":
            modeling.enable_checkpointing(model)
        models[mode] = (model, torch.optim.AdamW(model.parameters(), lr=1e-5))
    inputs = {"padded": padded, "packed": packed, "checkpointed": padded}
    for mode, (model, opt) in models.items():  # warm-up
        step_seconds(model, opt, inputs[mode][0])
    rounds = []
    order = list(models)
    for r in range(args.rounds):
        seconds = {mode: [] for mode in order}
        for i in range(len(chosen)):
            for mode in order[r % 3:] + order[: r % 3]:
                seconds[mode].append(step_seconds(*models[mode], inputs[mode][i]))
        # the median of step-by-step ratios: the three steps of a micro-batch run back to back, so a burst of
        # load from elsewhere on the machine hits one step's ratio, not the round's sums
        rounds.append({"packed_over_padded_pairs_per_s": _median_ratio(seconds["padded"], seconds["packed"]),
                       "checkpointed_over_plain_step_time": _median_ratio(seconds["checkpointed"], seconds["padded"]),
                       "padded_pairs_per_s": args.micro_batch / statistics.median(seconds["padded"])})
        print(f"round {r + 1}: packed/padded pairs/s {rounds[-1]['packed_over_padded_pairs_per_s']:.3f}, "
              f"checkpointed/plain step time {rounds[-1]['checkpointed_over_plain_step_time']:.3f}", flush=True)
    for key in rounds[0]:
        values = [x[key] for x in rounds]
        result[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    result["rounds"] = rounds
    tokens = [int(b["input_ids"].numel()) for b in padded]
    real = [int(b["input_ids"].numel()) for b in packed]
    result["token_slots_padded_over_packed"] = sum(tokens) / sum(real)
    print(json.dumps({k: v for k, v in result.items() if k != "rounds"}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
