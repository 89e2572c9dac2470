"""LoRA vs full fine-tuning in the same run: step time, peak memory and optimizer state, as ratios with repeats.

    python benchmarks/lora_vs_full.py [--model embedded:minilm] [--rounds 3] [--steps 20] [--r 8]

Both sides train the same backbone on the same synthetic pairs in the same order with the same loop (NormBT,
AdamW, one process, DeepSpeed ZeRO-0, fp32 on CPU): ``full`` trains every weight, ``lora`` adapters of rank
``--r`` on the architecture's default targets plus the score head. Each measurement runs in a fresh process (peak
memory is the process's own); the two sides alternate, the order rotated each round, so drift in the machine's
speed hits both alike. Per run: the median step time after the first two steps, the peak memory (CUDA: the
allocator's peak; CPU: the process's peak resident set, which includes the interpreter and libraries both sides
share, so the ratio understates the saving), the bytes held in the optimizer's state (measured on the engine's
optimizer after training) and the trainable parameters. Printed per round, then LoRA/full as the median ratio with
its min-max spread over rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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


def _rows(tok, split: str, n: int) -> list[dict]:
    from pipeline import modeling, synthetic

    rows = []
    for r in synthetic.generate(synthetic.SyntheticSpec(n_train=max(n, 64), n_validation=32), split)[:n]:
        sides = {s: modeling.encode_messages(tok, r["prompt"] + r[s]) for s in ("chosen", "rejected")}
        rows.append({"chosen_ids": sides["chosen"], "rejected_ids": sides["rejected"], "margin": None,
                     "chosen_len": len(sides["chosen"]), "rejected_len": len(sides["rejected"])})
    return rows


def one_run(side: str, model: str, steps: int, r: int, micro: int) -> dict:
    """Train ``steps`` steps in this process; what it measured."""
    import torch

    from pipeline import modeling, train_loop
    from pipeline.config import load_config

    engines = []
    build = train_loop.build_engine

    def keep_engine(*args, **kwargs):
        built = build(*args, **kwargs)
        engines.append(built[0])
        return built

    train_loop.build_engine = keep_engine
    tok = modeling.load_tokenizer(model)
    train, validation = _rows(tok, "train", steps * micro), _rows(tok, "validation", 16)
    cfg = load_config(None, [f"model.name_or_path={model}", f"train.max_steps={steps}", "train.zero_stage=0",
                             f"train.micro_batch_size={micro}", "train.num_workers=1", "train.log_every=1",
                             "train.grad_diag_every=0", "tracking.enabled=false",
                             f"lora.r={r if side == 'lora' else 0}"])
    step_s: list[float] = []
    last: dict = {}

    def report(metrics, checkpoint_dir=None, final=False):
        if "pairs_per_s" in metrics:
            step_s.append(micro / metrics["pairs_per_s"])
        if final:
            last.update(metrics)

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    train_loop.train_local(cfg, train, validation, report=report, one_process=True)
    optimizer = engines[0].optimizer
    optimizer = getattr(optimizer, "optimizer", optimizer)  # DeepSpeed may wrap the client optimizer
    state_bytes = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                      if torch.is_tensor(t) and t.dim() > 0)
    peak = (torch.cuda.max_memory_allocated() if torch.cuda.is_available()
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"side": side, "step_s": statistics.median(step_s[2:] or step_s), "peak_bytes": peak,
            "optimizer_state_bytes": state_bytes, "trainable": last.get("params/trainable"),
            "total": last.get("params/total")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded:minilm")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = one_run(args.child, args.model, args.steps, args.r, args.micro_batch)
        print("RESULT " + json.dumps(result), flush=True)
        return
    ratios: dict[str, list[float]] = {"step_s": [], "peak_bytes": [], "optimizer_state_bytes": []}
    for round_ in range(args.rounds):
        sides = ("full", "lora") if round_ % 2 == 0 else ("lora", "full")
        results = {}
        for side in sides:
            started = time.time()
            with tempfile.TemporaryDirectory() as scratch:
                done = subprocess.run([sys.executable, __file__, "--child", side, "--model", args.model, "--steps",
                                       str(args.steps), "--r", str(args.r), "--micro-batch", str(args.micro_batch)],
                                      capture_output=True, text=True, cwd=scratch, check=False)
            line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"{side} run failed:\n{done.stderr[-3000:]}")
            results[side] = json.loads(line[len("RESULT "):])
            res = results[side]
            print(f"round {round_ + 1} {side:4s}: step {res['step_s'] * 1000:7.1f} ms  peak "
                  f"{res['peak_bytes'] / 2**20:7.1f} MiB  optimizer state {res['optimizer_state_bytes'] / 2**20:7.2f} "
                  f"MiB  trainable {res['trainable']:,} / {res['total']:,}  ({time.time() - started:.0f} s)",
                  flush=True)
        for key, values in ratios.items():
            values.append(results["lora"][key] / max(results["full"][key], 1e-12))
    print(f"\nLoRA (r={args.r}) / full on {args.model}, {args.rounds} rounds (median [min, max]):")
    for key, values in ratios.items():
        print(f"  {key:22s} {statistics.median(values):.3f} [{min(values):.3f}, {max(values):.3f}]")


if __name__ == "__main__":
    main()
