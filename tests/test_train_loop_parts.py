"""The train loop's pure parts: batching, rank slices and the data-wait clock (no Ray, no DeepSpeed)."""

from __future__ import annotations

import time

import pytest

from pipeline.train_loop import global_batches, micro_slices, prefetched, timed

pytestmark = pytest.mark.unit


def _rows(n: int) -> list[dict]:
    return [{"i": i, "chosen_len": i % 7, "rejected_len": 3} for i in range(n)]


def test_global_batches_are_deterministic_full_and_drop_only_the_tail():
    windows = [_rows(20)[:10], _rows(20)[10:]]
    first = list(global_batches(windows, global_batch=4, seed=1, epoch=0))
    again = list(global_batches(windows, global_batch=4, seed=1, epoch=0))
    assert first == again and all(len(b) == 4 for b in first)
    assert len(first) == 5  # 10 + 10 rows: the 2-row remainder of window 0 is carried into window 1
    assert sorted(r["i"] for b in first for r in b) == list(range(20))
    assert list(global_batches(windows, global_batch=4, seed=1, epoch=1)) != first  # reshuffled per epoch


def test_micro_slices_partition_the_global_batch_across_ranks_and_accumulation():
    batch = _rows(12)
    parts = [micro_slices(batch, micro=2, accum=3, world=2, rank=r) for r in (0, 1)]
    assert [len(p) for p in parts] == [3, 3]
    seen = [r["i"] for p in parts for micro in p for r in micro]
    assert sorted(seen) == list(range(12))


def test_timed_records_how_long_each_item_took_to_arrive():
    def slow():
        yield "fast"
        time.sleep(0.05)
        yield "slow"

    waits: list[float] = []
    assert list(timed(slow(), waits)) == ["fast", "slow"]
    assert len(waits) == 2 and waits[1] >= 0.04 > waits[0]


def test_prefetched_reads_ahead_in_order_and_reraises_errors():
    pulled: list[int] = []

    def source():
        for i in range(5):
            pulled.append(i)
            yield i

    items = prefetched(source(), depth=2)
    deadline = time.time() + 5
    while len(pulled) < 2 and time.time() < deadline:  # the thread starts reading before the first next()
        time.sleep(0.01)
    assert pulled[:2] == [0, 1]
    assert list(items) == [0, 1, 2, 3, 4]

    def broken():
        yield 1
        raise ValueError("row 7: bad chosen_ids")

    with pytest.raises(ValueError, match="row 7"):
        list(prefetched(broken()))


def test_prefetched_thread_stops_when_the_consumer_is_dropped_unread():
    import gc
    import threading

    def endless():
        while True:
            yield 0

    items = prefetched(endless(), depth=1)
    del items
    gc.collect()
    deadline = time.time() + 5
    while any(t.name == "train-prefetch" for t in threading.enumerate()) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(t.name == "train-prefetch" for t in threading.enumerate())
