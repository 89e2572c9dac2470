"""Small stand-ins shared by tests."""

from __future__ import annotations

import torch


class PlainEngine:
    """What ``train_one_step`` and ``evaluate`` ask of a DeepSpeed engine, without DeepSpeed."""

    def __init__(self, model: torch.nn.Module, lr_lambda=lambda step: 1.0) -> None:
        self.model = model
        self.optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda)

    def __call__(self, **inputs):
        return self.model(**inputs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad()

    def get_global_grad_norm(self) -> float:
        return 0.0

    def get_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]


def serve_port() -> int:
    """The port to serve on in the suite's one Ray session: Serve's, once a test has started it (its proxy keeps
    its address until Ray stops, and ``serving.start`` refuses another), else a free one."""
    import socket

    from pipeline import serving

    running = serving.serve_http_address()
    if running is not None:
        return running[1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
