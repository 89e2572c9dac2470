"""The GPU check: the training loop as the paper's configurations run it, on one GPU, in a few minutes.

    torchrun --nproc-per-node 1 benchmarks/gpu_check.py [--steps 30] [--out gpu_check.json]

The ZeRO runs need torch, transformers, deepspeed and pyyaml (no Ray, no MLflow, no network). They build a random Llama-style
decoder of about 107M parameters with a byte-level BPE tokenizer whose pad token is its EOS (offline,
:mod:`pipeline.decoders`), tokenises the built-in synthetic pairs with its chat template, and trains it with the
project's loop (:func:`pipeline.train_loop.train_local`) in bf16 under ZeRO-2 and then ZeRO-3, with every
collective forced through the process group even at world size 1 (``NORMBT_FORCE_COLLECTIVES``), so NCCL's device
rule is exercised on a single GPU. Then it scores the validation pairs with the exported model in fp32 and in bf16
(the scorer applies the head in fp32 either way) and compares.

Printed per ZeRO stage: pairs/s and tokens/s (median over the steps after the first two), model FLOPs utilisation
against the GPU's dense bf16 peak (6 × parameters × tokens per second; the peak is looked up by device name, or
``--peak-tflops``), peak GPU memory; then the fp32-vs-bf16 agreement: largest reward difference, share of pairs
ordered the same way, ties in each precision. Everything also goes to the ``--out`` JSON.

First, the shapes of real models (needs only torch and transformers, and this repository on ``PYTHONPATH``):
random decoders built on the GPU from ``configs/models/llama-3.2-1b`` and ``configs/models/gemma-2b`` (their public
``config.json``, no weights, no hub), bf16, ``--pairs-per-step`` pairs of ``--tokens`` tokens (2,048; unpadded),
forward and backward without and with activation checkpointing, and packed with checkpointing (flash-attention's
varlen kernel when ``flash-attn`` is installed, else sdpa over the block-diagonal mask) (:func:`shape_run`). Printed per run: the peak
memory the forward and backward added on top of weights and gradients, against the memory plan's activation figure
(:mod:`pipeline.memory_plan`), tokens/s and bf16 MFU (6 × parameters × tokens per second over the peak; with
checkpointing the recomputed forward is not counted, as MFU defines it). The ZeRO runs after it need DeepSpeed;
without it they are skipped, saying so.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: Dense bf16 peaks (TFLOP/s, no sparsity) from the vendors' data sheets, matched against torch's device name.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0}


REPO = Path(__file__).resolve().parents[1]
#: Public model shapes (config.json only) the shape runs build random decoders from.
SHAPES = {"llama-3.2-1b": REPO / "configs" / "models" / "llama-3.2-1b", "gemma-2b": REPO / "configs" / "models" / "gemma-2b"}


def shape_run(folder: str | Path, *, tokens: int, pairs: int, checkpointing: bool, device: str = "cuda",
              steps: int = 5, warmup: int = 2, attn: str = "sdpa", peak_tflops: float | None = None,
              packing: bool = False) -> dict:
    """Forward and backward of a random reward model of ``folder``'s config on ``pairs`` pairs of ``tokens`` tokens
    (one forward of 2 × pairs sequences, as training runs them, NormBT's loss). bf16 on CUDA, fp32 elsewhere.
    ``activation_peak_gib`` is the peak allocated during the timed steps minus what was allocated before them
    (weights and gradients, kept allocated): CUDA only, None elsewhere."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from pipeline import losses, memory_plan, modeling

    cuda = device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    config = AutoConfig.from_pretrained(str(folder), num_labels=1)
    config.pad_token_id = config.vocab_size - 1  # never drawn below: every sequence is full length
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForSequenceClassification.from_config(config, dtype=dtype, attn_implementation=attn)
    modeling.disable_dropout(model)
    if checkpointing:
        modeling.enable_checkpointing(model)
    shape = memory_plan.model_shape(str(folder))
    ids = torch.randint(0, config.vocab_size - 1, (2 * pairs, tokens), device=device)
    if packing:  # the same sequences end to end in one row (train.packing)
        batch = {k: v.to(device) for k, v in modeling.pack_pairs(ids[:pairs].tolist(), ids[pairs:].tolist(),
                                                                   config.pad_token_id).items()}
    else:
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def step() -> None:
        rc, rr, hc, hr = modeling.forward_pairs(model, batch)
        loss, _ = losses.normbt_loss(rc, rr, hc, hr, mu=1.0, eps=1e-3)
        loss.backward()

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(warmup):
        step()
    model.zero_grad(set_to_none=False)  # gradients stay allocated: they are model states, not activations
    sync()
    if cuda:
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    planned = memory_plan.activation_bytes(shape, tokens=tokens, sequences=2 * pairs, bf16=dtype == torch.bfloat16,
                                           eager=attn == "eager", checkpointing=checkpointing,
                                           packed=attn if packing else None) / memory_plan.GIB
    measured = (torch.cuda.max_memory_allocated() - base) / memory_plan.GIB if cuda else None
    tokens_per_s = 2 * pairs * tokens / seconds
    return {"model": Path(folder).name, "parameters": shape.parameters, "tokens": tokens, "pairs": pairs,
            "checkpointing": checkpointing, "packing": packing, "attn": attn, "dtype": str(dtype).removeprefix("torch."),
            "step_s_median": seconds, "step_s_spread": max(times) - min(times), "tokens_per_s": tokens_per_s,
            "mfu": 6 * shape.parameters * tokens_per_s / (peak_tflops * 1e12) if peak_tflops else None,
            "activation_peak_gib": measured, "plan_activations_gib": planned,
            "measured_over_plan": measured / planned if measured is not None else None}


def _shape_runs(args, peak: float | None) -> list[dict]:
    import importlib.util

    import torch

    # packed: flash-attention's varlen kernel when installed, else sdpa over the block-diagonal mask
    packed_attn = "flash_attention_2" if importlib.util.find_spec("flash_attn") else "sdpa"
    runs = []
    for name in args.shapes:
        for checkpointing, packing in ((False, False), (True, False), (True, True)):
            run = shape_run(SHAPES[name], tokens=args.tokens, pairs=args.pairs_per_step, checkpointing=checkpointing,
                            peak_tflops=peak, packing=packing, attn=packed_attn if packing else "sdpa")
            runs.append(run)
            print(f"{name} checkpointing={checkpointing} packing={packing} ({run['attn']}): "
                  f"{run['tokens_per_s']:.0f} tokens/s, MFU "
                  f"{run['mfu'] if run['mfu'] is None else round(run['mfu'], 3)}, activations {run['activation_peak_gib']:.1f} "
                  f"GiB measured vs {run['plan_activations_gib']:.1f} GiB planned", flush=True)
            torch.cuda.empty_cache()
    return runs


def _pairs(tok, split: str, n: int) -> tuple[list[dict], list[dict]]:
    from pipeline import modeling, synthetic

    spec = synthetic.SyntheticSpec(n_train=max(n, 64), n_validation=max(n, 64))
    rows, conversations = [], []
    for r in synthetic.generate(spec, split)[:n]:
        sides = {s: modeling.encode_messages(tok, r["prompt"] + r[s]) for s in ("chosen", "rejected")}
        rows.append({"chosen_ids": sides["chosen"], "rejected_ids": sides["rejected"], "margin": None,
                     "chosen_len": len(sides["chosen"]), "rejected_len": len(sides["rejected"])})
        conversations.append({s: r["prompt"] + r[s] for s in ("chosen", "rejected")})
    return rows, conversations


def _train(model_dir: str, zero: int, steps: int, micro: int, train, validation, out: Path) -> dict:
    import torch

    from pipeline.config import load_config
    from pipeline.train_loop import train_local

    history: list[dict] = []

    def report(metrics, checkpoint_dir=None, final=False):
        history.append(dict(metrics))
        if final and int(os.environ.get("RANK", "0")) == 0:
            import shutil

            shutil.copytree(Path(checkpoint_dir) / "model", out / f"zero{zero}", dirs_exist_ok=True)

    torch.cuda.reset_peak_memory_stats()
    cfg = load_config(None, [f"model.name_or_path={model_dir}", "train.use_gpu=true", "train.precision=bf16",
                             f"train.zero_stage={zero}", f"train.max_steps={steps}",
                             f"train.micro_batch_size={micro}", "train.log_every=1", "train.lr=1e-5"])
    started = time.time()
    train_local(cfg, train, validation, report=report)
    steps_seen = [h for h in history if "pairs_per_s" in h][2:]
    return {"zero_stage": zero, "wall_s": time.time() - started,
            "pairs_per_s": statistics.median(h["pairs_per_s"] for h in steps_seen),
            "tokens_per_s": statistics.median(h["tokens_per_s"] for h in steps_seen),
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
            "final_val_accuracy": next((h["val_accuracy"] for h in reversed(history) if "val_accuracy" in h), None)}


def _agreement(model_dir: str, conversations: list[dict]) -> dict:
    import numpy as np

    from pipeline.scoring import score_locally

    rows = [{"messages": c[s]} for c in conversations for s in ("chosen", "rejected")]
    fp32 = score_locally(rows, model_dir, use_gpu=False)["score"].to_numpy()  # the CPU scorer runs fp32
    bf16 = score_locally(rows, model_dir, use_gpu=True)["score"].to_numpy()  # the GPU scorer runs bf16
    d32, d16 = fp32[0::2] - fp32[1::2], bf16[0::2] - bf16[1::2]
    return {"pairs": len(conversations), "max_abs_reward_diff": float(np.abs(fp32 - bf16).max()),
            "same_order_share": float(np.mean(np.sign(d32) == np.sign(d16))),
            "ties_fp32": int((d32 == 0).sum()), "ties_bf16": int((d16 == 0).sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--pairs", type=int, default=1024)
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of this GPU")
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES),
                        help="public model shapes to run (none: skip)")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per sequence in the shape runs")
    parser.add_argument("--pairs-per-step", type=int, default=4, help="pairs per forward in the shape runs")
    parser.add_argument("--skip-zero", action="store_true", help="only the shape runs")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["NORMBT_FORCE_COLLECTIVES"] = "1"  # world size 1 still runs every collective through NCCL
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device")
    name = torch.cuda.get_device_name()
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    results = {"device": name, "torch": torch.__version__, "peak_tflops": peak, "shapes": [], "runs": []}
    try:
        results["shapes"] = _shape_runs(args, peak)
    finally:  # what ran is written even if a later part fails
        Path(args.out).write_text(json.dumps(results, indent=2))
    missing = [m for m in ("deepspeed",) if importlib.util.find_spec(m) is None]
    if args.skip_zero or missing:
        results["zero_skipped"] = "--skip-zero" if args.skip_zero else f"not installed: {', '.join(missing)}"
        print(f"ZeRO runs skipped ({results['zero_skipped']})")
        Path(args.out).write_text(json.dumps(results, indent=2))
        return
    from pipeline import modeling
    from pipeline.decoders import make_decoder

    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    model_dir = make_decoder(work / "decoder", "llama", size="100m")
    tok = modeling.load_tokenizer(model_dir)
    params = sum(p.numel() for p in modeling.build_reward_model(model_dir, tok).parameters())
    train, _ = _pairs(tok, "train", args.pairs)
    validation, conversations = _pairs(tok, "validation", 128)
    results["parameters"] = params
    for zero in (2, 3):
        run = _train(model_dir, zero, args.steps, args.micro_batch, train, validation, work)
        run["mfu"] = 6 * params * run["tokens_per_s"] / (peak * 1e12) if peak else None
        results["runs"].append(run)
        print(f"ZeRO-{zero}: {run['pairs_per_s']:.1f} pairs/s, {run['tokens_per_s']:.0f} tokens/s, "
              f"MFU {run['mfu'] if run['mfu'] is None else round(run['mfu'], 4)}, "
              f"peak memory {run['peak_memory_gib']:.2f} GiB, val accuracy {run['final_val_accuracy']}", flush=True)
    if int(os.environ.get("RANK", "0")) == 0:
        results["scoring"] = _agreement(str(work / "zero3"), conversations)
        print(f"scoring fp32 vs bf16: {results['scoring']}")
        print(f"{name}, {params / 1e6:.1f}M parameters, peak {peak} TFLOP/s")
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
