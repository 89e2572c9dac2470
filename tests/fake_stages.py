"""Stand-in stages for runner tests: they write a file, count calls, and can be told to fail."""

import os

from pipeline.stage import StageResult

CALLS: list[str] = []


def first(ctx):
    CALLS.append("first")
    out = ctx.out_dir / "a.txt"
    out.write_text(str(ctx.cfg.train.lr))
    ctx.tracker.log_metrics({"rows": 3})
    return StageResult(outputs={"a": str(out)}, metrics={"rows": 3})


def second(ctx):
    CALLS.append("second")
    if os.environ.get("FAKE_STAGE_FAIL"):
        raise ValueError("injected failure")
    upstream = ctx.upstream["data"].output("a")
    out = ctx.out_dir / "b.txt"
    out.write_text(open(upstream).read() + "+b")
    # like the train stage: its final validation measured at its last step
    return StageResult(outputs={"b": str(out)}, metrics={"val_accuracy": 0.75}, metrics_step=12)
