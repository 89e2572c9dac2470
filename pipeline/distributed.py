"""Collectives of the training loop and its evaluation, on the process group's device.

NCCL reduces only CUDA tensors that live on the rank's own GPU (a CPU tensor fails with "No backend type
associated with device type cpu"); gloo reduces CPU tensors. So no collective here infers its device from a
tensor or from torch's defaults: :class:`Collectives` is built once with the device the loop computes on
(:func:`compute_device`) and every scalar or table the loop exchanges (the NaN flag, NormBT's distance sum and
count, metric means and extremes, validation rows) is placed there before it is reduced.

Without an initialised process group (one process, no torchrun) every collective is the identity; with one rank
too, unless ``NORMBT_FORCE_COLLECTIVES=1`` (the GPU check sets it, so NCCL's rule is exercised on a single GPU).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def compute_device(use_gpu: bool) -> torch.device:
    """This rank's compute device: its own GPU (the one torchrun / Ray Train selected), else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if use_gpu else torch.device("cpu")


class Collectives:
    """Float collectives over the default process group, with tensors on ``device``. Build it after the process
    group exists (under torchrun, ``deepspeed.initialize`` creates it)."""

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        initialised = dist.is_available() and dist.is_initialized()
        self.world = dist.get_world_size() if initialised else 1
        self.rank = dist.get_rank() if initialised else 0
        forced = os.environ.get("NORMBT_FORCE_COLLECTIVES") == "1"
        self.active = initialised and (self.world > 1 or forced)

    def all_reduce(self, values: Sequence[float], op: str = "sum") -> list[float]:
        """Element-wise ``sum`` / ``max`` / ``min`` of ``values`` over ranks (float64)."""
        tensor = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        if self.active:
            dist.all_reduce(tensor, op=_OPS[op])
        return tensor.tolist()

    def all_gather_rows(self, rows: np.ndarray) -> np.ndarray:
        """Every rank's ``[n_r, k]`` float table stacked in rank order; ranks may hold different ``n_r``."""
        local = torch.as_tensor(np.asarray(rows, dtype=np.float64), device=self.device)
        if not self.active:
            return local.cpu().numpy()
        counts = [int(c) for c in self.all_gather_one(float(local.shape[0]))]
        width = max(counts)
        padded = torch.zeros((width, local.shape[1]), dtype=torch.float64, device=self.device)
        padded[: local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded)
        return torch.cat([p[:n] for p, n in zip(parts, counts, strict=True)]).cpu().numpy()

    def all_gather_one(self, value: float) -> list[float]:
        """One float from every rank, in rank order."""
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        if not self.active:
            return tensor.tolist()
        parts = [torch.empty_like(tensor) for _ in range(self.world)]
        dist.all_gather(parts, tensor)
        return [float(p.item()) for p in parts]
