"""Every collective of the training step and the evaluation runs on the rank's compute device (NCCL's rule).

NCCL reduces only tensors on the rank's own GPU and answers a CPU tensor with "No backend type associated with
device type cpu". This machine has no GPU, so the rule is emulated: two ranks over gloo, the model on torch's
lazy-tensor device (a device other than the CPU that runs on a CPU-only build), and every ``torch.distributed``
collective wrapped to refuse a tensor whose device is not the compute device *stated to the wrapper*, exactly
as NCCL would, before running the real gloo operation on a CPU copy. The stand-in engine below does what the
loop asks of DeepSpeed's engine without DeepSpeed (whose own collectives run on the model's device already)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.helpers import PlainEngine

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
WORLD = 2
_WRAPPED = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce_scatter_tensor", "reduce",
            "gather", "all_to_all_single")


def emulate_nccl(compute_device: torch.device, calls: list[str]) -> None:
    """Replace ``torch.distributed``'s tensor collectives in this process by NCCL-rule checking versions."""
    real = {name: getattr(dist, name) for name in _WRAPPED}

    def check(name: str, tensors: list[torch.Tensor]) -> None:
        for tensor in tensors:
            if tensor.device != compute_device:
                raise RuntimeError(f"{name}: No backend type associated with device type {tensor.device.type} "
                                   f"(emulated NCCL: this rank computes on {compute_device})")
        calls.append(name)

    def all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        check("all_reduce", [tensor])
        cpu = tensor.cpu()
        real["all_reduce"](cpu, op=op, group=group)
        tensor.copy_(cpu.to(compute_device))

    def all_gather(tensor_list, tensor, group=None, async_op=False):
        check("all_gather", [tensor, *tensor_list])
        cpus = [t.cpu() for t in tensor_list]
        real["all_gather"](cpus, tensor.cpu(), group=group)
        for out, cpu in zip(tensor_list, cpus, strict=True):
            out.copy_(cpu.to(compute_device))

    def refuse(name):
        def collective(*args, **kwargs):
            check(name, [a for a in args if isinstance(a, torch.Tensor)])
            raise AssertionError(f"{name} is not emulated: the loop was not expected to call it")
        return collective

    for name in _WRAPPED:
        setattr(dist, name, refuse(name))
    dist.all_reduce, dist.all_gather = all_reduce, all_gather


def _rank(rank: int, port: int, out: str) -> None:
    import torch._lazy.ts_backend

    from pipeline import losses, modeling, train_loop
    from pipeline.config import load_config
    from pipeline.distributed import Collectives

    torch._lazy.ts_backend.init()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    device = torch.device("lazy", 0)
    calls: list[str] = []
    emulate_nccl(device, calls)
    cfg = load_config(None, ["model.name_or_path=tiny:bert", "loss.name=normbt", "train.micro_batch_size=2"])
    tok = modeling.load_tokenizer("tiny:bert")
    model = modeling.build_reward_model("tiny:bert", tok, seed=0).to(device)
    engine, ema = PlainEngine(model), losses.DistanceEMA(0.9)
    texts = [("2 + 2 is 4.", "2 + 2 is 5."), ("Paris is in France.", "Paris is in Spain."),
             ("Water is wet.", "Water is dry."), ("Red is a colour.", "Red is a number."),
             ("Cats purr.", "Cats bark.")]
    rows = []
    for chosen, rejected in texts:
        c, r = tok(chosen)["input_ids"], tok(rejected)["input_ids"]
        rows.append({"chosen_ids": c, "rejected_ids": r, "chosen_len": len(c), "rejected_len": len(r), "margin": None})
    comm = Collectives(device)
    steps = [train_loop.train_one_step(cfg, engine, model, [rows[2 * rank: 2 * rank + 2]], ema, tok.pad_token_id,
                                       device, step, comm) for step in range(2)]
    # 5 validation rows on 2 ranks: 3 and 2 rows; with 2 rows per forward, 2 and 1 forwards before padding
    metrics, table = train_loop.evaluate(cfg, engine, model, rows, tok.pad_token_id, device, comm)
    Path(out, f"rank{rank}.json").write_text(json.dumps({"steps": steps, "eval": metrics, "calls": calls,
                                                         "rows": table[:, 0].tolist()}))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_step_and_evaluation_collectives_obey_the_nccl_device_rule(tmp_path):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    mp.start_processes(_rank, args=(_free_port(), str(tmp_path)), nprocs=WORLD, start_method="spawn", join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert ranks[0]["calls"] == ranks[1]["calls"], "every rank must issue the same collectives in the same order"
    assert {"all_reduce", "all_gather"} <= set(ranks[0]["calls"])
    assert ranks[0]["steps"] == ranks[1]["steps"] and all(s is not None for s in ranks[0]["steps"])
    assert ranks[0]["steps"][1]["mu"] > 0  # NormBT's μ came from the all-reduced distances
    assert ranks[0]["eval"] == ranks[1]["eval"] and ranks[0]["eval"]["val_pairs"] == 5
    assert ranks[0]["rows"] == ranks[1]["rows"] == [0, 1, 2, 3, 4], "the per-pair table comes back in row order"
